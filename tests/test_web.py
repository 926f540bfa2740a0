"""The browser client (omnistream/apps/web/) in headless Chromium with fake media devices.

Chromium's fake capture devices are fed from files this module writes: a WAV (the bundled
espeak-ng "hello" clip at 48 kHz, 16-bit, with silence around it so server VAD sees the end of
speech) and a Y4M (4:2:0 frames: red, green, blue seconds with a moving white square). The
page's `window.omni` counters are what the assertions read: they count real work (worklet chunks,
canvas frames, played samples), and the recorded PCM is checked against the source clip
resampled by omnistream's own polyphase resampler, an implementation independent of the page's.

The safety tests check what a link can make the page do (nothing: it connects only to its own
server and captures only after a click), the API-key prompt against `omnistream serve --api-key`
(and a server whose config.json answers 401), and the per-turn latency breakdown against a scripted
server whose own clock is the oracle. The controls are checked by what reaches the server: push to
talk (audio only while held, as long as the test held it; each release a committed turn), the
interrupt button (response.cancel, playback stopped at once, the item truncated where it stopped),
mute (digital silence while muted).

Playwright drives the Debian `chromium` binary (`executable_path`); no browser is downloaded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import gc
import http.server
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from omnistream.apps.server import RealtimeServer
from omnistream.encoders.audio import PolyphaseResampler
from omnistream.encoders.media import read_audio, write_wav

WEB = Path(__file__).resolve().parents[1] / "omnistream" / "apps" / "web"
HELLO = Path(__file__).resolve().parents[1] / "omnistream" / "assets" / "hello.flac"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="Debian chromium is not installed (apt-get install -y chromium)"
)
async_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed (pip install playwright)")

WAV_RATE = 48000
LEAD_S, TAIL_S = 1.0, 3.0
Y4M_FPS, Y4M_SECONDS = 10, 3
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # one second each


# ---------------------------------------------------------------------------- media fixtures
def hello_pcm(rate: int) -> np.ndarray:
    """The bundled clip as mono float32 at ``rate`` (omnistream's polyphase resampler)."""
    pcm, r = read_audio(HELLO)  # (n, channels)
    mono = pcm.mean(axis=1).astype(np.float32)
    if r == rate:
        return mono
    rs = PolyphaseResampler(r, rate)
    return np.concatenate([rs.push(mono), rs.flush()])


def write_input_wav(path: Path) -> Path:
    """48 kHz 16-bit mono WAV: LEAD_S silence, the clip, TAIL_S silence (what Chromium's fake mic reads)."""
    speech = hello_pcm(WAV_RATE)
    pcm = np.concatenate([np.zeros(int(LEAD_S * WAV_RATE), np.float32), speech,
                          np.zeros(int(TAIL_S * WAV_RATE), np.float32)])
    return write_wav(path, pcm, rate=WAV_RATE)


def rgb_to_yuv601(rgb) -> tuple[int, int, int]:
    """BT.601 limited-range Y'CbCr of an 8-bit RGB colour (what Chromium assumes for Y4M)."""
    r, g, b = (c / 255.0 for c in rgb)
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    cb = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    cr = 128 + 112.0 * r - 93.786 * g - 18.214 * b
    return round(y), round(cb), round(cr)


def write_y4m(path: Path, width: int = 320, height: int = 240, fps: int = Y4M_FPS, seconds: int = Y4M_SECONDS) -> Path:
    """A raw YUV4MPEG2 4:2:0 clip: one colour per second from COLOURS, a white 40x40 square moving across."""
    assert width % 2 == 0 and height % 2 == 0
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(fps * seconds):
            y0, u0, v0 = rgb_to_yuv601(COLOURS[(i // fps) % len(COLOURS)])
            y = np.full((height, width), y0, np.uint8)
            u = np.full((height // 2, width // 2), u0, np.uint8)
            v = np.full((height // 2, width // 2), v0, np.uint8)
            x = (i * 8) % (width - 40)
            y[100:140, x:x + 40] = 235
            u[50:70, x // 2:x // 2 + 20] = 128
            v[50:70, x // 2:x // 2 + 20] = 128
            f.write(b"FRAME\n" + y.tobytes() + u.tobytes() + v.tobytes())
    return path


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fake-media")
    return write_input_wav(d / "hello48k.wav"), write_y4m(d / "colours.y4m")


def test_media_files_are_what_chromium_reads(media_files):
    """The fixtures themselves: WAV rate/length/content, Y4M header and frame size."""
    wav, y4m = media_files
    pcm, rate = read_audio(wav)
    speech = hello_pcm(WAV_RATE)
    assert rate == WAV_RATE and pcm.shape[1] == 1
    assert len(pcm) == int(LEAD_S * WAV_RATE) + len(speech) + int(TAIL_S * WAV_RATE)
    lead = int(LEAD_S * WAV_RATE)
    np.testing.assert_allclose(pcm[lead:lead + len(speech), 0], speech, atol=1.5 / 32768)
    assert not pcm[:lead].any() and not pcm[lead + len(speech):].any()
    data = y4m.read_bytes()
    header, rest = data.split(b"\n", 1)
    assert header.split()[1:4] == [b"W320", b"H240", f"F{Y4M_FPS}:1".encode()]
    frame = len(b"FRAME\n") + 320 * 240 * 3 // 2
    assert len(rest) == frame * Y4M_FPS * Y4M_SECONDS
    assert rgb_to_yuv601((255, 0, 0)) == (81, 90, 240)  # the textbook BT.601 values for red


# ---------------------------------------------------------------------------- browser
def chromium_args(wav: Path, y4m: Path, loop_audio: bool = False) -> list[str]:
    return [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}{'' if loop_audio else '%noloop'}",
        f"--use-file-for-fake-video-capture={y4m}",
        "--autoplay-policy=no-user-gesture-required",
    ]


@contextlib.asynccontextmanager
async def chromium(wav: Path, y4m: Path, profile: Path, loop_audio: bool = False):
    """Chromium on a fresh profile with the fake mic/camera; yields an async function making pages.

    Playwright's async API, not the sync one: the sync API switches greenlets, which on Python 3.11
    leaves the interpreter's recursion bookkeeping off, and a later import that pytest rewrites fails
    with "SystemError: AST constructor recursion depth mismatch"."""
    async with async_api.async_playwright() as p:
        ctx = await p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True,
            args=chromium_args(wav, y4m, loop_audio), viewport={"width": 390, "height": 844},  # a phone
        )
        ctx.set_default_timeout(60_000)
        logs: list[str] = []

        async def new_page():
            page = await ctx.new_page()
            page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: logs.append(f"pageerror: {e}"))
            return page

        new_page.logs = logs
        try:
            yield new_page
        finally:
            await ctx.close()


class _WebOnly(http.server.SimpleHTTPRequestHandler):
    """GET / and /web/<file> as the server maps them; nothing else (no /v1/realtime)."""

    def translate_path(self, path):
        path = path.split("?", 1)[0]
        if path == "/":
            return str(WEB / "index.html")
        if path.startswith("/web/") and "/" not in path[5:] and not path[5:].startswith("."):
            return str(WEB / path[5:])
        return str(WEB / "does-not-exist")

    def log_message(self, *args):
        pass


class _WebNeedsKey(_WebOnly):
    """The page's files, and 401 for config.json (a server that will not say anything without the key)."""

    def do_GET(self):
        if self.path.split("?", 1)[0] == "/config.json":
            self.send_error(401, "API key required")
        else:
            super().do_GET()


@contextlib.contextmanager
def serve_static(handler):
    """``handler`` (a _WebOnly) on a loopback port, in a thread; yields its base URL."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(WEB)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def static_server(request):
    with serve_static(getattr(request, "param", _WebOnly)) as url:
        yield url


def recorded_pcm(chunks: list[str]) -> np.ndarray:
    raw = b"".join(base64.b64decode(c) for c in chunks)
    return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0


def best_alignment(x: np.ndarray, ref: np.ndarray) -> tuple[float, int]:
    """Max normalised cross-correlation of ``ref`` inside ``x`` (FFT), and its lag."""
    n = len(x) + len(ref)
    size = 1 << (n - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(x, size) * np.conj(np.fft.rfft(ref, size)), size)[: len(x) - len(ref) + 1]
    c = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
    energy = c[len(ref):] - c[: len(x) - len(ref) + 1]  # sum of x**2 over each window
    score = xc / (np.sqrt(energy * float(ref @ ref)) + 1e-12)
    lag = int(np.argmax(score))
    return float(score[lag]), lag


@pytest.mark.timeout(240)
def test_page_captures_fake_mic_and_camera(media_files, static_server, tmp_path):
    """Without a realtime endpoint: the page loads on a phone-sized screen, reports the failed
    connection, and still captures: the mic PCM it would send is the clip at 24 kHz, the camera
    frames show the Y4M's colours."""

    async def body():
        async with chromium(*media_files, tmp_path / "profile") as browser:
            page = await browser()
            await page.goto(f"{static_server}/?aec=0&record=1")
            assert await page.evaluate("window.omni.state") == "idle"
            assert (await page.title()).startswith("omnistream")
            await page.get_by_role("button", name="Start").click()
            await page.wait_for_function("window.omni.state === 'error' || window.omni.state === 'closed'")
            assert await page.get_by_role("button", name="Reconnect").is_visible()
            # the clip is 1 s + 3.5 s + 3 s; 6 s of mic and 12 camera frames cover all three colours
            await page.wait_for_function("window.omni.capturedChunks >= 150 && window.omni.capturedFrames >= 12",
                                         timeout=150_000)
            return await page.evaluate("window.omni"), browser.logs

    omni, logs = asyncio.run(body())
    assert omni["sentAudioChunks"] == 0 and omni["sentFrames"] == 0  # nothing to send to
    assert not [m for m in logs if m.startswith("pageerror")], logs

    pcm = recorded_pcm(omni["recorded"])  # (n,) 24 kHz, as the page would send it
    assert len(pcm) == 960 * len(omni["recorded"])
    ref = hello_pcm(24000)
    score, lag = best_alignment(pcm, ref)
    assert score > 0.9, (score, lag)  # same waveform: rate, sign and scale survived the worklet
    gain = float(pcm[lag:lag + len(ref)] @ ref / (ref @ ref))
    assert 0.8 < gain < 1.25, gain
    if lag > 2400:
        assert np.abs(pcm[:lag - 2400]).max() < 0.01  # the lead silence stays silent

    dominant = {int(np.argmax(m)) for m in omni["frameMeans"] if max(m) - sorted(m)[1] > 60}
    assert dominant == {0, 1, 2}, omni["frameMeans"]  # red, green and blue seconds all seen


@pytest.mark.timeout(120)
def test_page_is_usable_at_phone_width(media_files, static_server, tmp_path):
    """Nothing overflows a 390 px screen; controls are labelled buttons with touch-sized targets."""

    async def body():
        async with chromium(*media_files, tmp_path / "profile") as browser:
            page = await browser()
            await page.goto(static_server + "/")
            assert await page.evaluate("document.documentElement.scrollWidth") <= 390
            for name in ("Start", "Stop", "Mute", "Interrupt"):
                box = await page.get_by_role("button", name=name).bounding_box()
                assert box["height"] >= 44 and box["x"] + box["width"] <= 390
            assert await page.get_by_role("status").inner_text() == "idle"
            assert await page.get_by_role("log").count() == 1
            assert await page.get_by_role("checkbox", name="Camera").is_checked()
            assert not await page.get_by_role("checkbox", name="Push to talk").is_checked()
            assert not await page.get_by_role("button", name="Hold to talk").is_visible()  # only with push to talk
            # the pickers and the event log are collapsed panels; the latency panel is open
            assert not await page.locator("#mic-select").is_visible() and not await page.locator("#event-log").is_visible()
            await page.locator("summary", has_text="Event log").click()
            assert await page.evaluate("document.querySelector('details.event-log').open")  # (empty until events)
            assert await page.get_by_role("img", name="Latency of the last 20 turns: ms after the end of speech").is_visible()
            assert await page.evaluate("document.documentElement.scrollWidth") <= 390

    asyncio.run(body())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("static_server", [_WebNeedsKey], indirect=True)
def test_key_prompt_when_the_server_answers_401(media_files, static_server, tmp_path):
    """config.json answering 401: the page asks for the key at Start, and neither connects nor
    captures before the user gave one."""

    async def body():
        async with chromium(*media_files, tmp_path / "profile") as browser:
            page = await browser()
            await page.add_init_script(COUNT_GET_USER_MEDIA)
            await page.goto(static_server + "/?camera=0")
            await page.get_by_role("button", name="Start").click()
            await page.get_by_label("API key").wait_for()
            note = await page.locator("#key-note").inner_text()
            return note, await page.evaluate("[window.omni.state, window.omni.apiKeyRequired, window.__getUserMedia]")

    note, state = asyncio.run(body())
    assert note == "This server needs an API key." and state == ["idle", True, 0], (note, state)


class _WebMintsKeys(_WebOnly):
    """A server with ephemeral keys, as issue 14 specifies them: config.json says a key is needed,
    ``POST /v1/realtime/client_secrets`` with ``Authorization: Bearer KEY`` mints TOKEN (401 for any
    other key); the WebSocket handshake is recorded (its subprotocols) and refused."""

    KEY, TOKEN = "long-lived-key", "ek_short-lived-token"
    posts: list[str]  # the Authorization headers of the mint requests
    handshakes: list[str]  # the Sec-WebSocket-Protocol headers of the WebSocket attempts

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/config.json":
            return self._reply(200, json.dumps({"api_key_required": True}).encode(), "application/json")
        if path == "/v1/realtime":
            self.handshakes.append(self.headers.get("Sec-WebSocket-Protocol", ""))
            return self._reply(401, b"unauthorized\n", "text/plain")
        super().do_GET()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/realtime/client_secrets":
            return self._reply(404, b"not found\n", "text/plain")
        self.posts.append(self.headers.get("Authorization", ""))
        if self.headers.get("Authorization") != f"Bearer {self.KEY}":
            return self._reply(401, b"unauthorized: wrong key\nmore text\n", "text/plain")
        body = {"value": self.TOKEN, "expires_at": int(time.time()) + 600}
        self._reply(200, json.dumps(body).encode(), "application/json")

    def _reply(self, code: int, body: bytes, ctype: str):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.timeout(120)
def test_key_prompt_exchanges_the_key_for_an_ephemeral_one(media_files, tmp_path):
    """Where the server mints ephemeral keys, the page exchanges the typed key for one at once: a
    wrong key is refused by the mint's 401 (its reason shown, no connection tried); the right one
    is never presented to the WebSocket nor kept: the tab keeps only the token. An expired token
    brings the prompt back instead of a doomed connection."""

    class Handler(_WebMintsKeys):
        posts, handshakes = [], []

    async def body(url):
        async with chromium(*media_files, tmp_path / "profile") as browser:
            page = await browser()
            await page.goto(url + "/?camera=0")
            await page.get_by_role("button", name="Start").click()
            await page.get_by_label("API key").fill("wrong")
            await page.get_by_role("button", name="Use key").click()
            await wait_for(page, "document.getElementById('key-note').textContent.includes('refused')")
            refused = await page.locator("#key-note").inner_text(), list(Handler.handshakes)
            await page.get_by_label("API key").fill(Handler.KEY)
            await page.get_by_role("button", name="Use key").click()
            for _ in range(100):
                if Handler.handshakes:
                    break
                await asyncio.sleep(0.05)
            stored = await page.evaluate("JSON.stringify(sessionStorage)")
            expired = json.dumps({"value": Handler.TOKEN, "expires_at": int(time.time()) - 1})
            await page.evaluate(f"sessionStorage.setItem('omnistream.apiKey', {json.dumps(expired)})")
            await page.reload()
            await page.get_by_role("button", name="Start").click()
            await page.get_by_label("API key").wait_for()
            return refused, stored, await page.locator("#key-note").inner_text()

    with serve_static(Handler) as url:
        (note, early), stored, expired_note = asyncio.run(body(url))
    assert note == "The server refused the key (unauthorized: wrong key)." and early == [], (note, early)
    assert Handler.posts == ["Bearer wrong", f"Bearer {Handler.KEY}"], Handler.posts
    assert len(Handler.handshakes) == 1 and f"openai-insecure-api-key.{Handler.TOKEN}" in Handler.handshakes[0]
    assert Handler.KEY not in Handler.handshakes[0] and Handler.KEY not in stored and Handler.TOKEN in stored, stored
    assert expired_note == "The session key expired: enter the API key again.", expired_note
    assert len(Handler.handshakes) == 1  # the expired token was not tried


PLAYER_JS = """async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const ctx = new AudioContext();
  await ctx.audioWorklet.addModule("web/audio-worklet.js");
  const node = new AudioWorkletNode(ctx, "omni-player", {
    numberOfInputs: 0, outputChannelCount: [1], processorOptions: { inRate: 24000 } });
  node.connect(ctx.destination);
  let last = null, flushed = null;
  node.port.onmessage = (e) => { if (e.data.type === "flushed") flushed = e.data; else last = e.data; };
  if (ctx.state !== "running") await ctx.resume();
  node.port.postMessage({ type: "push", pcm: new Float32Array(12000).fill(0.25) });  // 0.5 s
  for (let i = 0; i < 100 && !(last && last.played >= 11999); i++) await sleep(50);
  await sleep(300);
  const drained = last;
  node.port.postMessage({ type: "push", pcm: new Float32Array(240000).fill(0.25) });  // 10 s more
  for (let i = 0; i < 100 && !(last && last.played > drained.played + 2400); i++) await sleep(50);
  node.port.postMessage({ type: "flush", token: 7 });
  for (let i = 0; i < 100 && !flushed; i++) await sleep(50);
  await sleep(300);
  const afterFlush = last;
  await sleep(300);
  return { rate: ctx.sampleRate, drained, flushed, afterFlush, later: last };
}"""


@pytest.mark.timeout(120)
def test_player_worklet_plays_everything_then_flushes_at_once(media_files, static_server, tmp_path):
    """The playback worklet: a 0.5 s chunk plays to its last sample (one is held for interpolation
    until more arrives); a flush drops the queue: nothing more plays, the read position jumps to the end."""

    async def body():
        async with chromium(*media_files, tmp_path / "profile") as browser:
            page = await browser()
            await page.goto(static_server + "/")
            return await page.evaluate(PLAYER_JS)

    r = asyncio.run(body())
    assert r["drained"]["played"] == 11999 and r["drained"]["writePos"] == 12000, r
    assert r["flushed"]["token"] == 7 and r["flushed"]["writePos"] == 252000, r
    heard = r["flushed"]["readPos"]
    assert 12000 < heard < 252000, r  # flushed mid-reply
    assert r["afterFlush"]["played"] == r["later"]["played"] <= heard + 1, r  # silence after the flush
    assert r["later"]["readPos"] == 252000, r


# ---------------------------------------------------------------------------- against the real server
class LiveServer:
    """omnistream's RealtimeServer over the in-process pipeline, on its own event loop thread."""

    def __init__(self, ck, max_new_tokens: int = 8, max_speech_s: float = 2.0, server_cls=None, seed: int | None = None,
                 **config):
        from omnistream.apps.server import RealtimeServer, ServerConfig
        from omnistream.runtime.client import InProcClient, SessionOptions

        server_cls = server_cls or RealtimeServer

        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict] = []  # unhandled task/callback exceptions on the server's loop
        self.loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-web-server", daemon=True)
        self.thread.start()
        # short replies (8 text tokens, at most 2 s of speech by default) keep the tests quick on a CPU
        cfg = ServerConfig(port=0, defaults=SessionOptions(max_new_tokens=max_new_tokens, max_speech_s=max_speech_s,
                                                           seed=seed), **config)
        self.client = InProcClient(ck, headroom=None)  # (module scope: load from earlier tests must not refuse)

        async def start():
            await self.client.start()
            srv = server_cls(self.client, cfg)
            await srv.start()
            return srv

        self.server = self.run(start())
        self.url = f"http://127.0.0.1:{self.server.port}"

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict | str]:
        import json
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                body = r.read().decode()
                return r.status, json.loads(body) if r.headers.get_content_type() == "application/json" else body
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def close(self):
        try:
            self.run(self.server.close())
            self.run(self.client.close())
            self.run(self._finish_tasks())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            # Finalize what is left now, into loop_errors. (Logged from a finalizer that the GC runs
            # inside some later ast.parse, such as pytest rewriting an import, a traceback is formatted
            # with Python 3.11's ast-based caret anchors, re-entering the AST constructor:
            # "SystemError: AST constructor recursion depth mismatch".)
            gc.collect()
        errors = [f"{c.get('message')}: {c.get('exception')!r}" for c in self.loop_errors]
        assert not errors, f"the server left unhandled exceptions on its event loop: {errors}"

    @staticmethod
    async def _finish_tasks():
        """Cancel and await the tasks still pending (replies, pacers), as ``asyncio.run`` would."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture(scope="module")
def talks_to_the_limit(tiny_dir):
    """The tiny checkpoint with a Talker that never picks its end codes (codec_pad, codec_eos: their
    codec_head rows zeroed, far below the random code rows after top-k/top-p), so every reply speaks
    exactly ``max_speech_s``: reply lengths become known, and a barge-in always finds a reply playing.
    (The plain random Talker ends after a random few codes.) A fresh copy: the shared one stays intact."""
    import torch

    from omnistream.checkpoints import load_omni

    ck = load_omni(tiny_dir)
    talker = ck.talker
    with torch.no_grad():
        for tok in (int(talker.codec_pad_token), int(talker.codec_eos_token)):
            talker.codec_head.weight[tok].zero_()
            if talker.codec_head.bias is not None:
                talker.codec_head.bias[tok] = 0.0
    return ck


@pytest.fixture
def live_server(talks_to_the_limit):
    servers = []

    def make(**kwargs):
        servers.append(LiveServer(talks_to_the_limit, **kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


class NoWebRTC(RealtimeServer):
    """A server as one without ``aiortc`` describes itself: config.json says ``webrtc: false``."""

    def page_config(self) -> dict:
        return {**super().page_config(), "webrtc": False}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_voice_and_video_turn_in_the_browser(media_files, live_server, tmp_path):
    """The whole loop over the WebSocket, which the page picks when the server has no WebRTC: the
    page streams the fake mic and camera to the server, server VAD finds the spoken turn, the reply's
    audio plays in the page and its transcript appears."""
    srv = live_server(server_cls=NoWebRTC)

    async def body():
        async with chromium(*media_files, tmp_path / "profile") as browser:
            page = await browser()
            await page.goto(srv.url + "/?max_tokens=8")
            await page.get_by_role("button", name="Start").click()
            await page.wait_for_function("window.omni.state === 'connected'")
            status = srv.get("/status")
            # speech: 1 s of silence, 3.5 s of "hello", silence; the server's VAD must end the turn
            await page.wait_for_function("window.omni.speechStopped >= 1", timeout=90_000)
            await page.wait_for_function("window.omni.responsesDone >= 1", timeout=150_000)
            await page.wait_for_function("window.omni.playedSamples >= window.omni.receivedAudioSamples - 1",
                                         timeout=30_000)
            omni = await page.evaluate("window.omni")
            shown = await page.locator("#transcript li[data-role=assistant]").first.inner_text()
            latency = await page.locator("#latency").inner_text()
            await page.get_by_role("button", name="Stop").click()
            await page.wait_for_function("window.omni.state === 'closed'")
            for _ in range(50):
                if srv.get("/health")[1]["sessions"] == 0:
                    break
                await asyncio.sleep(0.1)
            return status, omni, shown, latency

    (code, st), omni, shown, latency = asyncio.run(body())
    print({k: omni[k] for k in ("sentAudioChunks", "sentFrames", "ackedFrames", "receivedAudioDeltas",
                                "receivedAudioSamples", "playedSamples", "lastLatencyMs", "transcript")})
    assert code == 200 and len(st["sessions"]) == 1 and st["connections"] == 1, st  # while connected
    assert srv.get("/health")[1]["sessions"] == 0  # Stop closed the session
    assert omni["errors"] == [], omni["errors"]
    assert omni["transport"] == "websocket"
    assert omni["sentAudioChunks"] >= 100  # >= 4 s of mic sent in 40 ms chunks
    assert omni["sentAudioSamples"] == 960 * omni["sentAudioChunks"]
    assert omni["events"]["input_audio_buffer.speech_started"] >= 1
    assert omni["events"]["input_audio_buffer.committed"] >= 1
    # frames: sent as JPEG data URLs, each decoded by the server (else an invalid_image error)
    assert omni["sentFrames"] >= 4 and omni["ackedFrames"] >= 4, omni
    # the reply: every sample the server sent arrived (2 s: max_speech_s) and was played
    resp = omni["lastResponse"]
    assert resp["status"] in ("completed", "incomplete"), resp
    assert omni["receivedAudioDeltas"] == 50  # 40 ms deltas
    assert omni["receivedAudioSamples"] == int(resp["metadata"]["audio_samples"]) == 2 * 24000
    assert omni["playedSamples"] >= omni["receivedAudioSamples"] - 1
    # from the end of speech (audio_end_ms less the 500 ms of silence the VAD waited for) to the first
    # sample played: the wait is part of what the user experiences
    assert omni["lastLatencyMs"] is not None and omni["lastLatencyMs"] >= 500
    assert latency == str(omni["lastLatencyMs"])
    turn = omni["latencyDetails"][0]  # the breakdown: text first here, then audio received, then played
    assert turn["playedMs"] == omni["lastLatencyMs"] and turn["playT"] >= turn["recvT"], turn
    assert 0 < turn["textMs"] <= turn["receivedMs"] < turn["playedMs"], turn
    # transcript: the deltas add up to the item's final transcript, and the page shows it
    transcript = resp["output"][0]["content"][0]["transcript"]
    assert omni["transcript"] == transcript and transcript.strip(), (omni["transcript"], transcript)
    assert transcript.strip()[:20] in shown


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_spoken_turn_over_webrtc(media_files, live_server, tmp_path):
    """Where the server offers WebRTC the page uses it: the fake mic and camera go out as media
    tracks, the events come on the `oai-events` data channel (none carries reply audio), and the
    reply plays from the remote audio track. The oracles are the server's: its response.done says
    how much audio it sent (2 s: this Talker always speaks max_speech_s), which the page's meter must
    hear, and the image items it made of the camera track. The latency readout still runs from the
    end of speech (the VAD's) to the first reply sample heard."""
    srv = live_server(seed=7)

    async def body():
        async with chromium(*media_files, tmp_path / "profile") as browser:
            page = await browser()
            await page.goto(srv.url + "/?max_tokens=8")
            await page.get_by_role("button", name="Start").click()
            await page.wait_for_function("window.omni.state === 'connected'")
            sessions = srv.get("/health")[1]["sessions"]
            await page.wait_for_function("window.omni.responsesDone >= 1", timeout=150_000)
            await page.wait_for_function("(window.omni.events['output_audio_buffer.stopped'] || 0) >= 1", timeout=30_000)
            await asyncio.sleep(0.5)  # the tail of the reply, still on its way when the server said stopped
            omni = await page.evaluate("window.omni")
            log = await page.locator("#event-log li").all_text_contents()  # (the panel is closed)
            latency = await page.locator("#latency").inner_text()
            playing = await page.evaluate("[!document.getElementById('reply').paused, "
                                          "document.getElementById('reply').srcObject.getAudioTracks().length]")
            await page.get_by_role("button", name="Stop").click()
            for _ in range(50):
                if srv.get("/health")[1]["sessions"] == 0:
                    break
                await asyncio.sleep(0.1)
            return sessions, omni, log, latency, playing, browser.logs

    sessions, omni, log, latency, playing, logs = asyncio.run(body())
    print({k: omni[k] for k in ("sentAudioChunks", "ackedFrames", "playedSamples", "lastLatencyMs", "latencyDetails",
                                "events")})
    assert omni["errors"] == [], (omni["errors"], logs)
    assert omni["transport"] == "webrtc" and sessions == 1
    assert srv.get("/health")[1]["sessions"] == 0  # Stop ended the call
    # the events came on the data channel, in the protocol's order; reply audio did not
    ev = omni["events"]
    assert ev["session.created"] == 1 and ev["input_audio_buffer.speech_started"] >= 1, ev
    assert ev["input_audio_buffer.committed"] >= 1 and ev["output_audio_buffer.started"] >= 1, ev
    assert omni["receivedAudioDeltas"] == 0 and "response.output_audio.delta" not in ev, ev
    shown = [re.search(r"([↑↓]) (\S+)", row).groups() for row in log]  # "<time>↓ <type>[ ×n]"
    assert ("↓", "output_audio_buffer.started") in shown and ("↑", "session.update") in shown, shown
    # the mic went out on the track (>= 4 s of it), the camera too: the server made image items of it
    assert omni["sentAudioChunks"] >= 100 and omni["sentFrames"] == 0 and omni["ackedFrames"] >= 2, omni
    # the reply: the server sent 2 s; the page heard them from the remote track. The meter counts 10 ms
    # pieces above -60 dBFS: a piece holding an edge of the audio counts whole, and a CPU slower than
    # real time sends the reply in bursts with silence between them, so a few edges more
    resp = omni["lastResponse"]
    sent = int(resp["metadata"]["audio_samples"])
    assert resp["status"] in ("completed", "incomplete") and sent == 2 * 24000, resp
    assert 0.9 * sent <= omni["playedSamples"] <= 1.1 * sent + 0.05 * 24000, (omni["playedSamples"], sent)
    assert playing == [True, 1]
    # latency: from the end of speech (after the VAD's 500 ms wait) to the first sample heard
    turn = omni["latencyDetails"][0]
    assert omni["lastLatencyMs"] >= 500 and latency == str(omni["lastLatencyMs"]), omni["latencyDetails"]
    assert 0 < turn["receivedMs"] < turn["playedMs"] == omni["lastLatencyMs"], turn


@pytest.mark.timeout(180)
def test_push_to_talk_and_interrupt_over_webrtc(media_files, live_server, tmp_path):
    """Push to talk over WebRTC: between turns the tracks carry nothing (no audio, no camera frames
    reach the server), a 1 s hold goes out on the tracks and its release commits the turn; the
    server's own count of the audio it received (usage: 25 audio tokens a second) is the oracle.
    Then Interrupt, while the 6 s reply plays from the remote track: response.cancel and
    output_audio_buffer.clear go out, the reply ends cancelled (client_cancelled) short of 6 s, its
    track's queue is cleared (output_audio_buffer.cleared) and the page's meter hears nothing more
    than what was in flight."""
    srv = live_server(max_speech_s=6.0, seed=7)

    async def body():
        async with chromium(*media_files, tmp_path / "profile", loop_audio=True) as browser:
            page = await browser()
            await page.goto(srv.url + "/")
            await page.get_by_label("Push to talk").check()
            await page.get_by_role("button", name="Start").click()
            await wait_for(page, "window.omni.state === 'connected' && window.omni.events['session.updated'] >= 1")
            await asyncio.sleep(1.0)  # nothing held
            idle = await page.evaluate("[window.omni.capturedChunks, window.omni.sentAudioChunks, "
                                       "window.omni.ackedFrames]")
            await page.get_by_role("button", name="Hold to talk").hover()
            t0 = time.monotonic()
            await page.mouse.down()
            await asyncio.sleep(1.0)
            await page.mouse.up()
            held = time.monotonic() - t0
            await wait_for(page, "window.omni.playedSamples >= 12000", timeout=120_000)  # 0.5 s of the reply heard
            heard = await page.evaluate("window.omni.playedSamples")
            await page.get_by_role("button", name="Interrupt").click()
            await wait_for(page, "window.omni.responsesDone >= 1 && "
                                 "(window.omni.events['output_audio_buffer.cleared'] || 0) >= 1", timeout=20_000)
            cleared = await page.evaluate("window.omni.playedSamples")
            await asyncio.sleep(0.6)
            return idle, held, heard, cleared, await page.evaluate("window.omni")

    idle, held, heard, cleared, omni = asyncio.run(body())
    resp = omni["lastResponse"]
    print(idle, held, heard, cleared, omni["pttTurns"], resp["usage"])
    assert omni["errors"] == [] and omni["transport"] == "webrtc", omni["errors"]
    assert idle[0] >= 20 and idle[1:] == [0, 0], idle  # the mic ran, nothing went out
    turn = omni["pttTurns"]
    assert len(turn) == 1 and turn[0]["committed"] and abs(turn[0]["sentSamples"] / 24000 - held) <= 0.2, turn
    assert omni["events"]["input_audio_buffer.committed"] == 1 and omni["ackedFrames"] >= 1, omni["events"]
    audio_s = resp["usage"]["input_token_details"]["audio_tokens"] / 25  # what the server received, and only that
    assert abs(audio_s - held) <= 0.2, (audio_s, held)
    out = out_events(omni)
    i = out.index("response.cancel")
    assert out[i:i + 2] == ["response.cancel", "output_audio_buffer.clear"], out
    sent = int(resp["metadata"]["audio_samples"])
    assert resp["status"] == "cancelled" and resp["status_details"]["reason"] == "client_cancelled", resp
    assert 0.9 * heard <= sent < 6 * 24000, (heard, sent)  # (the meter's count: see the WebRTC turn test)
    assert omni["playedSamples"] - cleared <= 0.1 * 24000  # the track went quiet: at most what was in flight


@contextlib.contextmanager
def omnistream_serve(model_dir, log_path: Path, *args: str):
    """``omnistream serve --port 0 ...`` as a child process (the real entry point, the packaged page);
    yields its base URL once it prints the address it listens on. Its output goes to ``log_path``
    (a pipe nobody drains would fill up and block the server's event loop on a log line)."""
    import re
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "omnistream", "serve", "--model", str(model_dir), "--port", "0", *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(r"serving ws://([\d.]+):(\d+)/v1/realtime", log_path.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"omnistream serve did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"http://{m.group(1)}:{m.group(2)}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_get(url: str, headers: dict | None = None, data: bytes | None = None) -> tuple[int, str]:
    """GET (or POST ``data``) ``url``: (status, body)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers=headers or {}), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.timeout(240)
def test_api_key_prompt(media_files, tiny_dir, tmp_path):
    """``omnistream serve --api-key``: the page asks for the key (a ?key= in the URL is ignored),
    keeps it in the tab's sessionStorage (exchanged for an ephemeral key where the server mints them),
    asks again when the server refuses it. This server offers WebRTC, so the (ephemeral) key goes in
    the Authorization header of the calls POST (on a WebSocket it would ride in the
    `openai-insecure-api-key.` subprotocol). /status without the key shows counts only."""
    import json

    key = "s3cret-key"
    log = tmp_path / "serve.log"
    with omnistream_serve(tiny_dir, log, "--api-key", key, "--max-new-tokens", "8", "--max-speech-s", "2") as url:
        assert http_get(url + "/") == (200, (WEB / "index.html").read_text())
        assert http_get(url + "/web/audio-worklet.js") == (200, (WEB / "audio-worklet.js").read_text())
        code, counts = http_get(url + "/status")
        assert code == 200 and set(json.loads(counts)) == {"connections", "stages_alive", "stages_total"}, counts
        minting = http_get(url + "/v1/realtime/client_secrets", {"Authorization": f"Bearer {key}",
                                                                  "Content-Type": "application/json"}, b"{}")[0] == 200

        async def body():
            async with chromium(*media_files, tmp_path / "profile") as browser:
                page = await browser()
                await page.goto(url + f"/?key={key}&camera=0")  # a key in a link does nothing
                await page.get_by_role("button", name="Start").click()
                await page.get_by_label("API key").wait_for()
                asked = await page.evaluate("[window.omni.state, window.omni.capturedChunks]")
                await page.get_by_label("API key").fill("wrong")
                await page.get_by_role("button", name="Use key").click()
                await page.wait_for_function("window.omni.state === 'error'")
                refused = (await page.get_by_label("API key").is_visible(),
                           await page.get_by_role("button", name="Reconnect").is_visible(),
                           await page.evaluate("window.omni.sessionId"))
                await page.get_by_label("API key").fill(key)
                await page.get_by_role("button", name="Use key").click()
                try:
                    await page.wait_for_function(
                        "window.omni.state === 'connected' && window.omni.sentAudioChunks >= 10")
                except async_api.TimeoutError:
                    raise AssertionError(f"page: {await page.evaluate('window.omni')}\n"
                                         f"server: {log.read_text()[-3000:]}") from None
                omni = await page.evaluate("window.omni")
                status = http_get(url + "/status", {"Authorization": f"Bearer {key}"})
                stored = await page.evaluate("sessionStorage.getItem('omnistream.apiKey')")
                await page.reload()  # the same tab: the key is remembered, no prompt
                await page.get_by_role("button", name="Start").click()
                await page.wait_for_function("window.omni.state === 'connected'")
                reloaded = (await page.get_by_label("API key").is_visible(), page.url)
                return asked, refused, omni, status, stored, reloaded

        asked, refused, omni, (code, status), stored, reloaded = asyncio.run(body())
    prompt_again, reconnect_shown, refused_sid = refused
    assert asked == ["idle", 0]  # asked for the key before connecting or capturing
    assert prompt_again and reconnect_shown and refused_sid is None
    assert omni["sessionId"] and omni["apiKeyRequired"] is True and omni["transport"] == "webrtc"
    refusals = ("WebSocket error", "API key refused")  # (by the handshake, or by client_secrets' 401)
    assert [e for e in omni["errors"] if e.get("message") not in refusals] == [], omni["errors"]
    assert code == 200 and [s["id"] for s in json.loads(status)["sessions"]] == [omni["sessionId"]], status
    assert reloaded[0] is False
    kept = json.loads(stored)
    if minting:  # the page exchanged the key for a short-lived token and kept only that
        assert kept["value"].startswith("ek_") and key not in stored, stored
    else:  # a server without ephemeral keys: the key itself, in this tab only
        assert kept == {"value": key, "expires_at": None}, stored


COUNT_GET_USER_MEDIA = """(() => {
  window.__getUserMedia = 0;  // calls the page makes: capture may only start after a click
  const md = navigator.mediaDevices, orig = md.getUserMedia.bind(md);
  md.getUserMedia = (c) => { window.__getUserMedia++; return orig(c); };
})();"""

NO_MICROPHONE = """navigator.mediaDevices.getUserMedia = () =>
  Promise.reject(new DOMException("Permission denied", "NotAllowedError"));  // the user said no"""


@pytest.mark.timeout(180)
def test_page_connects_only_to_its_own_server_and_never_autostarts(media_files, live_server, tmp_path):
    """A link cannot send the mic and camera elsewhere: ?ws=, ?autostart=1 and ?key= do nothing.
    The page stays idle (no getUserMedia) until Start is clicked, then talks to its own server."""
    from websockets.asyncio.server import serve

    srv = live_server()
    attempts: list[str] = []

    def record(conn, req):
        attempts.append(req.path)

    async def body():
        async with serve(lambda ws: ws.wait_closed(), "127.0.0.1", 0, process_request=record) as evil:
            evil_url = f"ws://127.0.0.1:{evil.sockets[0].getsockname()[1]}/v1/realtime"
            async with chromium(*media_files, tmp_path / "profile") as browser:
                page = await browser()
                await page.add_init_script(COUNT_GET_USER_MEDIA)
                await page.goto(f"{srv.url}/?ws={evil_url}&autostart=1&key=stolen&camera=0")
                await asyncio.sleep(2.0)
                idle = await page.evaluate("[window.omni.state, window.omni.capturedChunks, window.__getUserMedia]")
                if idle != ["idle", 0, 0] or attempts:
                    return idle, None
                await page.get_by_role("button", name="Start").click()
                await page.wait_for_function("window.omni.state === 'connected' && window.omni.sentAudioChunks > 0")
                sessions = srv.get("/health")[1]["sessions"]
                await page.get_by_role("button", name="Stop").click()
                return idle, sessions

    idle, sessions = asyncio.run(body())
    assert idle == ["idle", 0, 0] and attempts == [] and sessions == 1, (idle, attempts, sessions)


PLOT_COLOURS = """(() => {  // pixels of each segment colour in the history plot
  const c = document.getElementById("lat-plot");
  const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  const want = { text: [0x7a, 0xa7, 0xff], received: [0xf2, 0xa9, 0x3b], played: [0x13, 0x73, 0x33] };
  const n = { text: 0, received: 0, played: 0 };
  for (let i = 0; i < px.length; i += 4) {
    for (const [k, [r, g, b]] of Object.entries(want)) if (px[i] === r && px[i + 1] === g && px[i + 2] === b) n[k]++;
  }
  return n;
})()"""


class VadScript(RealtimeServer):
    """Plays the server's part of one spoken turn on a fixed clock, so the true latency is known:
    the user's speech ends 1 s into the session's audio; once SILENCE_MS more has arrived, the
    server says speech_stopped (audio_end_ms includes the silence, as the real VAD's does),
    0.1 s later the reply's first transcript delta and, 0.2 s after that, its first audio. ``timing``
    holds the monotonic times of the arrival of the audio chunk where the speech ended and of the
    sending of the first text and the first audio."""

    SILENCE_MS = 700

    async def _handle(self, ws) -> None:
        self.timing = {}
        td = {"type": "server_vad", "silence_duration_ms": self.SILENCE_MS}
        await ws.send(json.dumps({"type": "session.created", "session": {
            "id": "sess_script", "type": "realtime", "audio": {"input": {"turn_detection": td}}}}))
        got, end = 0, 24000  # 24 kHz samples
        async for msg in ws:
            ev = json.loads(msg)
            if ev.get("type") != "input_audio_buffer.append":
                continue
            got += len(base64.b64decode(ev["audio"])) // 2
            if got >= end:
                self.timing.setdefault("speech_end_received", time.monotonic())
            if got >= end + self.SILENCE_MS * 24:
                break
        await ws.send(json.dumps({"type": "input_audio_buffer.speech_stopped",
                                  "audio_end_ms": 1000 + self.SILENCE_MS, "item_id": "item_1"}))
        await asyncio.sleep(0.1)  # the model's time to first text
        await ws.send(json.dumps({"type": "response.created", "response": {"id": "resp_1"}}))
        self.timing["first_text_sent"] = time.monotonic()
        await ws.send(json.dumps({"type": "response.output_audio_transcript.delta", "response_id": "resp_1",
                                  "item_id": "item_2", "delta": "Hi"}))
        await asyncio.sleep(0.2)  # and to first audio
        pcm = np.full(4800, 3000, "<i2").tobytes()  # 0.2 s
        self.timing["first_audio_sent"] = time.monotonic()
        await ws.send(json.dumps({"type": "response.output_audio.delta", "response_id": "resp_1",
                                  "item_id": "item_2", "delta": base64.b64encode(pcm).decode()}))
        await ws.wait_closed()


@pytest.mark.timeout(120)
def test_latency_readout_runs_from_the_end_of_speech_to_the_first_sample_played(media_files, live_server,
                                                                                 tmp_path):
    """The readout starts where the speech ended (audio_end_ms less the session's silence, mapped to
    the capture clock), not when speech_stopped arrives, and stops when the first reply sample
    plays, not when it arrives. The oracle is the server's clock: it received the chunk where the
    speech ended no earlier than the page captured it, and sent the first audio no later than the
    page played it. The breakdown panel shows the three points of the turn on the same clock: first
    text, first audio received (0.2 s later, as the server sent them), first audio played (later
    still), and the history plot draws the turn."""
    srv = live_server(server_cls=VadScript)

    async def body():
        async with chromium(*media_files, tmp_path / "profile") as browser:
            page = await browser()
            await page.goto(srv.url + "/?camera=0&transport=ws")  # (the deltas and the player: WebSocket only)
            await page.get_by_role("button", name="Start").click()
            await page.wait_for_function("window.omni.lastLatencyMs !== null", timeout=30_000)
            omni = await page.evaluate("window.omni")
            shown = await page.locator("#latency").inner_text()
            panel = [await page.locator(f"#lat-{k}").inner_text() for k in ("text", "received", "played")]
            plotted = await page.evaluate(PLOT_COLOURS)
            await page.get_by_role("button", name="Stop").click()
            return omni, shown, panel, plotted

    omni, shown, panel, plotted = asyncio.run(body())
    t = srv.server.timing
    oracle_ms = (t["first_audio_sent"] - t["speech_end_received"]) * 1000  # >= 700 + 300
    turn = omni["latencyDetails"][0]
    print({"page_ms": omni["lastLatencyMs"], "oracle_ms": round(oracle_ms), "details": turn})
    assert shown == str(omni["lastLatencyMs"])
    # from receipt of speech_stopped to receipt of the audio (the old readout) would be ~300 ms
    assert oracle_ms - 50 <= omni["lastLatencyMs"] <= oracle_ms + 300, (omni["lastLatencyMs"], oracle_ms)
    assert panel == [str(turn["textMs"]), str(turn["receivedMs"]), str(turn["playedMs"])]
    assert turn["playedMs"] == omni["lastLatencyMs"]
    # the server sent the text and the audio 0.2 s apart; the page received them that far apart
    sent_apart_ms = (t["first_audio_sent"] - t["first_text_sent"]) * 1000
    assert abs(turn["receivedMs"] - turn["textMs"] - sent_apart_ms) <= 60, (turn, sent_apart_ms)
    assert 0 < turn["textMs"] < turn["receivedMs"] < turn["playedMs"], turn  # played after received
    assert turn["playT"] >= turn["recvT"], turn  # (the worklet's clock; the output latency comes on top)
    assert all(plotted.values()), plotted  # one bar, all three segments drawn


@pytest.mark.timeout(180)
def test_typed_question_gets_a_spoken_reply_without_a_microphone(media_files, live_server, tmp_path):
    """No microphone (the user refused it): the page says so, and a typed question's spoken reply
    still plays to its last sample."""
    srv = live_server(max_speech_s=1.0)

    async def body():
        async with chromium(*media_files, tmp_path / "profile") as browser:
            page = await browser()
            await page.add_init_script(NO_MICROPHONE)
            await page.goto(srv.url + "/?camera=0&transport=ws")  # (the deltas and the player: WebSocket only)
            await page.get_by_role("button", name="Start").click()
            await page.wait_for_function("window.omni.state === 'connected'")
            error = await page.get_by_role("alert").inner_text()
            mute_disabled = await page.get_by_role("button", name="Mute").is_disabled()
            await page.get_by_label("Type a message").fill("Hello there")
            await page.get_by_role("button", name="Send").click()
            await page.wait_for_function("window.omni.responsesDone >= 1 && window.omni.receivedAudioSamples > 0 && "
                                         "window.omni.playedSamples >= window.omni.receivedAudioSamples - 1",
                                         timeout=120_000)
            return await page.evaluate("window.omni"), error, mute_disabled

    omni, error, mute_disabled = asyncio.run(body())
    assert "microphone unavailable (NotAllowedError)" in error and mute_disabled
    assert omni["capturedChunks"] == 0 and omni["lastResponse"]["status"] in ("completed", "incomplete")
    assert omni["receivedAudioSamples"] == int(omni["lastResponse"]["metadata"]["audio_samples"]) == 24000
    assert omni["playedSamples"] >= 24000 - 1


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_interrupt_by_speaking(media_files, live_server, tmp_path):
    """Barge-in from the browser: "hello", a 9 s pause (the reply starts and keeps talking: 12 s of
    speech), "hello" again. The second speech_started flushes the page's playback at once, no audio of
    that reply arrives after it, the server cancels the reply (turn_detected) and truncates the item,
    and the second turn gets its own reply."""
    speech = hello_pcm(WAV_RATE)
    def z(seconds):
        return np.zeros(int(seconds * WAV_RATE), np.float32)

    wav = write_wav(tmp_path / "twice.wav", np.concatenate([z(LEAD_S), speech, z(9.0), speech, z(TAIL_S)]),
                    rate=WAV_RATE)
    srv = live_server(max_new_tokens=200, max_speech_s=12.0)

    async def body():
        async with chromium(wav, media_files[1], tmp_path / "profile") as browser:
            page = await browser()
            await page.goto(srv.url + "/?camera=0&transport=ws")  # (the deltas and the player: WebSocket only)
            await page.get_by_role("button", name="Start").click()
            await page.wait_for_function("window.omni.speechStarted >= 2", timeout=150_000)
            await page.wait_for_function("window.omni.responsesCreated >= 2 && window.omni.responsesDone >= 1",
                                         timeout=150_000)
            await asyncio.sleep(0.5)  # anything late would arrive now
            omni = await page.evaluate("window.omni")
            interrupted = await page.locator("#transcript li[data-interrupted='1']").count()
            await page.get_by_role("button", name="Stop").click()
            return omni, interrupted

    omni, interrupted = asyncio.run(body())
    print({k: omni[k] for k in ("responses", "flushes", "truncatedMs", "interruptions", "playedSamples")})
    first = omni["responses"][0]
    assert first["status"] == "cancelled" and first["reason"] == "turn_detected", first
    assert omni["interruptions"] >= 1 and len(omni["flushes"]) >= 1 and interrupted >= 1
    assert omni["lateAudioDeltas"] == 0  # the server sent nothing after speech_started
    assert 0 < first["samples"] == first["serverSamples"] < 12 * 24000, first  # every sample sent arrived
    flush = omni["flushes"][0]
    assert flush["readPos"] <= flush["writePos"] == first["samples"]  # the queue held this reply only
    # the server truncated the item to what it had paced out
    assert omni["truncatedMs"] is not None and omni["truncatedMs"] * 24 <= first["samples"]
    assert omni["errors"] == [], omni["errors"]


CLICK_AND_COUNT = "(() => { document.getElementById('ID').click(); return window.omni.capturedChunks; })()"


@pytest.mark.timeout(120)
def test_mute_sends_silence(media_files, static_server, tmp_path):
    """Mute disables the mic track: the chunks captured while muted are digital silence (what a
    muted WebRTC track sends, so the server's VAD still sees the turn end), and Unmute brings the
    speech back. The clip's speech runs from 1.0 s to 4.2 s of the fake mic."""

    async def body():
        async with chromium(*media_files, tmp_path / "profile") as browser:
            page = await browser()
            await page.goto(f"{static_server}/?aec=0&record=1&camera=0")
            await page.get_by_role("button", name="Start").click()
            await page.wait_for_function("window.omni.capturedChunks >= 45")  # 1.8 s: speaking
            muted_at = await page.evaluate(CLICK_AND_COUNT.replace("ID", "mute"))  # the chunk count at the click
            pressed = await page.get_by_role("button", name="Unmute").get_attribute("aria-pressed")
            await page.wait_for_function(f"window.omni.capturedChunks >= {muted_at + 20}")
            unmuted_at = await page.evaluate(CLICK_AND_COUNT.replace("ID", "mute"))
            await page.wait_for_function(f"window.omni.capturedChunks >= {max(unmuted_at + 15, 105)}")
            return await page.evaluate("window.omni"), muted_at, unmuted_at, pressed

    omni, muted_at, unmuted_at, pressed = asyncio.run(body())
    rms = [float(np.sqrt(np.mean(recorded_pcm([c]) ** 2))) for c in omni["recorded"]]  # per 40 ms chunk
    assert pressed == "true" and omni["muted"] is False
    assert max(rms[25:muted_at]) > 0.01, rms[:muted_at]  # speech before
    assert max(rms[muted_at + 3:unmuted_at]) == 0.0, rms[muted_at:unmuted_at]  # (3 chunks in flight)
    assert max(rms[unmuted_at + 3:105]) > 0.01, rms[unmuted_at:]  # and after


async def wait_for(page, expr: str, timeout: float = 60_000) -> None:
    """``page.wait_for_function``, failing with the page's state (``window.omni``) when it times out."""
    try:
        await page.wait_for_function(expr, timeout=timeout)
    except async_api.TimeoutError:
        state = await page.evaluate("window.omni")
        state.pop("recorded", None)
        raise AssertionError(f"timed out waiting for {expr}: {state}") from None


def out_events(omni: dict) -> list[str]:
    """The client events of the page's event log, oldest first (a run of one type is one row)."""
    return [e["type"] for e in omni["eventLog"] if e["dir"] == "out"]


@pytest.mark.timeout(180)
def test_push_to_talk_sends_audio_only_while_held(media_files, live_server, tmp_path):
    """Push to talk: the session runs without server VAD (turn_detection null); nothing is sent
    until the button (then the space bar) is held, the audio sent matches how long it was held
    (the test's own clock), each release commits the turn and gets a reply, and a tap too short to
    commit clears the buffer instead. The microphone picker switches to another device on the way."""
    srv = live_server(max_speech_s=0.5)

    async def hold(page, press, release, seconds):
        t0 = time.monotonic()
        await press()
        await asyncio.sleep(seconds)
        await release()
        return time.monotonic() - t0

    async def body():
        async with chromium(*media_files, tmp_path / "profile", loop_audio=True) as browser:
            page = await browser()
            await page.goto(srv.url + "/?camera=0&transport=ws")  # (the deltas and the player: WebSocket only)
            await page.get_by_label("Push to talk").check()
            await page.get_by_role("button", name="Start").click()
            await wait_for(page, "window.omni.state === 'connected' && window.omni.capturedChunks >= 10 && "
                                         "window.omni.events['session.updated'] >= 1")
            await page.locator("summary", has_text="Devices").click()
            mics = await page.locator("#mic-select option").all_inner_texts()
            await page.select_option("#mic-select", index=1)  # another fake microphone, while running
            n = await page.evaluate("window.omni.capturedChunks")
            await wait_for(page, f"window.omni.capturedChunks >= {n + 12}")  # 0.5 s: nothing held
            before = await page.evaluate("window.omni.sentAudioChunks")
            talk = page.get_by_role("button", name="Hold to talk")
            await talk.hover()  # (scrolled into view: the transcript grows below it)
            held = [await hold(page, page.mouse.down, page.mouse.up, 1.0)]
            await wait_for(page, "window.omni.pttTurns.length >= 1 && window.omni.responsesDone >= 1")
            await page.locator("h1").click()  # focus off the buttons: the space bar is push to talk
            held.append(await hold(page, lambda: page.keyboard.down(" "), lambda: page.keyboard.up(" "), 0.6))
            await wait_for(page, "window.omni.pttTurns.length >= 2 && window.omni.responsesDone >= 2")
            await talk.hover()
            await page.mouse.down()  # a tap
            await page.mouse.up()
            await wait_for(page, "window.omni.pttTurns.length >= 3 && "
                                         "window.omni.events['input_audio_buffer.cleared'] >= 1")
            sent = await page.evaluate("window.omni.sentAudioChunks")
            await asyncio.sleep(0.8)
            omni = await page.evaluate("window.omni")
            error = await page.get_by_role("alert").inner_text()
            return omni, before, sent, held, mics, error

    omni, before, sent, held, mics, error = asyncio.run(body())
    turns = omni["pttTurns"]
    print({"held_s": held, "sent_s": [t["sentSamples"] / 24000 for t in turns], "mics": mics})
    assert len(mics) >= 3 and mics[0] == "Default" and all(mics), mics  # labelled once capture was allowed
    assert before == 0  # nothing before the first press
    assert omni["sentAudioChunks"] == sent  # nothing after the last release
    assert omni["sentAudioSamples"] == sum(t["sentSamples"] for t in turns)  # nothing between presses
    for t, h in zip(turns, held, strict=False):
        assert t["committed"] and abs(t["sentSamples"] / 24000 - h) <= 0.2, (turns, held)  # 40 ms chunks + jitter
    assert not turns[2]["committed"] and turns[2]["sentSamples"] < 2400, turns  # the tap: cleared
    assert "hold the button while you speak" in error
    ev = omni["events"]
    assert ev["input_audio_buffer.committed"] == 2 and ev["response.done"] == 2, ev
    assert "input_audio_buffer.speech_started" not in ev  # no server VAD: the button makes the turns
    turn = ["input_audio_buffer.append", "input_audio_buffer.commit", "response.create"]
    tap = ["input_audio_buffer.append"] if turns[2]["sentSamples"] else []
    assert out_events(omni)[-8 + (not tap):] == turn + turn + tap + ["input_audio_buffer.clear"], out_events(omni)
    assert omni["errors"] == [], omni["errors"]


@pytest.mark.timeout(180)
def test_interrupt_button_stops_playback_and_cancels(media_files, live_server, tmp_path):
    """Interrupt while a typed question's 6 s spoken reply plays: the page sends response.cancel,
    drops the queued audio at once (nothing more plays), and truncates the item to what was heard;
    the server confirms: the reply ends cancelled (client_cancelled) well short of 6 s, and the
    item is truncated where the player stopped."""
    srv = live_server(max_speech_s=6.0)

    async def body():
        async with chromium(*media_files, tmp_path / "profile") as browser:
            page = await browser()
            await page.add_init_script(NO_MICROPHONE)
            await page.goto(srv.url + "/?camera=0&transport=ws")  # (the deltas and the player: WebSocket only)
            await page.get_by_role("button", name="Start").click()
            await wait_for(page, "window.omni.state === 'connected'")
            await page.get_by_label("Type a message").fill("Hello there")
            await page.get_by_role("button", name="Send").click()
            await wait_for(page, "window.omni.playedSamples >= 12000", timeout=60_000)  # 0.5 s heard
            await page.get_by_role("button", name="Interrupt").click()
            await wait_for(page, "window.omni.responsesDone >= 1 && window.omni.truncatedMs !== null")
            await asyncio.sleep(0.6)  # anything still playing would play now
            omni = await page.evaluate("window.omni")
            disabled = await page.get_by_role("button", name="Interrupt").is_disabled()
            cut = await page.locator("#transcript li[data-interrupted='1']").count()
            return omni, disabled, cut

    omni, disabled, cut = asyncio.run(body())
    flush = omni["flushes"][0]
    reply = omni["responses"][0]
    print({"flush": flush, "reply": reply, "truncatedMs": omni["truncatedMs"], "played": omni["playedSamples"]})
    assert out_events(omni)[-2:] == ["response.cancel", "conversation.item.truncate"], out_events(omni)
    assert reply["status"] == "cancelled" and reply["reason"] == "client_cancelled", reply
    assert 12000 <= flush["readPos"] < flush["writePos"] <= reply["samples"] < 6 * 24000, (flush, reply)
    assert omni["playedSamples"] == flush["played"]  # silence from the click on
    assert omni["truncatedMs"] == flush["readPos"] * 1000 // 24000  # the server cut the item where it stopped
    assert disabled and cut == 1
    assert omni["errors"] == [{"type": "client", "message": "media: NotAllowedError"}], omni["errors"]  # no mic only

