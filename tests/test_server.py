"""``omnistream serve`` end to end: a real server on a free port, real WebSocket clients, the tiny
checkpoint behind the in-process client. Voice turns with server VAD, barge-in, image items,
every bad-input case, the security checks, and the HTTP endpoints."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import replace

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from omnistream.apps.server import ServerConfig, serving
from omnistream.runtime.client import InProcClient, SessionOptions

pytestmark = pytest.mark.timeout(180)
RATE = 24000
SHORT = SessionOptions(max_new_tokens=8, max_speech_s=1.0, seed=0)  # seeded: a random tiny Talker may stop at once


@pytest.fixture(scope="module")
def hello24k() -> np.ndarray:
    """The bundled espeak-ng "hello" clip as int16 at 24 kHz (what a Realtime client sends)."""
    from omnistream.encoders.audio import PolyphaseResampler
    from omnistream.encoders.media import read_audio

    pcm, rate = read_audio("omnistream/assets/hello.flac")
    r = PolyphaseResampler(rate, RATE)
    x = np.concatenate([r.push(pcm.mean(axis=1)), r.flush()])
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 150))


def b64(pcm: np.ndarray) -> str:
    return base64.b64encode(pcm.astype("<i2").tobytes()).decode()


def config(**kw) -> ServerConfig:
    return ServerConfig(port=0, **{"defaults": SHORT, **kw})


class Session:
    """A raw WebSocket Realtime client that records every server event."""

    def __init__(self, ws):
        self.ws, self.events = ws, []

    async def send(self, type: str, **fields) -> None:
        await self.ws.send(json.dumps({"type": type, **fields}))

    async def append(self, pcm: np.ndarray, piece_s: float = 0.1) -> None:
        step = int(RATE * piece_s)
        for i in range(0, len(pcm), step):
            await self.send("input_audio_buffer.append", audio=b64(pcm[i:i + step]))

    async def recv(self) -> dict:
        ev = json.loads(await self.ws.recv())
        ev["_t"] = time.monotonic()
        self.events.append(ev)
        return ev

    async def until(self, type: str, timeout: float = 60) -> dict:
        async def go():
            while True:
                ev = await self.recv()
                if ev["type"] == type:
                    return ev

        return await asyncio.wait_for(go(), timeout)

    async def error(self, timeout: float = 30) -> dict:
        return (await self.until("error", timeout))["error"]

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


def url(server) -> str:
    return f"ws://127.0.0.1:{server.port}/v1/realtime"


def speech_turn(hello: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(RATE // 2, np.int16), hello, np.zeros(RATE, np.int16)])


async def text_turn_works(s: Session) -> dict:
    """The session still works: a typed turn gets a whole reply."""
    await s.send("conversation.item.create",
                 item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]})
    await s.send("response.create")
    done = await s.until("response.done")
    assert done["response"]["status"] in ("completed", "incomplete")
    return done


# ---------------------------------------------------------------------------------- voice turns
def test_voice_turn_with_server_vad(tiny, hello24k):
    """Speech in, VAD finds the turn, it is committed, the reply streams as paced 40 ms pcm16 deltas."""
    async def body():
        async with serving(InProcClient(tiny), config()) as server, connect(url(server)) as ws:
            s = Session(ws)
            created = await s.until("session.created")
            assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
            assert created["session"]["audio"]["output"]["voice"] == "Chelsie"
            await s.append(speech_turn(hello24k))
            started = await s.until("input_audio_buffer.speech_started")
            stopped = await s.until("input_audio_buffer.speech_stopped")
            # the clip's speech begins ~50 ms after the 0.5 s of silence; 300 ms prefix padding
            assert 0 <= started["audio_start_ms"] <= 500
            assert 500 + len(hello24k) * 1000 // RATE - 900 < stopped["audio_end_ms"] <= 500 + len(
                hello24k) * 1000 // RATE + 1000
            assert stopped["item_id"] == started["item_id"]
            committed = await s.until("input_audio_buffer.committed")
            assert committed["item_id"] == started["item_id"]
            await s.until("response.created")
            done = await s.until("response.done")
            types = s.types()
            for t in ("conversation.item.created", "response.output_item.added", "response.content_part.added",
                      "response.output_audio_transcript.delta", "response.output_audio.delta",
                      "response.output_audio.done", "response.output_audio_transcript.done",
                      "response.output_item.done"):
                assert t in types, t
            assert types.index("response.created") < types.index("response.output_audio.delta") < types.index(
                "response.output_audio.done") < types.index("response.done")
            deltas = [e for e in s.events if e["type"] == "response.output_audio.delta"]
            pcm = [np.frombuffer(base64.b64decode(e["delta"]), "<i2") for e in deltas]
            assert all(len(p) == 960 for p in pcm[:-1]) and 0 < len(pcm[-1]) <= 960  # 40 ms chunks
            n = sum(len(p) for p in pcm)
            r = done["response"]
            assert int(r["metadata"]["audio_samples"]) == n
            assert r["status"] in ("completed", "incomplete") and r["usage"]["output_tokens"] <= 8
            transcript = "".join(e["delta"] for e in s.events if e["type"] == "response.output_audio_transcript.delta")
            assert r["output"][0]["content"][0]["transcript"] == transcript
            # real-time pacing: the last chunk cannot leave before its start minus the 100 ms lead
            span = deltas[-1]["_t"] - deltas[0]["_t"]
            assert span >= (n - len(pcm[-1])) / RATE - 0.1 - 0.02
    run(body())


def test_manual_turn_beta_dialect(tiny, hello24k):
    """turn_detection null + the beta session shape: the client commits; events use the beta names."""
    async def body():
        async with serving(InProcClient(tiny), config()) as server, connect(url(server)) as ws:
            s = Session(ws)
            await s.until("session.created")
            await s.send("session.update", session={"modalities": ["text", "audio"], "voice": "Ethan",
                                                    "input_audio_format": "pcm16", "turn_detection": None})
            upd = (await s.until("session.updated"))["session"]
            assert upd["voice"] == "Ethan" and upd["turn_detection"] is None and upd["input_audio_format"] == "pcm16"
            await s.append(hello24k)
            await s.send("input_audio_buffer.commit")
            await s.until("input_audio_buffer.committed")
            assert "input_audio_buffer.speech_started" not in s.types()
            await s.send("response.create")
            await s.until("response.done")
            types = s.types()
            assert "response.audio.delta" in types and "response.audio_transcript.delta" in types
            assert "response.output_audio.delta" not in types
            # text-only replies use response.text.delta
            await s.send("session.update", session={"modalities": ["text"]})
            await s.until("session.updated")
            n0 = len(s.events)
            await text_turn_works(s)
            types = [e["type"] for e in s.events[n0:]]
            assert "response.text.delta" in types and "response.audio.delta" not in types
    run(body())


@pytest.mark.slow
def test_cancel_clear_and_client_truncate(tiny, hello24k):
    """response.cancel ends a reply as cancelled; conversation.item.truncate cuts the pipeline's
    context to the given audio_end_ms; input_audio_buffer.clear drops the open turn."""
    async def body():
        client = InProcClient(tiny)
        # seeded: an unseeded random Talker may end its speech before the cancel arrives
        cfg = config(defaults=SessionOptions(max_new_tokens=40, max_speech_s=2.0, seed=5), server_vad=False)
        async with serving(client, cfg) as server, connect(url(server)) as ws:
            s = Session(ws)
            created = await s.until("session.created")
            assert created["session"]["audio"]["input"]["turn_detection"] is None
            await s.append(hello24k[:RATE])
            await s.send("input_audio_buffer.clear")
            await s.until("input_audio_buffer.cleared")
            await s.send("input_audio_buffer.commit")
            assert (await s.error())["code"] == "input_audio_buffer_commit_empty"  # the clear emptied it
            await s.append(hello24k)
            await s.send("input_audio_buffer.commit")
            await s.send("response.create")
            created = await s.until("response.created")
            await s.until("response.output_audio.delta")
            await s.send("response.cancel", response_id=created["response"]["id"])
            done = await s.until("response.done")
            r = done["response"]
            assert r["status"] == "cancelled" and r["status_details"]["reason"] == "client_cancelled"
            assert "conversation.item.truncated" not in s.types()  # cancel alone keeps the reply
            await s.send("conversation.item.truncate", item_id=r["output"][0]["id"], content_index=0,
                          audio_end_ms=20)
            t = await s.until("conversation.item.truncated")
            assert t["audio_end_ms"] == 20 and t["item_id"] == r["output"][0]["id"]
            conv = next(iter(client.workers["thinker"].slots.values())).state
            assert conv.last_reply[1] == min(1, r["usage"]["output_tokens"])  # 20 ms = 480 samples = 1 code
            await text_turn_works(s)
    run(body())


def test_barge_in_cancels_and_truncates(tiny, hello24k):
    """Talking over a reply: audio stops within one chunk, response.done is cancelled, and the
    pipeline's conversation keeps only the reply tokens the user heard."""
    async def body():
        client = InProcClient(tiny)
        # seeded: the reply must still be playing when the user talks over it
        cfg = config(defaults=SessionOptions(max_new_tokens=40, max_speech_s=2.0, seed=0))
        async with serving(client, cfg) as server, connect(url(server)) as ws:
            s = Session(ws)
            await s.until("session.created")
            await s.append(speech_turn(hello24k))
            await s.until("response.created")
            await s.until("response.output_audio.delta")
            await s.append(hello24k[: RATE // 2], piece_s=0.04)  # the user talks over the reply
            started = await s.until("input_audio_buffer.speech_started")
            done = await s.until("response.done")
            after = s.events[s.events.index(started):]
            assert sum(e["type"] == "response.output_audio.delta" for e in after) <= 1
            r = done["response"]
            assert r["status"] == "cancelled" and r["status_details"]["reason"] == "turn_detected"
            trunc = next((e for e in s.events if e["type"] == "conversation.item.truncated"), None)
            trunc = trunc or await s.until("conversation.item.truncated")
            sent = sum(len(base64.b64decode(e["delta"])) // 2 for e in s.events
                       if e["type"] == "response.output_audio.delta")
            assert trunc["item_id"] == r["output"][0]["id"]
            assert 0 <= trunc["audio_end_ms"] <= sent * 1000 // RATE
            conv = next(iter(client.workers["thinker"].slots.values())).state
            kept = conv.last_reply[1]  # the Thinker's context was cut to what was played
            assert kept == min(r["usage"]["output_tokens"], math.ceil(trunc["audio_end_ms"] * RATE / 1000 / 480))
            assert kept < r["usage"]["output_tokens"]
            # the interruption is the next user turn: it ends and gets its own reply
            await s.append(np.zeros(RATE, np.int16))
            await s.until("input_audio_buffer.speech_stopped")
            n0 = len(s.events)
            done2 = await s.until("response.done")
            assert done2["response"]["status"] in ("completed", "incomplete")
            assert any(e["type"] == "response.output_audio.delta" for e in s.events[n0:])  # it speaks again
    run(body())


def test_cancel_between_replies_does_not_mute_the_next(tiny):
    """A barge-in that lands after the pipeline finished a reply (its audio still playing out)
    must not carry over: the next reply speaks."""
    from omnistream.runtime.client import AudioDelta

    async def body():
        c = InProcClient(tiny)
        await c.start()
        try:
            sid = await c.open_session(replace(SHORT, voice="Chelsie", max_speech_s=0.5))
            heard = []
            for k in range(2):
                await c.commit(sid, "hello")
                heard.append(0)
                async for e in c.respond(sid):
                    heard[-1] += len(e.pcm) if isinstance(e, AudioDelta) else 0
                if k == 0:
                    await c.cancel(sid)
                    await c.truncate(sid, 960)
            return heard
        finally:
            await c.close()

    heard = run(body())
    assert heard[0] > 0 and heard[1] > 0


def _png(img: np.ndarray, fmt: str = "PNG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_image_items(tiny):
    """input_image items (video frames) reach the vision encoder; with server VAD an idle camera
    keeps only its latest frame."""
    from omnistream.encoders.vision import synthetic_frames

    frames = [f for f, _ in synthetic_frames(4, 112, 140, fps=2, seed=0)]

    async def body():
        client = InProcClient(tiny)
        async with serving(client, config()) as server, connect(url(server)) as ws:
            s = Session(ws)
            await s.until("session.created")
            await s.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            await s.until("session.updated")
            content = [{"type": "input_image", "image_url": _png(frames[0])},
                       {"type": "input_image", "image_url": _png(frames[1], "JPEG")},
                       {"type": "input_text", "text": "what is this?"}]
            await s.send("conversation.item.create", item={"type": "message", "role": "user", "content": content})
            item = (await s.until("conversation.item.created"))["item"]
            assert [c["type"] for c in item["content"]] == ["input_image", "input_image", "input_text"]
            await s.send("response.create")
            await s.until("response.done")
            enc = next(iter(client.workers["encoders"].slots.values()))
            conv = next(iter(client.workers["thinker"].slots.values())).state
            assert enc.last_turn_frames == 2 and conv.stats.video_patches == 1
            # server VAD on, nobody speaking: three frames, only the newest joins the turn
            await s.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": {
                "type": "server_vad"}}}})
            await s.until("session.updated")
            for f in frames[1:]:
                await s.send("conversation.item.create", item={"type": "message", "role": "user", "content": [
                    {"type": "input_image", "image_url": _png(f)}]})
                await s.until("conversation.item.created")
            await s.send("response.create")
            await s.until("response.done")
            assert enc.last_turn_frames == 1 and conv.stats.video_patches == 1
    run(body())


# ---------------------------------------------------------------------------------- bad input
def test_bad_input_gets_errors_and_the_session_goes_on(tiny, hello24k):
    async def body():
        async with serving(InProcClient(tiny), config()) as server, connect(url(server)) as ws:
            s = Session(ws)
            await s.until("session.created")

            async def expect(raw, code):
                await ws.send(raw if isinstance(raw, str | bytes) else json.dumps(raw))
                err = await s.error()
                assert err["code"] == code, (raw if len(str(raw)) < 300 else str(raw)[:300], err)
                assert err["message"]
                return err

            await expect("{not json", "invalid_json")
            await expect("[1, 2]", "invalid_event")
            await expect(b"\x00\x01", "invalid_event")
            await expect({}, "missing_required_parameter")
            err = await expect({"type": "no.such.event", "event_id": "e1"}, "unknown_event_type")
            assert err["event_id"] == "e1"
            await expect({"type": "input_audio_buffer.append", "audio": "!!notbase64"}, "invalid_base64")
            await expect({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()},
                         "invalid_audio_format")
            await expect({"type": "input_audio_buffer.append"}, "missing_required_parameter")
            await expect({"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}},
                         "unsupported_audio_format")
            await expect({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 16000}}}}}, "unsupported_audio_format")
            await expect({"type": "session.update", "session": {"bogus": 1}}, "unknown_parameter")
            await expect({"type": "session.update", "session": {"voice": "Nobody"}}, "invalid_value")
            await expect({"type": "session.update", "session": {"turn_detection": {"type": "server_vad",
                                                                                   "threshold": 7}}}, "invalid_value")
            # out of order
            await expect({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty")
            await expect({"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0,
                          "audio_end_ms": 10}, "item_truncate_invalid_item_id")
            await expect({"type": "response.cancel"}, "response_cancel_not_active")
            # items
            bad_img = {"type": "message", "role": "user", "content": [
                {"type": "input_image", "image_url": "data:image/png;base64," + base64.b64encode(b"junk").decode()}]}
            await expect({"type": "conversation.item.create", "item": bad_img}, "invalid_image")
            remote = {"type": "message", "role": "user", "content": [
                {"type": "input_image", "image_url": "http://example.com/a.png"}]}
            await expect({"type": "conversation.item.create", "item": remote}, "invalid_image")
            await expect({"type": "conversation.item.create", "item": {"type": "message", "role": "tool",
                                                                       "content": [{"type": "input_text",
                                                                                    "text": "x"}]}},
                         "unsupported_item")
            # over the 15 MiB message limit (under the 16 MiB frame limit): an error, not a close
            big = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (15 * 2**20 + 100)})
            await expect(big, "message_too_large")
            # response.create while one is active
            await s.send("conversation.item.create", item={"type": "message", "role": "user",
                                                           "content": [{"type": "input_text", "text": "hi"}]})
            await s.send("response.create")
            await s.send("response.create")
            err = await s.error()
            assert err["code"] == "conversation_already_has_active_response"
            done = await s.until("response.done")
            # truncating past the audio that was sent
            item_id = done["response"]["output"][0]["id"]
            await expect({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                          "audio_end_ms": 10**6}, "invalid_value")
            # ... and the session still does a whole voice turn
            await s.append(speech_turn(hello24k))
            await s.until("input_audio_buffer.committed")
            done = await s.until("response.done")
            assert done["response"]["status"] in ("completed", "incomplete")
            assert any(e["type"] == "response.output_audio.delta" for e in s.events[-200:])
    run(body())


# ---------------------------------------------------------------------------------- security
def test_security(tiny):
    """API key (header or subprotocol), origin allow-list, session cap, frame cap, rate limit."""
    async def rejected(u, status, **kw):
        with pytest.raises(InvalidStatus) as e:
            async with connect(u, **kw):
                pass
        assert e.value.response.status_code == status

    async def body():
        cfg = config(api_key="sekret", allow_origins=("http://good.example",), max_sessions=2, rate_limit=20,
                     rate_burst=10)
        async with serving(InProcClient(tiny), cfg) as server:
            u = url(server)
            good = {"additional_headers": {"Authorization": "Bearer sekret"}}
            await rejected(u, 401)
            await rejected(u, 401, additional_headers={"Authorization": "Bearer wrong"})
            await rejected(u, 401, subprotocols=["realtime", "openai-insecure-api-key.wrong"])
            await rejected(u, 403, origin="http://evil.example", **good)
            await rejected(f"ws://127.0.0.1:{server.port}/v1/elsewhere", 404, **good)
            async with connect(u, subprotocols=["realtime", "openai-insecure-api-key.sekret"],
                               origin="http://good.example") as ws:
                assert ws.subprotocol == "realtime"  # the key is never echoed
                assert json.loads(await ws.recv())["type"] == "session.created"
                async with connect(u, origin=f"http://127.0.0.1:{server.port}", **good) as ws2:  # same origin
                    assert json.loads(await ws2.recv())["type"] == "session.created"
                    await rejected(u, 503, **good)  # max_sessions=2
                # rate limit: a burst of 40 events at 20/s with a bucket of 10
                for _ in range(40):
                    await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
                s = Session(ws)
                codes = []
                while len(codes) < 40:
                    ev = await s.recv()
                    codes.append(ev["error"]["code"] if ev["type"] == "error" else ev["type"])
                assert codes.count("rate_limit_exceeded") >= 20 and codes.count("input_audio_buffer.cleared") >= 10
            # a frame over the 16 MiB hard limit closes that connection (1009) ...
            ws = await connect(u, max_size=None, **good)
            await ws.recv()
            with pytest.raises(ConnectionClosed):
                await ws.send("x" * (17 * 2**20))
                while True:
                    await ws.recv()
            assert ws.close_code == 1009
            # ... and the server goes on
            async with connect(u, **good) as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"
    run(body())


# ---------------------------------------------------------------------------------- HTTP
def _get(u: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(u, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_health_status_and_static_files(tiny, tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    (web / "index.html").write_text("<!doctype html><title>omni</title>")
    (web / "app.js").write_text("console.log(1)")
    (tmp_path / "secret.txt").write_text("nope")

    async def body():
        cfg = config(api_key="k", web_dir=web)
        async with serving(InProcClient(tiny), cfg) as server:
            base = f"http://127.0.0.1:{server.port}"
            code, _, b = await asyncio.to_thread(_get, base + "/health")
            assert code == 200 and json.loads(b)["status"] == "ok"
            code, _, b = await asyncio.to_thread(_get, base + "/status")
            assert code == 200 and "stages" not in json.loads(b)  # without the key: counts only
            async with connect(url(server), additional_headers={"Authorization": "Bearer k"}) as ws:
                await ws.recv()
                code, h, b = await asyncio.to_thread(_get, base + "/status", {"Authorization": "Bearer k"})
                st = json.loads(b)
                assert code == 200 and h["Content-Type"] == "application/json"
                assert {"name", "pid", "alive", "last_heartbeat_s"} <= set(st["stages"][0])
                assert st["stages"][0]["alive"] is True
                assert len(st["sessions"]) == 1 and st["connections"] == 1 and "queues" in st
            code, h, b = await asyncio.to_thread(_get, base + "/")
            assert code == 200 and b"<title>omni</title>" in b and h["Content-Type"].startswith("text/html")
            code, h, b = await asyncio.to_thread(_get, base + "/web/app.js")
            assert code == 200 and h["Content-Type"].startswith("text/javascript")
            for bad in ("/web/../secret.txt", "/web/%2e%2e/secret.txt", "/web/.hidden", "/web/nope.js", "/nope",
                        "/web//etc/passwd"):
                code, _, b = await asyncio.to_thread(_get, base + bad)
                assert code == 404 and b"nope" not in b, bad
    run(body())


def test_real_web_dir_is_served_when_present(tiny):
    from omnistream.apps.server import WEB_DIR

    if not (WEB_DIR / "index.html").exists():
        pytest.skip("the browser client's files are not there yet")

    async def body():
        async with serving(InProcClient(tiny), config()) as server:
            code, _, b = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/")
            assert code == 200 and b == (WEB_DIR / "index.html").read_bytes()
    run(body())


def test_cli_serve_parses():
    from omnistream.cli import build_parser

    a = build_parser().parse_args(["serve", "--model", "m", "--allow-origin", "http://a", "--allow-origin",
                                   "http://b", "--api-key", "k", "--max-sessions", "3", "--rate-limit", "5"])
    assert a.host == "127.0.0.1" and a.port == 8000 and a.allow_origin == ["http://a", "http://b"]
    assert a.func.__name__ == "_cmd_serve" and a.layout is None


@pytest.mark.slow
def test_voice_turn_over_the_stage_runtime(tiny_dir, hello24k):
    """The same server over the ZeroMQ stage runtime (``serve --layout all-in-one``)."""
    procclient = pytest.importorskip("omnistream.runtime.procclient")

    async def body():
        # the hang watchdog is the runtime's own test; here a slow shared CPU must not trip it
        client = procclient.MultiProcClient(str(tiny_dir), "all-in-one", max_sessions=2, hang_timeout_s=120)
        async with serving(client, config()) as server, connect(url(server)) as ws:
            s = Session(ws)
            created = await s.until("session.created")
            assert created["session"]["audio"]["output"]["voice"] == "Chelsie"  # read from spk_dict.pt
            code, _, b = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/status")
            assert code == 200 and all(st["pid"] for st in json.loads(b)["stages"])
            await s.append(speech_turn(hello24k))
            await s.until("input_audio_buffer.speech_stopped")
            done = await s.until("response.done", timeout=120)
            assert done["response"]["status"] in ("completed", "incomplete"), done
            assert any(e["type"] == "response.output_audio.delta" for e in s.events)
    run(body())
