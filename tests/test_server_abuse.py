"""Abuse of the server's front door, on 127.0.0.1 only, in bounded loops: path traversal on the
static files, malformed and oversize HTTP requests, malformed and oversize WebSocket frames,
random bytes, and connection churn (file descriptors and RSS must come back near the baseline).

The server is the real RealtimeServer over the in-process pipeline (tests/test_server_http.py's
ThreadServer). What counts as a crash: a 5xx answer, an unhandled exception on the server's event
loop, an ERROR log record (websockets logs a failed handler or process_request that way), or a
server that stops answering /health. Each test prints its figures (cases, crashes, growth).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omnistream.runtime.client import InProcClient
from tests.test_server_http import ThreadServer, parse, raw, request, ws_upgrade

SECRET = b"TOPSECRET-" + os.urandom(8).hex().encode()
FILES = {"index.html": b"<!doctype html><title>omni</title>", "app.js": b"console.log(1)",
         "sub/page.css": b"body{}"}


@pytest.fixture(scope="module")
def site(tiny, tmp_path_factory):
    """A web dir with a nested file and a symlink pointing out of it; a secret next to it."""
    root = tmp_path_factory.mktemp("abuse")
    web = root / "web"
    (web / "sub").mkdir(parents=True)
    for name, body in FILES.items():
        (web / name).write_bytes(body)
    (root / "secret.txt").write_bytes(SECRET)
    (web / "link.txt").symlink_to(root / "secret.txt")
    srv = ThreadServer(InProcClient(tiny), web_dir=web, max_sessions=4)
    yield srv
    srv.close()
    assert not srv.loop_errors, srv.loop_errors


@pytest.fixture
def no_errors_logged(caplog):
    """Fails the test if anything logged at ERROR (websockets' "connection handler failed" etc.)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


def healthy(port: int) -> bool:
    return request(port, "/health")[0] == 200


# ---------------------------------------------------------------------------------- path traversal
SEGMENTS = ["..", ".", "%2e%2e", "%2E%2e", ".%2e", "%2e.", "..%2f", "..%5c", "%2f", "%5c", "\\", "..\\", "%00",
            "%2500", "%252e%252e", "%c0%ae%c0%ae", "....//", "secret.txt", "link.txt", "web", "sub", "page.css",
            "index.html", "app.js", "etc", "passwd", "", "~", ";", "?x=..", "#", "C:", "\x00", "%", "*"]
PREFIXES = ["/web/", "/", "//", "/web//", "/web/sub/", "/index.html/", "http://127.0.0.1/", "/web/./", ""]


def fetch_static(port: int, path: str) -> tuple[int, bytes]:
    code, _, body = parse(raw(port, b"GET " + path.encode("latin-1") + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
    return code, body


def assert_contained(code: int, body: bytes, path: str) -> None:
    assert code in (200, 400, 404), (path, code)
    assert SECRET not in body, path
    if code == 200:  # only ever one of the web dir's own files
        assert body in FILES.values(), (path, body[:80])


@pytest.mark.timeout(120)
def test_static_files_known_traversals(site, no_errors_logged):
    cases = ["/web/../secret.txt", "/web/%2e%2e/secret.txt", "/web/..%2fsecret.txt", "/web/link.txt",
             "/web//etc/passwd", "/etc/passwd", "//etc/passwd", "/web/%2fetc%2fpasswd", "/web/..\\secret.txt",
             "/web/sub/../../secret.txt", "/web/C:\\Windows\\win.ini", "/web/secret.txt\x00.js",
             "/web/app.js\x00", "http://127.0.0.1/../secret.txt", "/web/.%2e/secret.txt", "*", "/web/sub",
             "/web/", "/web", "/index.html/../secret.txt", "/web/%252e%252e/secret.txt"]
    for path in cases:
        code, body = fetch_static(site.port, path)
        assert_contained(code, body, path)
        if "link.txt" in path or "secret" in path:
            assert code in (400, 404), path
    assert fetch_static(site.port, "/web/sub/page.css") == (200, FILES["sub/page.css"])
    print(f"traversal: {len(cases)} known cases, 0 crashes")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(PREFIXES), segments=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6))
def test_static_files_never_escape_the_web_dir(site, prefix, segments):
    path = prefix + "/".join(segments)
    if not path.startswith(("/", "http")):
        path = "/" + path
    code, body = fetch_static(site.port, path)
    assert_contained(code, body, path)


# ---------------------------------------------------------------------------------- malformed HTTP
def test_oversize_and_malformed_http_requests(site, no_errors_logged):
    host = b"Host: 127.0.0.1\r\n"
    cases = {  # request bytes -> the statuses allowed
        b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n" + host + b"\r\n": (414,),
        b"GET / HTTP/1.1\r\n" + host + b"".join(b"X-%d: y\r\n" % i for i in range(300)) + b"\r\n": (431,),
        b"GET / HTTP/1.1\r\n" + host + b"X-Big: " + b"y" * 10_000 + b"\r\n\r\n": (431,),
        b"GET / HTTP/1.1\r\n" + host + b"no colon here\r\n\r\n": (400,),
        b"GET / HTTP/1.1\r\n" + host + b"Content-Length: 5\r\n\r\nhello": (400,),
        b"GET / HTTP/1.1\r\n" + host + b"Content-Length: -1\r\n\r\n": (400,),
        b"GET / HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n": (400,),
        b"GET / HTTP/1.1\n" + host.replace(b"\r", b"") + b"\n": (0, 400),  # bare LF: answered or closed
        b"GET / HTTP/0.9\r\n\r\n": (400,),
        b"GET  / HTTP/1.1\r\n" + host + b"\r\n": (400, 404),
        b"\xff\xfe\xfd\r\n\r\n": (400,),
        b"GET /\xc3\xa9 HTTP/1.1\r\n" + host + b"\r\n": (400,),
        b"GET / HTTP/1.1\r\nHost: \xc3\xa9\r\n\r\n": (400,),
        b"GET / HTTP/1.1\r\n" + host + host + b"\r\n": (400,),
        b"GET / HTTP/1.1\r\n" + host + b"Origin: a\r\nOrigin: b\r\n\r\n": (400,),
        b"DELETE /web/app.js HTTP/1.1\r\n" + host + b"\r\n": (405,),
        b"GET /v1/realtime HTTP/1.1\r\n" + host + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n": (400,),  # no Sec-WebSocket-Key
        b"GET /v1/realtime HTTP/1.1\r\n" + host + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n": (400,),
        b"GET /v1/realtime HTTP/1.1\r\n" + host + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n": (400, 426),
        b"GET /health HTTP/1.1\r\n" + host: (0,),  # never finished: the connection just closes
        b"": (0,),
    }
    for data, allowed in cases.items():
        code = parse(raw(site.port, data, timeout=1))[0]
        assert code in allowed, (data[:80], code)
    assert healthy(site.port)
    print(f"malformed HTTP: {len(cases)} cases, 0 crashes")


@settings(max_examples=100, deadline=None)
@given(junk=st.binary(min_size=1, max_size=600))
def test_random_bytes_get_4xx_or_nothing(site, junk):
    code = parse(raw(site.port, junk + b"\r\n\r\n", timeout=3))[0]
    assert code == 0 or 400 <= code < 500, (junk, code)


# ---------------------------------------------------------------------------------- WebSocket frames
def frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bool = True, rsv: int = 0,
          length: int | None = None) -> bytes:
    """One client WebSocket frame (RFC 6455 section 5.2); ``length`` overrides the declared size."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    m = 0x80 if mask else 0
    if n < 126:
        head += bytes([m | n])
    elif n < 1 << 16:
        head += bytes([m | 126]) + struct.pack("!H", n)
    else:
        head += bytes([m | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawWs:
    """A client WebSocket on a raw socket, so any bytes can be sent; the server's frames parsed."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(("GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in ws_upgrade()) + "\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(4096)
        assert buf.startswith(b"HTTP/1.1 101"), buf[:200]
        self.buf = buf.split(b"\r\n\r\n", 1)[1]
        op, payload = self.next_frame()
        assert op == 1 and b"session.created" in payload, payload[:200]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            b = self.sock.recv(65536)
            if not b:
                raise EOFError
            self.buf += b

    def next_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the server's next (unmasked) frame; (-1, b"") once the connection ended."""
        try:
            self._need(2)
            op, n, off = self.buf[0] & 0x0F, self.buf[1] & 0x7F, 2
            if n == 126:
                self._need(4)
                n, off = struct.unpack("!H", self.buf[2:4])[0], 4
            elif n == 127:
                self._need(10)
                n, off = struct.unpack("!Q", self.buf[2:10])[0], 10
            self._need(off + n)
        except (EOFError, ConnectionResetError):
            return -1, b""
        payload, self.buf = self.buf[off:off + n], self.buf[off + n:]
        return op, payload

    def close_code(self) -> int | None:
        """The status code of the server's close frame (frames before it skipped); None if the
        connection ended without one."""
        while True:
            op, payload = self.next_frame()
            if op == -1:
                return None
            if op == 8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()


def test_malformed_and_oversize_websocket_frames(site, no_errors_logged):
    text = 0x1
    cases = {  # frame bytes -> the close code the server must answer with
        "unmasked": (frame(text, b'{"type":"x"}', mask=False), 1002),
        "reserved bits": (frame(text, b"{}", rsv=0b100), 1002),
        "unknown opcode": (frame(0x3, b"x"), 1002),
        "control frame over 125 bytes": (frame(0x9, b"p" * 126), 1002),
        "fragmented ping": (frame(0x9, b"p", fin=False), 1002),
        "continuation without a start": (frame(0x0, b"x"), 1002),
        "invalid UTF-8 text": (frame(text, b"\xff\xfe\xfd"), 1007),
        "declares 2^63-1 bytes": (frame(text, length=(1 << 63) - 1), 1009),
        "declares 17 MiB": (frame(text, length=17 << 20), 1009),
        "close code 999": (frame(0x8, struct.pack("!H", 999)), 1002),
        "close with 1-byte body": (frame(0x8, b"x"), 1002),
        "text frame then a new text frame mid-message": (frame(text, b"{", fin=False) + frame(text, b"}"), 1002),
    }
    for name, (data, code) in cases.items():
        with RawWs(site.port) as ws:
            ws.send(data)
            assert ws.close_code() == code, name
    # a message over the 15 MiB message limit (under the 16 MiB frame limit) gets an error event, and
    # the session goes on
    with RawWs(site.port) as ws:
        ws.send(frame(text, b'{"type": "input_audio_buffer.append", "audio": "' + b"A" * (15 << 20) + b'"}'))
        op, payload = ws.next_frame()
        assert op == 1 and b'"error"' in payload and b"15" in payload, payload[:300]
        ws.send(frame(text, b'{"type": "input_audio_buffer.clear"}'))
        op, payload = ws.next_frame()
        assert b"input_audio_buffer.cleared" in payload, payload[:300]
    assert healthy(site.port)
    print(f"malformed frames: {len(cases) + 1} cases, 0 crashes")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.binary(min_size=1, max_size=300))
def test_random_bytes_after_the_handshake(site, junk):
    """The session either answers (error events) or closes; the server goes on."""
    with RawWs(site.port) as ws:
        ws.send(junk)
        ws.sock.settimeout(0.3)
        try:
            ws.next_frame()
        except TimeoutError:
            pass  # waiting for the rest of a frame the junk began
    assert healthy(site.port)


# ---------------------------------------------------------------------------------- churn
def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def churn_once(port: int, i: int) -> None:
    """One of three ways to come and go: a clean WebSocket close, an abrupt reset after the
    handshake, a handshake abandoned halfway; and a plain HTTP request."""
    kind = i % 3
    if kind == 0:
        with RawWs(port) as ws:
            ws.send(frame(0x8, struct.pack("!H", 1000)))
            assert ws.close_code() == 1000
    elif kind == 1:
        ws = RawWs(port)
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, no close frame
        ws.sock.close()
    else:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: webs")
    assert request(port, "/web/app.js")[0] == 200


@pytest.mark.slow  # ~25 s: opening a session costs ~0.1 s on this CPU
@pytest.mark.timeout(300)
def test_connection_churn_returns_fds_and_rss_to_baseline(site, no_errors_logged):
    port = site.port

    def settled() -> bool:
        return not site.server.sessions and not site.client.status()["sessions"]

    for i in range(30):  # warm-up: allocator pools, lazily built objects
        churn_once(port, i)
    for _ in range(200):
        if settled():
            break
        time.sleep(0.05)
    fd0, rss0, t0 = fds(), rss_kib(), time.monotonic()
    n = 300
    for i in range(n):
        churn_once(port, i)
    for _ in range(200):  # the server notices the resets and abandoned handshakes
        if settled() and fds() <= fd0:
            break
        time.sleep(0.05)
    fd1, rss1, dt = fds(), rss_kib(), time.monotonic() - t0
    print(f"churn: {n} WebSocket connects ({n // 3} clean closes, {n // 3} resets, {n // 3} abandoned "
          f"handshakes) + {n} HTTP requests in {dt:.1f} s; fds {fd0} -> {fd1}; RSS {rss0 / 1024:.1f} -> "
          f"{rss1 / 1024:.1f} MiB")
    assert settled(), (site.server.sessions, site.client.status()["sessions"])
    assert fd1 - fd0 <= 2, (fd0, fd1)
    assert rss1 - rss0 < 24 * 1024, (rss0, rss1)
    assert healthy(port)
