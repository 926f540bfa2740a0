"""Realtime sessions over WebRTC (``POST /v1/realtime/calls``), with ``aiortc``.

Why WebRTC: a browser gets a jitter buffer, echo cancellation and Opus (about 32 kB/s instead
of 96 kB/s of base64 pcm16) for free, and lost audio packets are not retransmitted ahead of
newer ones (no head-of-line blocking on a lossy network).

OpenAI's flow: the client creates an ``oai-events`` data channel and one audio track (its
microphone), optionally a video track (its camera), and POSTs the SDP offer; the answer comes
back in the response (201, ``application/sdp``), and ICE/DTLS connect the peers directly.

One protocol implementation: the session is the same
:class:`~omnistream.apps.realtime_session.RealtimeSession` as on the WebSocket, talking to a
:class:`ChannelConnection` -- the small part of a websockets ``ServerConnection`` it uses
(``send``, iteration, ``close``, ``request``, ``transport``). Into it go, in arrival order, the
data channel's events and the media, turned into the events the WebSocket page would send:

- microphone audio (Opus, 48 kHz) downmixed and resampled to the session's 24 kHz pcm16, as an
  ``input_audio_buffer.append`` every 40 ms (so server VAD, limits and turns work unchanged);
- camera frames sampled at the session's ``fps`` (the vision encoder's rate), as
  ``conversation.item.create`` with one ``input_image`` (JPEG), as the page does.

Out of it, every server event goes on the data channel except the reply audio deltas: their
audio goes to :class:`ReplyTrack`, the outgoing Opus track, which plays it in real time (the
session's pacer keeps it at most ``output_lead_ms`` ahead, so a barge-in is heard at once and
``played()`` stays right). As OpenAI does for WebRTC, the server adds
``output_audio_buffer.started`` / ``stopped`` / ``cleared`` events and takes the client event
``output_audio_buffer.clear`` (drop the reply audio not yet played).

A peer that does not open the data channel within ``CONNECT_TIMEOUT_S`` is dropped, as is one
whose connection fails; ICE uses host candidates only unless ``ServerConfig.ice_servers`` names
STUN/TURN servers (aiortc would otherwise ask a public STUN server).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections import deque
from fractions import Fraction

import av
import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close

from omnistream.apps.http_post import _http
from omnistream.apps.realtime import SAMPLE_RATE
from omnistream.apps.realtime_reply import new_id
from omnistream.apps.realtime_session import RealtimeSession
from omnistream.encoders.audio import PolyphaseResampler

log = logging.getLogger(__name__)
EVENTS_LABEL = "oai-events"
CONNECT_TIMEOUT_S = 20.0  # POST answered -> data channel open
FRAME = SAMPLE_RATE // 50  # 20 ms of reply audio per outgoing frame (Opus' usual packet)
APPEND = SAMPLE_RATE // 25  # 40 ms of microphone audio per input_audio_buffer.append
MAX_INBOX = 512  # events waiting for the session (~20 s of audio); more: audio is dropped, events close the call
MAX_BUFFERED = 1 << 20  # bytes queued on the data channel before send() waits for the peer
_AUDIO_DELTAS = ('{"type": "response.output_audio.delta"', '{"type": "response.audio.delta"')
_WATCHED = ('{"type": "response.done"', '{"type": "conversation.item.truncated"')
_CLOSED = object()


class BadOffer(ValueError):
    """An SDP offer this server cannot answer (400, one line)."""


def check_offer(sdp: str) -> None:
    """Parse the offer and check it has what a Realtime call needs: Opus audio and a data channel."""
    try:
        d = SessionDescription.parse(sdp)
    except Exception as e:  # aiortc's parser raises whatever the text trips (ValueError, IndexError, KeyError...)
        raise BadOffer(f"malformed SDP offer ({type(e).__name__}: {str(e)[:120]})") from None
    kinds = [m.kind for m in d.media]
    if "audio" not in kinds:
        raise BadOffer("the offer has no audio media section (add the microphone track, or a recvonly audio "
                       "transceiver, before createOffer)")
    if not any(c.mimeType.lower() == "audio/opus" for m in d.media if m.kind == "audio" for c in m.rtp.codecs):
        raise BadOffer("the offer's audio has no Opus codec")
    if "application" not in kinds:
        raise BadOffer(f"the offer has no data channel: create the '{EVENTS_LABEL}' channel before createOffer")


def jpeg_data_url(frame: av.VideoFrame, max_pixels: int) -> str:
    """A camera frame -> ``data:image/jpeg;base64,...`` (scaled down to at most ``max_pixels``),
    what the WebSocket page sends for a frame."""
    w, h = frame.width, frame.height
    if w * h > max_pixels:
        s = math.sqrt(max_pixels / (w * h))
        w, h = int(w * s), int(h * s)
    w, h = max(2, w // 2 * 2), max(2, h // 2 * 2)  # 4:2:0 needs even sizes
    img = frame.reformat(width=w, height=h, format="yuvj420p")
    enc = av.CodecContext.create("mjpeg", "w")
    enc.width, enc.height, enc.pix_fmt, enc.time_base = w, h, "yuvj420p", Fraction(1, 25)
    data = b"".join(bytes(p) for p in [*enc.encode(img), *enc.encode(None)])
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def to_mono_float(frame: av.AudioFrame) -> np.ndarray:
    """A decoded audio frame (packed or planar, int16 or float) -> (n,) float32 mono in [-1, 1]."""
    x = frame.to_ndarray()
    ch = len(frame.layout.channels)
    x = x.reshape(ch, -1) if frame.format.is_planar else x.reshape(-1, ch).T  # (ch, n)
    y = x.astype(np.float32).mean(axis=0)
    return y / 32768.0 if x.dtype == np.int16 else y


class ReplyTrack(MediaStreamTrack):
    """The outgoing audio track: reply pcm16 at 24 kHz in (:meth:`put`), 20 ms frames out in real
    time (silence while there is nothing to play); aiortc encodes them to Opus."""

    kind = "audio"

    def __init__(self, on_drained=None):
        super().__init__()
        self.pending: deque = deque()  # int16 pieces not yet played
        self.pending_n = 0
        self.on_drained = on_drained  # called when queued audio has all been played
        self._t0: float | None = None
        self._pts = 0
        self.played = 0  # reply samples sent on the track so far (silence not counted)

    def put(self, pcm: np.ndarray) -> None:
        self.pending.append(pcm)
        self.pending_n += len(pcm)

    def clear(self) -> int:
        """Drop what is queued (an interrupted reply); the samples dropped."""
        n, self.pending_n = self.pending_n, 0
        self.pending.clear()
        return n

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            self._t0 = time.monotonic()
        else:
            self._pts += FRAME
            wait = self._t0 + self._pts / SAMPLE_RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        out = np.zeros(FRAME, np.int16)  # (FRAME,)
        had = self.pending_n > 0
        i = 0
        while i < FRAME and self.pending:
            head = self.pending[0]
            k = min(FRAME - i, len(head))
            out[i:i + k] = head[:k]
            if k == len(head):
                self.pending.popleft()
            else:
                self.pending[0] = head[k:]
            i += k
        self.pending_n -= i
        self.played += i
        if had and not self.pending_n and self.on_drained is not None:
            self.on_drained()
        frame = av.AudioFrame.from_ndarray(out.reshape(1, -1), format="s16", layout="mono")  # (1, FRAME) packed
        frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, self._pts, Fraction(1, SAMPLE_RATE)
        return frame


class _Transport:
    """What the session asks of a connection's transport: ``abort()`` and ``get_extra_info()``."""

    def __init__(self, conn: ChannelConnection):
        self.conn = conn

    def abort(self) -> None:
        self.conn._ended(1006, "aborted")  # the session ends; the call's task then closes the peer

    def get_extra_info(self, name, default=None):
        return default


class ChannelConnection:
    """A WebRTC peer seen as the WebSocket a :class:`RealtimeSession` expects (see the module doc)."""

    def __init__(self, request, pc: RTCPeerConnection, max_image_pixels: int):
        self.request, self.pc, self.max_image_pixels = request, pc, max_image_pixels
        self.transport = _Transport(self)
        self.remote_address = None
        self.session: RealtimeSession | None = None
        self.channel = None
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.ready = asyncio.Event()  # the data channel opened, or the call ended first
        self.closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.dropped_audio = 0
        self.track = ReplyTrack(self._drained)
        self.out_response: str | None = None  # the reply whose audio the track is playing
        self.out_done = False  # ... and its response.done was sent
        self.out_start = 0  # the track's ``played`` count when that reply's audio began
        self._low = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self._kinds: list[str] = []  # the media tracks taken

    # -- peer events
    def attach(self, channel) -> None:
        """The peer opened a data channel: ``oai-events`` carries the session's events."""
        if channel.label != EVENTS_LABEL or self.channel is not None:
            log.info("WebRTC: ignoring data channel %r (the events go on %r)", channel.label, EVENTS_LABEL)
            return
        self.channel = channel
        channel.bufferedAmountLowThreshold = MAX_BUFFERED // 4
        channel.on("message", self._on_message)
        channel.on("close", lambda: self._ended(1000, "the data channel closed"))
        channel.on("bufferedamountlow", self._low.set)
        self.ready.set()

    def on_track(self, track) -> None:
        """The peer's microphone (the first audio track) or camera (the first video track)."""
        if any(k == track.kind for k in self._kinds):
            log.info("WebRTC: ignoring a second %s track (one microphone, one camera)", track.kind)
            return
        self._kinds.append(track.kind)
        coro = self._pump_audio(track) if track.kind == "audio" else self._pump_video(track)
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self._ended(1006, f"the peer connection {self.pc.connectionState}")

    def _on_message(self, msg) -> None:
        if isinstance(msg, str) and len(msg) < 256 and "output_audio_buffer.clear" in msg:
            try:
                if json.loads(msg).get("type") == "output_audio_buffer.clear":
                    self._truncate_heard()
                    self._clear_output()
                    return
            except (ValueError, AttributeError):
                pass  # the session answers it as any malformed event
        self.feed(msg)

    def feed(self, msg, droppable: bool = False) -> None:
        """One message for the session, in order; past ``MAX_INBOX`` waiting, audio is dropped and
        a client event closes the call (it sends faster than its session can take)."""
        if self.closed:
            return
        if self.inbox.qsize() >= MAX_INBOX:
            if droppable:
                if self.dropped_audio == 0:
                    log.warning("WebRTC session %s: the session is behind real time: microphone audio dropped",
                                self.session and self.session.sid)
                self.dropped_audio += 1
                return
            self.transport.abort()
            return
        self.inbox.put_nowait(msg)

    def _ended(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed, self.close_code, self.close_reason = True, code, reason
            self.inbox.put_nowait(_CLOSED)
            self.ready.set()
            self._low.set()
            self.track.stop()

    # -- the ServerConnection face
    def __aiter__(self):
        return self

    async def __anext__(self):
        msg = await self.inbox.get()
        if msg is _CLOSED:
            self.inbox.put_nowait(_CLOSED)  # (a second reader ends too)
            raise StopAsyncIteration
        return msg

    async def recv(self):
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise ConnectionClosedOK(None, None) from None

    async def send(self, text: str) -> None:
        if self.closed or self.channel is None or self.channel.readyState != "open":
            raise ConnectionClosedOK(None, Close(self.close_code or 1000, self.close_reason))
        if text.startswith(_AUDIO_DELTAS):  # reply audio goes on the media track, not the channel
            ev = json.loads(text)
            self._audio_out(ev["response_id"], np.frombuffer(base64.b64decode(ev["delta"]), "<i2"))
            return
        self.channel.send(text)
        if text.startswith(_WATCHED):
            self._watch(json.loads(text))
        while self.channel.bufferedAmount > MAX_BUFFERED and not self.closed:  # the peer reads slowly: wait
            self._low.clear()
            await self._low.wait()
        if self.closed:
            raise ConnectionClosedError(None, Close(self.close_code or 1006, self.close_reason))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self._ended(code, reason)
        for t in list(self.tasks):
            t.cancel()
        await self.pc.close()

    # -- reply audio
    def _event(self, type: str, **fields) -> None:
        if self.session is not None and self.channel is not None and self.channel.readyState == "open":
            self.channel.send(json.dumps(self.session.ev.event(type, **fields)))

    def _audio_out(self, response_id: str, pcm: np.ndarray) -> None:
        if response_id != self.out_response:
            self.out_response, self.out_done, self.out_start = response_id, False, self.track.played
            self._event("output_audio_buffer.started", response_id=response_id)
        self.track.put(pcm.astype(np.int16))

    def _watch(self, ev: dict) -> None:
        """A reply ended (``response.done``) or was cut (``conversation.item.truncated``)."""
        if self.out_response is None:
            return
        if ev["type"] == "conversation.item.truncated" or ev["response"].get("status") == "cancelled":
            self._clear_output()
        elif ev["response"].get("id") == self.out_response:
            self.out_done = True
            if not self.track.pending_n:
                self._drained()

    def _drained(self) -> None:
        if self.out_done and self.out_response is not None:
            self._event("output_audio_buffer.stopped", response_id=self.out_response)
            self.out_response = None

    def _truncate_heard(self) -> None:
        """The client cut the reply (``output_audio_buffer.clear``): its item keeps what the track sent
        of it, as a WebSocket page's truncate does with what it played (the track is the only clock
        that knows: a browser's own count includes its jitter buffer's concealment)."""
        s = self.session
        r = next((x for x in (s.response, s.last_reply) if x is not None and x.id == self.out_response), None) \
            if s is not None and self.out_response is not None else None
        if r is None or not r.audio:
            return
        ms = (self.track.played - self.out_start) * 1000 // SAMPLE_RATE
        self.feed(json.dumps({"type": "conversation.item.truncate", "item_id": r.item_id, "content_index": 0,
                              "audio_end_ms": ms}))

    def _clear_output(self) -> None:
        self.track.clear()
        rid, self.out_response = self.out_response, None
        self._event("output_audio_buffer.cleared", **({"response_id": rid} if rid else {}))

    # -- media in
    async def _pump_audio(self, track) -> None:
        """Microphone frames -> 40 ms ``input_audio_buffer.append`` events at 24 kHz pcm16."""
        res, rate, parts, n = None, None, [], 0
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if frame.sample_rate != rate:
                res, rate = PolyphaseResampler(frame.sample_rate, SAMPLE_RATE), frame.sample_rate
            y = res.push(to_mono_float(frame))  # (m,) float64 at 24 kHz
            parts.append(np.round(np.clip(y, -1.0, 1.0) * 32767.0).astype("<i2"))
            n += len(y)
            if n >= APPEND:
                pcm = np.concatenate(parts)
                parts, n = [], 0
                self.feed(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm.tobytes()).decode()}), droppable=True)

    async def _pump_video(self, track) -> None:
        """Camera frames -> one ``input_image`` item per 1/fps s (the latest frame at that time)."""
        due = 0.0
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            if now < due or self.session is None:
                continue
            opts = self.session.options or self.session.server.config.defaults
            due = max(now, due + 1.0 / opts.fps)
            url = await asyncio.to_thread(jpeg_data_url, frame, self.max_image_pixels)
            self.feed(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_image", "image_url": url}]}}),
                droppable=True)


class RealtimeCalls:
    """The WebRTC calls of one server: SDP offer -> answer, then one session per call."""

    def __init__(self, server):
        self.server = server
        cfg = server.config
        self.ice = [RTCIceServer(u) for u in getattr(cfg, "ice_servers", ())]
        self.connect_timeout_s = getattr(cfg, "webrtc_connect_timeout_s", CONNECT_TIMEOUT_S)
        self.calls: dict[str, tuple[ChannelConnection, asyncio.Task]] = {}

    async def answer(self, request, offer: str, peer: str):
        """``POST /v1/realtime/calls`` from client address ``peer`` (admitted by the server): 201
        with the SDP answer, or 400 with why the offer is refused."""
        try:
            check_offer(offer)
        except BadOffer as e:
            return _http(400, f"bad request: {e}\n".encode())
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ice))
        conn = ChannelConnection(request, pc, self.server.config.limits.max_image_pixels)
        pc.on("datachannel", conn.attach)
        pc.on("track", conn.on_track)
        pc.on("connectionstatechange", conn.on_state)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            pc.addTrack(conn.track)  # (takes the offer's audio transceiver: one track, both ways)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # aiortc refuses an offer it cannot negotiate with assorted errors
            await conn.close()
            log.info("WebRTC: offer refused: %s: %s", type(e).__name__, e)
            return _http(400, f"bad request: the SDP offer cannot be answered ({type(e).__name__}: "
                         f"{str(e)[:120]})\n".encode())
        call_id = new_id("rtc")
        session = conn.session = RealtimeSession(self.server, conn)
        session.peer = peer
        srv = self.server  # the session counts against --max-sessions and the per-address cap from now on
        srv.sessions.add(session)
        srv._per_ip[peer] = srv._per_ip.get(peer, 0) + 1
        task = asyncio.create_task(self._run(call_id, session, conn))
        self.calls[call_id] = (conn, task)
        return _http(201, pc.localDescription.sdp.encode(), "application/sdp",
                     extra=[("Location", f"/v1/realtime/calls/{call_id}")])

    async def _run(self, call_id: str, session: RealtimeSession, conn: ChannelConnection) -> None:
        try:
            try:
                await asyncio.wait_for(conn.ready.wait(), self.connect_timeout_s)
            except TimeoutError:
                log.info("WebRTC call %s: no '%s' data channel within %g s: dropped", call_id, EVENTS_LABEL,
                         self.connect_timeout_s)
                return
            if not conn.closed:
                await session.run()
        except Exception:
            log.exception("WebRTC call %s failed", call_id)
        finally:
            srv = self.server
            srv.sessions.discard(session)
            srv._per_ip[session.peer] -= 1
            if not srv._per_ip[session.peer]:
                del srv._per_ip[session.peer]
            try:
                await session.cleanup()
            finally:
                srv.metrics.session_closed(session)
                await conn.close()
                self.calls.pop(call_id, None)

    async def close(self) -> None:
        """End every call (server shutdown)."""
        calls = list(self.calls.values())
        for conn, _ in calls:
            await conn.close(1001, "server shutting down")
        await asyncio.gather(*(t for _, t in calls), return_exceptions=True)
