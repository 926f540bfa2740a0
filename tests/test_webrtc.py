"""WebRTC calls and ephemeral keys: a real server on a free port with the tiny checkpoint, an
``aiortc`` peer as the client (Opus audio both ways, the ``oai-events`` data channel), POST
bodies over raw sockets for every malformed case."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest

pytest.importorskip("aiortc")
import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from test_server import hello24k  # noqa: F401 (the fixture: one copy)
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from omnistream.apps.client_secrets import ClientSecrets
from omnistream.apps.realtime import decode_image
from omnistream.apps.server import ServerConfig, serving
from omnistream.apps.webrtc import jpeg_data_url
from omnistream.runtime.client import InProcClient, SessionOptions

pytestmark = pytest.mark.timeout(120)
RATE = 24000
SHORT = SessionOptions(max_new_tokens=8, max_speech_s=1.0, seed=0)  # seeded: a random tiny Talker may stop at once
KEY = "sk-test-key"
BROKEN = "v=0\r\nm=audio x UDP/TLS/RTP/SAVPF 111\r\n"  # (a port that is not a number)
PCMU = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=rtpmap:0 PCMU/8000\r\n"


# ---------------------------------------------------------------------------------- the server
@asynccontextmanager
async def wired(tiny, monkeypatch, **kw):
    clock = kw.pop("clock", time.time)
    async with serving(InProcClient(tiny), ServerConfig(port=0, **{"defaults": SHORT, **kw})) as server:
        server.secrets = ClientSecrets(600.0, clock=clock)  # the tests move the clock past expiry
        yield server


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 100))


async def raw(port: int, data: bytes, then: bytes | None = None, eof: bool = False) -> bytes:
    """Send ``data`` (and ``then`` after the first response bytes; ``eof``: then half-close), return
    all the server wrote."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    await w.drain()
    out = b""
    if then is not None:
        out = await asyncio.wait_for(r.read(4096), 5)
        w.write(then)
        await w.drain()
    if eof:
        w.write_eof()
    out += await asyncio.wait_for(r.read(), 10)
    w.close()
    return out


async def post(port: int, path: str, body: bytes, ctype: str, key: str | None = None) -> tuple[int, bytes, dict]:
    def go():
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                     headers={"Content-Type": ctype, **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    return await asyncio.to_thread(go)


# ---------------------------------------------------------------------------------- an aiortc client
class ClipTrack(MediaStreamTrack):
    """A microphone playing ``pcm`` (int16, 24 kHz) in real time, then silence; :meth:`say` plays
    another clip from now."""

    kind = "audio"

    def __init__(self, pcm: np.ndarray):
        super().__init__()
        self.pcm, self.pos, self.at, self.t0 = pcm, 0, 0, None

    def say(self, pcm: np.ndarray) -> None:
        self.pcm, self.at = pcm, self.pos

    async def recv(self):
        if self.t0 is None:
            self.t0 = time.monotonic()
        wait = self.t0 + self.pos / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = np.zeros(480, np.int16)
        piece = self.pcm[self.pos - self.at:self.pos - self.at + 480]
        chunk[:len(piece)] = piece
        f = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        f.sample_rate, f.pts, f.time_base = RATE, self.pos, Fraction(1, RATE)
        self.pos += 480
        return f


class Peer:
    """The client side of a call: events from the data channel, the reply audio frames received."""

    def __init__(self, mic: MediaStreamTrack | None):
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("oai-events")
        self.events: list[dict] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.audio: list[tuple[float, np.ndarray]] = []  # (arrival time, (n,) float mono at 48 kHz)
        self.channel.on("message", lambda m: self.queue.put_nowait(json.loads(m)))
        if mic is not None:
            self.pc.addTrack(mic)
        else:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.on("track", lambda t: asyncio.ensure_future(self._listen(t)))

    async def _listen(self, track):
        while True:
            try:
                f = await track.recv()
            except MediaStreamError:
                return
            x = f.to_ndarray().reshape(-1, len(f.layout.channels)).mean(axis=1) / 32768.0
            self.audio.append((time.monotonic(), x))

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def call(self, port: int, key: str | None = None) -> tuple[int, bytes, dict]:
        status, body, headers = await post(port, "/v1/realtime/calls", (await self.offer()).encode(),
                                           "application/sdp", key)
        if status == 201:
            await self.pc.setRemoteDescription(RTCSessionDescription(body.decode(), "answer"))
        return status, body, headers

    def send(self, type: str, **fields) -> None:
        self.channel.send(json.dumps({"type": type, **fields}))

    async def until(self, type: str, timeout: float = 30) -> dict:
        async def go():
            while True:
                ev = await self.queue.get()
                ev["_t"] = time.monotonic()
                self.events.append(ev)
                if ev["type"] == type:
                    return ev
        return await asyncio.wait_for(go(), timeout)

    async def close(self):
        await self.pc.close()


# ---------------------------------------------------------------------------------- tests
def test_client_secret_tokens():
    """Minted keys check out until their expiry; a forged, altered or foreign key never does."""
    now = [1_000_000.0]
    s = ClientSecrets(60.0, clock=lambda: now[0])
    tok = s.mint()
    assert tok["value"].startswith("ek_") and tok["expires_at"] == 1_000_060
    assert s.check(tok["value"]) is None
    assert s.mint(5.0)["expires_at"] == 1_000_005
    other = ClientSecrets(60.0, clock=lambda: now[0]).mint()["value"]
    assert "not valid" in s.check(other)  # another process's key (a restart revokes)
    v = tok["value"]
    flipped = v[:-3] + ("A" if v[-3] != "A" else "B") + v[-2:]
    assert "not valid" in s.check(flipped)
    assert "not valid" in s.check("ek_" + "A" * 10)
    now[0] += 60.0
    assert "expired" in s.check(tok["value"])
    assert s.parse_request(b"") == 60.0
    assert s.parse_request(b'{"expires_after": {"anchor": "created_at", "seconds": 30}}') == 30.0
    assert s.parse_request(b'{"session": {"type": "realtime", "model": "x"}}') == 60.0
    for bad in (b"{", b"[]", b'{"expires_after": {"seconds": 0}}', b'{"expires_after": {"seconds": 99999}}',
                b'{"expires_after": {"anchor": "now", "seconds": 10}}', b'{"session": {"instructions": "x"}}',
                b'{"ttl": 5}'):
        with pytest.raises(ValueError):
            s.parse_request(bad)


def test_jpeg_frames_decode_like_the_page_sends_them():
    """A camera frame becomes the data URL the WebSocket path decodes, pixels kept (JPEG-close)."""
    rng = np.random.default_rng(0)
    img = np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((20, 20, 1))).astype(np.uint8)  # (120, 160, 3) blocks
    url = jpeg_data_url(av.VideoFrame.from_ndarray(img, format="rgb24"), 1920 * 1920)
    out = decode_image(url)
    assert out.shape == img.shape
    assert np.abs(out.astype(int) - img).mean() < 6
    small = decode_image(jpeg_data_url(av.VideoFrame.from_ndarray(img, format="rgb24"), 40 * 30))
    assert small.shape[0] * small.shape[1] <= 40 * 30 and small.shape[1] > small.shape[0]


def test_post_bodies_malformed_requests_and_the_server_goes_on(tiny, monkeypatch):
    """Each malformed POST gets its 4xx in one line; GET, HEAD and WebSockets are unaffected."""

    async def go():
        async with wired(tiny, monkeypatch) as srv:
            p = srv.port
            head = "POST /v1/realtime/calls HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sdp\r\n"
            cases = [
                (head + f"Content-Length: {len(BROKEN)}\r\n\r\n{BROKEN}", 400, b"malformed SDP"),
                (head + "Content-Length: 0\r\n\r\n", 400, b"no audio"),
                (head + f"Content-Length: {len(PCMU)}\r\n\r\n{PCMU}", 400, b"no Opus"),
                (head + "Content-Length: 999999\r\n\r\n", 413, b"over the 65536 byte limit"),
                (head + "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, b"Content-Length"),
                (head + "Content-Length: x1\r\n\r\n", 400, b"Content-Length"),
                (head.replace("application/sdp", "text/plain") + "Content-Length: 3\r\n\r\nv=0", 415, b"application/sdp"),
                ("POST /v1/other HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}", 405, b"not allowed"),
                ("POST /v1/realtime/calls HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 0\r\n\r\n", 403, b"host"),
            ]
            for req, status, words in cases:
                out = await raw(p, req.encode())
                assert out.startswith(f"HTTP/1.1 {status} ".encode()), (req, out[:200])
                body = out.split(b"\r\n\r\n", 1)[1]
                assert words in body and body.count(b"\n") == 1, (req, body)
            # a body cut short: the connection is closed, no request reaches the server
            assert await raw(p, (head + "Content-Length: 50\r\n\r\nv=0").encode(), eof=True) == b""
            # Expect: 100-continue is answered before the body is sent
            sdp = b"v=0\r\n"
            out = await raw(p, (head + f"Content-Length: {len(sdp)}\r\nExpect: 100-continue\r\n\r\n").encode(), sdp)
            assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 "), out[:80]
            out = await raw(p, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 200 ")
            async with connect(f"ws://127.0.0.1:{p}/v1/realtime") as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"

    run(go())


def test_ephemeral_key_minted_used_then_refused(tiny, monkeypatch):
    """Only the server key mints; the ek_ key opens WebSockets and calls until it expires, then 401
    with the reason."""
    now = [time.time()]

    async def go():
        async with wired(tiny, monkeypatch, api_key=KEY, clock=lambda: now[0]) as srv:
            p = srv.port
            path, js = "/v1/realtime/client_secrets", "application/json"
            body = json.dumps({"expires_after": {"anchor": "created_at", "seconds": 30}}).encode()
            assert (await post(p, path, body, js))[0] == 401
            status, out, _ = await post(p, path, body, js, KEY)
            assert status == 200
            tok = json.loads(out)
            ek = tok["value"]
            assert ek.startswith("ek_") and abs(tok["expires_at"] - (now[0] + 30)) <= 1
            status, out, _ = await post(p, path, b"{}", js, ek)  # a key cannot mint keys
            assert status == 401 and b"server's API key" in out
            assert (await post(p, path, b'{"expires_after": 5}', js, KEY))[0] == 400

            async with connect(f"ws://127.0.0.1:{p}/v1/realtime", additional_headers={"Authorization": f"Bearer {ek}"}) as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"
            async with connect(f"ws://127.0.0.1:{p}/v1/realtime",
                               subprotocols=["realtime", f"openai-insecure-api-key.{ek}"]) as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"
            peer = Peer(None)
            status, _, headers = await peer.call(p, ek)
            await peer.close()
            assert status == 201 and headers["Location"].startswith("/v1/realtime/calls/rtc_")

            now[0] += 31  # expired
            with pytest.raises(InvalidStatus) as e:
                async with connect(f"ws://127.0.0.1:{p}/v1/realtime", additional_headers={"Authorization": f"Bearer {ek}"}):
                    pass
            assert e.value.response.status_code == 401 and b"expired" in e.value.response.body
            peer = Peer(None)
            status, out, _ = await peer.call(p, ek)
            await peer.close()
            assert status == 401 and b"expired" in out and out.count(b"\n") == 1
            status, _, _ = await post(p, path, b"", js, KEY)  # the server key still mints
            assert status == 200

    run(go())


@pytest.mark.slow
def test_webrtc_voice_turn(tiny, monkeypatch, hello24k):  # noqa: F811 (the fixture)
    """The clip goes in over Opus; server VAD finds the speech where it finds it in the clip itself,
    the turn is answered, the reply's audio comes back on the track for as long as the server sent
    it, and the events come on the data channel."""
    from omnistream.apps.input_buffer import InputBuffer
    from omnistream.apps.realtime import TurnDetection
    from omnistream.apps.vad import ServerVad

    td = TurnDetection()
    buf = InputBuffer()
    buf.set_vad(ServerVad(td.threshold, td.silence_duration_ms, td.prefix_padding_ms))
    clip = np.concatenate([hello24k, np.zeros(RATE, np.int16)])
    oracle = {s.kind: s.ms for s in buf.append(clip, td) if s.kind != "audio"}  # the VAD on the clip itself

    async def go():
        async with wired(tiny, monkeypatch) as srv:
            peer = Peer(ClipTrack(hello24k))
            status, answer, _ = await peer.call(srv.port)
            assert status == 201 and "opus/48000" in answer.decode().lower()
            assert (await peer.until("session.created"))["session"]
            started = await peer.until("input_audio_buffer.speech_started")
            stopped = await peer.until("input_audio_buffer.speech_stopped")
            assert abs(started["audio_start_ms"] - oracle["speech_started"]) <= 100
            assert abs(stopped["audio_end_ms"] - oracle["speech_stopped"]) <= 100
            await peer.until("input_audio_buffer.committed")
            created = await peer.until("response.created")
            done = await peer.until("response.done", 60)
            await peer.until("output_audio_buffer.stopped", 10)
            await asyncio.sleep(0.3)
            types = [e["type"] for e in peer.events]
            assert not any(t.endswith("audio.delta") for t in types)  # the audio went on the track
            assert types.index("output_audio_buffer.started") < types.index("response.done")
            r = done["response"]
            assert r["status"] in ("completed", "incomplete")  # (8 tokens at most: "incomplete" when used up)
            sent_s = int(r["metadata"]["audio_samples"]) / RATE
            assert sent_s > 0.2
            got = [x for t, x in peer.audio if t >= created["_t"]]
            heard = sum(len(x) for x in got if np.sqrt(np.mean(x ** 2)) > 0.01) / 48000  # (silence decodes to 0)
            # all of it arrives (a pipeline slower than real time leaves silent gaps, not counted); a
            # little more under CPU load, when late packets are concealed by the Opus decoder
            assert sent_s - 0.08 <= heard <= sent_s + 0.3, (heard, sent_s)
            assert len(srv.sessions) == 1
            await peer.close()
            for _ in range(100):
                if not srv.sessions:
                    break
                await asyncio.sleep(0.05)
            assert not srv.sessions  # the call's end ends the session

    run(go())


class CameraTrack(MediaStreamTrack):
    """A camera showing ``img`` (H, W, 3) RGB at ``fps``."""

    kind = "video"

    def __init__(self, img: np.ndarray, fps: float = 10.0):
        super().__init__()
        self.img, self.fps, self.n, self.t0 = img, fps, 0, None

    async def recv(self):
        if self.t0 is None:
            self.t0 = time.monotonic()
        wait = self.t0 + self.n / self.fps - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        f = av.VideoFrame.from_ndarray(self.img, format="rgb24")
        f.pts, f.time_base = self.n * 9000, Fraction(1, 90000)
        self.n += 1
        return f


@pytest.mark.slow
def test_webrtc_camera_frames_at_the_session_fps(tiny, monkeypatch):
    """A 10 fps camera track reaches the session as input_image items at its 2 fps, each frame the
    picture the camera showed."""
    rng = np.random.default_rng(1)
    img = np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((20, 20, 1))).astype(np.uint8)  # (120, 160, 3)

    async def go():
        async with wired(tiny, monkeypatch) as srv:
            peer = Peer(None)
            peer.pc.addTrack(CameraTrack(img))
            assert (await peer.call(srv.port))[0] == 201
            await peer.until("session.created")
            first = await peer.until("conversation.item.created", 10)
            assert first["item"]["content"] == [{"type": "input_image", "image_url": None}]
            await asyncio.sleep(2.0)
            while not peer.queue.empty():
                peer.events.append(peer.queue.get_nowait())
            n = sum(e["type"] == "conversation.item.created" for e in peer.events)
            assert 4 <= n <= 6, n  # 2 fps over ~2.2 s (the first at once)
            (session,) = srv.sessions
            got = session.idle_frame  # VAD on, nobody speaking: the latest frame waits for the turn
            assert got.shape == img.shape and np.abs(got.astype(int) - img).mean() < 12
            await peer.close()

    run(go())


def test_unconnected_calls_hold_a_session_slot_until_the_connect_timeout(tiny, monkeypatch):
    """A call counts against --max-sessions from its answer; a peer that never connects frees its
    slot after the connect timeout."""
    from omnistream.apps import webrtc

    monkeypatch.setattr(webrtc, "CONNECT_TIMEOUT_S", 0.5)

    async def go():
        async with wired(tiny, monkeypatch, max_sessions=1) as srv:
            peers = [Peer(None) for _ in range(3)]
            offers = [(await p.offer()).encode() for p in peers]
            assert (await post(srv.port, "/v1/realtime/calls", offers[0], "application/sdp"))[0] == 201
            status, body, _ = await post(srv.port, "/v1/realtime/calls", offers[1], "application/sdp")
            assert status == 503 and b"too many sessions" in body
            for _ in range(40):
                await asyncio.sleep(0.1)
                if not srv.sessions:
                    break
            assert not srv.sessions
            assert (await post(srv.port, "/v1/realtime/calls", offers[2], "application/sdp"))[0] == 201
            for p in peers:
                await p.close()

    run(go())


@pytest.mark.slow
def test_output_audio_buffer_clear_silences_the_reply(tiny, monkeypatch):
    """A typed question gets a spoken reply on the track; ``output_audio_buffer.clear`` drops what
    is queued (``cleared``) and truncates the item to what the track sent, ``response.cancel`` ends
    the reply and the track goes silent at once."""

    async def go():
        async with wired(tiny, monkeypatch, defaults=replace(SHORT, max_new_tokens=30, max_speech_s=4.0)) as srv:
            peer = Peer(None)
            assert (await peer.call(srv.port))[0] == 201
            await peer.until("session.created")
            peer.send("conversation.item.create", item={"type": "message", "role": "user",
                                                        "content": [{"type": "input_text", "text": "Hello"}]})
            peer.send("response.create")
            started = await peer.until("output_audio_buffer.started", 30)
            await asyncio.sleep(0.3)
            peer.send("output_audio_buffer.clear")  # (answered by the transport, not the session)
            cleared = await peer.until("output_audio_buffer.cleared", 10)
            assert cleared["response_id"] == started["response_id"]
            # the item keeps what the track sent of the reply before the clear
            cut = await peer.until("conversation.item.truncated", 10)
            heard_ms = (cleared["_t"] - started["_t"]) * 1000
            assert 100 <= cut["audio_end_ms"] <= heard_ms + 100, (cut, heard_ms)
            peer.send("response.cancel")  # (the truncation may already have ended the reply: either way one done)
            done = next((e for e in peer.events if e["type"] == "response.done"), None) \
                or await peer.until("response.done", 10)
            assert done["response"]["status"] == "cancelled"
            await asyncio.sleep(0.5)
            loud = [t for t, x in peer.audio if np.sqrt(np.mean(x ** 2)) > 0.01]
            assert loud and loud[0] < cleared["_t"]  # the reply was heard ...
            assert loud[-1] < done["_t"] + 0.2  # ... and stopped with the cancel (jitter buffer aside)
            await peer.close()

    run(go())



@pytest.mark.slow
def test_webrtc_barge_in_cuts_the_reply_audio(tiny, monkeypatch, hello24k):  # noqa: F811 (the fixture)
    """Speaking over the reply (server VAD) cancels it: the item is truncated to what was played,
    ``output_audio_buffer.cleared`` comes, and the track goes silent at once."""

    async def go():
        async with wired(tiny, monkeypatch, defaults=replace(SHORT, max_new_tokens=30, max_speech_s=4.0)) as srv:
            mic = ClipTrack(hello24k)
            peer = Peer(mic)
            assert (await peer.call(srv.port))[0] == 201
            started = await peer.until("output_audio_buffer.started", 60)
            await asyncio.sleep(0.2)
            mic.say(hello24k)  # the user talks over the reply
            await peer.until("input_audio_buffer.speech_started", 10)
            got = {}  # (their order varies: the reply's end races the session's truncation)
            while len(got) < 3:
                ev = await asyncio.wait_for(peer.queue.get(), 10)
                ev["_t"] = time.monotonic()
                peer.events.append(ev)
                if ev["type"] in ("conversation.item.truncated", "output_audio_buffer.cleared", "response.done"):
                    got[ev["type"]] = ev
            truncated, cleared, done = (got[k] for k in ("conversation.item.truncated", "output_audio_buffer.cleared",
                                                         "response.done"))
            assert done["response"]["id"] == started["response_id"] == cleared["response_id"]
            assert done["response"]["status"] == "cancelled"
            assert truncated["audio_end_ms"] > 0
            await asyncio.sleep(0.5)
            loud = [t for t, x in peer.audio if t > started["_t"] and np.sqrt(np.mean(x ** 2)) > 0.01]
            assert loud and loud[-1] < cleared["_t"] + 0.2
            await peer.close()

    run(go())
