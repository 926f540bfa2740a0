"""The server's HTTP front door (omnistream/apps/server.py): what reaches the static files, the
WebSocket and /status, seen on the wire.

Requests are written byte by byte on a raw socket (urllib and websockets' client would fix or
refuse the malformed ones), against the real RealtimeServer over the in-process pipeline, which
runs on its own event loop thread (:class:`ThreadServer`) so a test can also be a hypothesis test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import threading

import pytest

from omnistream.apps.server import WEB_DIR, RealtimeServer, ServerConfig, bind_socket
from omnistream.runtime.client import InProcClient

WS_KEY = base64.b64encode(os.urandom(16)).decode()


class ThreadServer:
    """A RealtimeServer over ``client`` on a background event loop; ``loop_errors`` collects what
    the loop's exception handler saw (an unhandled exception in any connection's task)."""

    def __init__(self, client, **config):
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-http-server", daemon=True)
        self.thread.start()
        self.client = client
        self.server = RealtimeServer(client, ServerConfig(port=0, **config))
        self.run(client.start())
        self.run(self.server.start())
        self.port = self.server.port

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.run(self.server.close())
            self.run(self.client.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a fresh connection; the server's answer: its head, and its body up to
    Content-Length (a 101 has none: the WebSocket that follows is not read); b"" if none came."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            head, sep, body = out.partition(b"\r\n\r\n")
            if sep:
                if head.startswith(b"HTTP/1.1 101"):
                    return head + sep
                n = next((int(v) for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])
                          if k.strip().lower() == b"content-length"), None)
                if n is not None and len(body) >= n:
                    return out
            try:
                b = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                return out
            if not b:
                return out
            out += b


def parse(resp: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers lowercased, body) of one HTTP/1.1 response; status 0: no answer at all."""
    if not resp:
        return 0, {}, b""
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, body


def request(port: int, path: str = "/", method: str = "GET", headers: list[tuple[str, str]] | None = None,
            host: str | None = "127.0.0.1", version: str = "HTTP/1.1") -> tuple[int, dict[str, str], bytes]:
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers or ()]
    return parse(raw(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")))


def ws_upgrade(path: str = "/v1/realtime") -> list[tuple[str, str]]:
    """The headers of a WebSocket opening handshake (RFC 6455 section 4.1)."""
    return [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", WS_KEY),
            ("Sec-WebSocket-Version", "13")]


@pytest.fixture
def server(tiny):
    made = []

    def make(client=None, **config):
        made.append(ThreadServer(client or InProcClient(tiny), **config))
        return made[-1]

    yield make
    for s in made:
        s.close()
        assert not s.loop_errors, s.loop_errors


# ---------------------------------------------------------------------------------- DNS rebinding
def test_host_header_must_name_this_server(server):
    """A page on a rebinding domain (evil.example resolving to 127.0.0.1) sends Host and Origin
    evil.example: it gets 403 for HTTP and for the WebSocket, though no API key is set."""
    srv = server(allowed_hosts=("omni.lan", ".example.org"))
    p = srv.port
    rebinding = f"evil.example:{p}"
    assert request(p, "/status", host=rebinding)[0] == 403
    assert request(p, "/", host=rebinding)[0] == 403
    code, _, body = request(p, "/v1/realtime", host=rebinding,
                            headers=[*ws_upgrade(), ("Origin", f"http://{rebinding}")])
    assert code == 403 and b"evil.example" in body
    # names this server answers to: IP literals, localhost names, --allowed-hosts (".x" = subdomains too)
    for ok in (f"127.0.0.1:{p}", f"[::1]:{p}", "localhost", f"LOCALHOST:{p}", f"app.localhost:{p}",
               "10.1.2.3", f"omni.lan:{p}", "example.org", "a.b.example.org"):
        assert request(p, "/health", host=ok)[0] == 200, ok
    for bad in ("omni.lan.evil.example", "notexample.org", "evil.example.", "127.0.0.1.nip.io"):
        assert request(p, "/health", host=bad)[0] == 403, bad
    code, h, _ = request(p, "/v1/realtime", host=f"localhost:{p}", headers=[*ws_upgrade(),
                                                                           ("Origin", f"http://localhost:{p}")])
    assert code == 101 and h["upgrade"].lower() == "websocket"
    # malformed or missing Host: 400 (HTTP/1.0 may omit it)
    for bad in ("a b", f"127.0.0.1:{p}x", "user@127.0.0.1", "127.0.0.1/x", ""):
        assert request(p, "/health", host=bad)[0] == 400, bad
    assert request(p, "/health", host=None)[0] == 400
    assert request(p, "/health", host=None, version="HTTP/1.0")[0] == 200


def test_allowed_hosts_star_turns_the_check_off(server):
    srv = server(allowed_hosts=("*",))
    assert request(srv.port, "/health", host="anything.example")[0] == 200


# ---------------------------------------------------------------------------------- malformed requests
def test_malformed_requests_get_4xx(server):
    """Duplicate Host/Origin/Authorization used to give 500, a non-ASCII path no answer at all:
    every one gets a 400 now, and the server goes on."""
    srv = server(api_key="k")
    p = srv.port
    key = ("Authorization", "Bearer k")
    dups = {"Host": [key, ("Host", "127.0.0.1")],  # request() sends the first Host
            "Origin": [key, ("Origin", f"http://127.0.0.1:{p}"), ("Origin", f"http://127.0.0.1:{p}")],
            "Authorization": [key, key]}
    for name, headers in dups.items():
        for path, extra in (("/status", []), ("/v1/realtime", ws_upgrade())):
            code, _, body = request(p, path, headers=[*extra, *headers])
            assert code == 400 and name.encode() in body, (name, path, code, body)
    for line in ("GET /web/\u00e9 HTTP/1.1".encode(), "GET /caf\u00e9 HTTP/1.1".encode("latin-1"), b"GET / HTTP/2.0",
                 b"GET /", b"\x00\x01\x02", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello",
                 b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"):
        data = line if b"\r\n\r\n" in line else line + b"\r\nHost: 127.0.0.1\r\n\r\n"
        code, _, body = parse(raw(p, data))
        assert code == 400 and body.startswith(b"bad request"), (line, code, body)
    assert request(p, "/health")[0] == 200


def test_only_get_and_head_reach_the_static_files(server):
    srv = server()
    p = srv.port
    index = (WEB_DIR / "index.html").read_bytes()
    for method in ("POST", "PUT", "DELETE", "TRACE", "OPTIONS", "PATCH", "CONNECT", "FOO"):
        for path in ("/", "/web/app.js", "/status", "/health", "/v1/realtime"):
            code, h, body = request(p, path, method)
            assert code == 405 and h["allow"] == "GET, HEAD" and index not in body, (method, path, code)
    code, h, body = request(p, "/", "HEAD")
    assert code == 200 and body == b"" and int(h["content-length"]) == len(index)
    code, h, body = request(p, "/")
    assert code == 200 and body == index and int(h["content-length"]) == len(index)


# ---------------------------------------------------------------------------------- /status, config
def test_status_without_the_key_gives_counts_only(server):
    """With --api-key, /status without it shows counts; with it, the operator data (pids, session
    ids, queues); the counts agree with that data."""
    srv = server(api_key="sekret")
    p = srv.port
    auth = [("Authorization", "Bearer sekret")]
    with socket.create_connection(("127.0.0.1", p)) as ws:  # one session open while we look
        ws.sendall((f"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in [*ws_upgrade(), *auth]) + "\r\n").encode())
        assert ws.recv(4096).startswith(b"HTTP/1.1 101")
        for _ in range(100):
            code, _, body = request(p, "/status", headers=auth)
            full = json.loads(body)
            if full["sessions"]:
                break
            threading.Event().wait(0.05)
        for headers in ([], [("Authorization", "Bearer wrong")], [("Authorization", "sekret")]):
            code, h, body = request(p, "/status", headers=headers)
            counts = json.loads(body)
            assert code == 200 and h["content-type"] == "application/json"
            assert set(counts) == {"connections", "stages_alive", "stages_total"}, counts
            assert b"pid" not in body and full["sessions"][0]["id"].encode() not in body
    assert code == 200 and len(full["sessions"]) == 1 and "queues" in full and "pid" in full["stages"][0]
    assert counts == {"connections": 1, "stages_alive": sum(s["alive"] for s in full["stages"]),
                      "stages_total": len(full["stages"])}
    assert {k: full[k] for k in counts} == counts


def test_status_is_full_without_a_configured_key(server):
    srv = server()
    st = json.loads(request(srv.port, "/status")[2])
    assert "stages" in st and "pid" in st["stages"][0] and "sessions" in st


def test_config_json_tells_the_page_whether_to_ask_for_a_key(server):
    assert json.loads(request(server(api_key="k").port, "/config.json")[2])["api_key_required"] is True
    import importlib.util

    assert json.loads(request(server().port, "/config.json")[2]) == {
        "api_key_required": False, "realtime_path": "/v1/realtime", "calls_path": "/v1/realtime/calls",
        "client_secrets_path": "/v1/realtime/client_secrets", "webrtc": importlib.util.find_spec("aiortc") is not None}


# ---------------------------------------------------------------------------------- admission
class BusyClient(InProcClient):
    """The real in-process pipeline whose admission check says what the test sets."""

    reason: str | None = None
    fail = False

    def admission(self) -> str | None:
        if self.fail:
            raise RuntimeError("scheduler state unreadable")
        return self.reason


def test_admission_reason_refuses_a_new_session_with_503(server, tiny):
    client = BusyClient(tiny)
    srv = server(client)
    p = srv.port
    client.reason = "the GPU is at 97% of real time with 3 sessions\nsecond line"
    code, h, body = request(p, "/v1/realtime", headers=ws_upgrade())
    assert code == 503 and h["retry-after"] == "5"
    assert body == b"server busy: the GPU is at 97% of real time with 3 sessions\n", body
    code, _, body = request(p, "/health")  # /health says what admission says (a balancer routes elsewhere)
    assert code == 503 and json.loads(body) == {"status": "full", "sessions": 0,
                                                "reason": "the GPU is at 97% of real time with 3 sessions"}
    client.reason, client.fail = None, True
    code, _, body = request(p, "/v1/realtime", headers=ws_upgrade())
    assert code == 503 and b"admission check failed" in body  # fail closed, not a 500
    client.fail = False
    assert request(p, "/v1/realtime", headers=ws_upgrade())[0] == 101


# ---------------------------------------------------------------------------------- serve: bind first
def test_serve_on_a_busy_port_fails_at_once_before_loading_the_model(tmp_path, capsys):
    """The port is bound before the model loads: a port in use (or out of range) is one line and
    exit code 2, even with a model that does not exist (the load would have failed otherwise)."""
    from omnistream.cli import main

    missing = str(tmp_path / "no-such-model")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["serve", "--model", missing, "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"omnistream: error: cannot listen on 127.0.0.1:{port}: Address already in use", err
    assert not any("Traceback" in line or "no-such-model" in line for line in err), err
    for bad in ("99999", "-1"):  # refused by the argument parser or by bind_socket: one line either way
        try:
            code = main(["serve", "--model", missing, "--port", bad])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "error" in err[0] and bad in err[0], err
        with pytest.raises(ValueError, match=r"a port is 0\.\.65535"):
            bind_socket("127.0.0.1", int(bad))
    assert main(["serve", "--model", missing, "--host", "no-such-host.invalid", "--port", "0"]) == 2
    assert "--host no-such-host.invalid" in capsys.readouterr().err


def test_bind_socket_listens():
    with bind_socket("127.0.0.1", 0) as s:
        port = s.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
