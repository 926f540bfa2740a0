"""One Realtime session: a WebSocket's client events in, the pipeline's reply out.

:class:`RealtimeSession` maps each client event onto the
:class:`~omnistream.runtime.client.Client` calls and owns the state the protocol implies: the
input audio buffer (:mod:`omnistream.apps.input_buffer`, server VAD), the open user turn, the
conversation's item ids and the active reply (:mod:`omnistream.apps.realtime_reply`, paced by
:mod:`omnistream.apps.pacer`). On ``speech_started`` during a reply the reply is cancelled
(epoch bump), no further audio goes out, and the conversation is truncated to the played
samples (``conversation.item.truncated`` tells the client).

The event loop only moves bytes: messages larger than ``offload_bytes`` are parsed (JSON,
base64, image decoding) on a worker thread, and long appends run the VAD there too; a session
awaits each of its messages before the next, so its order is kept while other sessions, the
replies' pacing and ``/health`` go on. The limits of :mod:`omnistream.apps.limits` are answered
with ``error`` events.

Rules the server keeps towards the pipeline:

- a ``session.update`` that changes the pipeline's options (voice, instructions...) while a
  reply runs or a user turn is open is acknowledged at once but sent to the pipeline only when
  the next user turn opens (or the buffer is cleared) with no reply running, so it applies from
  the next turn and never rebuilds a conversation under an open turn or a running reply;
- a user turn the pipeline lost (a stage died or hung while it was open, or at its commit) is
  reported as lost -- an ``error`` event ``stage_lost``, no ``committed``, no reply from the
  restarted, empty conversation;
- a client that asks to start while ``Client.admission()`` refuses gets ``server_busy`` and a
  polite close (1013).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import replace

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.frames import Close

from omnistream.apps import realtime_items as items
from omnistream.apps.input_buffer import InputBuffer
from omnistream.apps.limits import SessionLimits, TokenBucket
from omnistream.apps.realtime import (
    OPENAI_VOICES,
    SAMPLE_RATE,
    AudioAppend,
    AudioClear,
    AudioCommit,
    FunctionOutput,
    ItemCreate,
    ItemDelete,
    ItemRetrieve,
    ItemTruncate,
    MessageCreate,
    ProtocolError,
    ResponseCancel,
    ResponseCreate,
    SessionConfig,
    SessionUpdate,
    parse_client_event,
)
from omnistream.apps.realtime_events import ServerEvents
from omnistream.apps.realtime_reply import Reply, new_id
from omnistream.runtime.client import ClientError, SessionOptions

log = logging.getLogger(__name__)


def subprotocols(headers) -> list[str]:
    """The subprotocols a handshake offered (one header or several, comma-separated)."""
    return [p.strip() for h in headers.get_all("Sec-WebSocket-Protocol") for p in h.split(",") if p.strip()]


def _parse(msg, max_message: int, limits: SessionLimits):
    """Size check + :func:`parse_client_event` (run on a worker thread for large messages)."""
    size = len(msg) if isinstance(msg, bytes) else (len(msg) if len(msg) * 4 <= max_message
                                                    else len(msg.encode("utf-8", "surrogatepass")))
    if size > max_message:
        raise ProtocolError("message_too_large", f"message of {size} bytes is over the {max_message} byte limit: "
                            "event dropped")
    return parse_client_event(msg, limits)


class RealtimeSession:
    """One WebSocket = one Realtime session = one pipeline session."""

    def __init__(self, server, ws: ServerConnection):
        self.server, self.ws, self.client = server, ws, server.client
        c = server.config
        self.limits: SessionLimits = getattr(c, "limits", None) or SessionLimits()
        beta = "realtime=v1" in ws.request.headers.get("OpenAI-Beta", "") or \
            "openai-beta.realtime-v1" in subprotocols(ws.request.headers)
        self.ev = ServerEvents("beta" if beta else "ga")
        self.cfg = SessionConfig(turn_detection=SessionConfig().turn_detection if c.server_vad else None)
        self.bucket = TokenBucket(c.rate_limit, c.rate_burst or max(50.0, 2 * c.rate_limit))
        self.audio_bucket = TokenBucket(self.limits.audio_rate, self.limits.audio_burst_s)
        self.sid: str | None = None
        self.options: SessionOptions | None = None  # what the pipeline has
        self.pending_options: SessionOptions | None = None  # a session.update waiting for the session to be idle
        self.buf = InputBuffer()
        self.turn_samples = 0  # samples in the open user turn (the "input audio buffer")
        self.turn_t0: float | None = None  # monotonic time the open turn began (frame clock); None: no open turn
        self.last_frame_t = -1.0
        self.turn_frames = 0  # camera frames in the open user turn
        self.turn_lost = False  # the pipeline lost the open turn (stage_lost): it is not committed
        self.idle_frame = None  # VAD mode, no speech: only the latest camera frame is kept
        self.user_item_id: str | None = None
        self.items = items.ItemStore()  # the conversation's items (omnistream.apps.realtime_items)
        self.turn_items: list[str] = []  # media items of the open turn (named by its commit)
        self.turn_pcm: list[np.ndarray] = []  # the open turn's audio, (n,) int16, kept for retrieve (bounded)
        self.response: Reply | None = None
        self.last_reply: Reply | None = None
        self.calls: dict[str, str] = {}  # call_id -> item id of the function calls the model made
        self.transcripts_task: asyncio.Task | None = None  # forwards input transcriptions as they come
        self.transcripts_lock = asyncio.Lock()  # one sender at a time: their events keep the pipeline's order

    # -- plumbing
    async def send(self, event: dict) -> None:
        """Send one event; a client that has not taken it within ``send_timeout_s`` stopped
        reading: its output is dropped and the connection closed (ConnectionClosed is raised)."""
        try:
            async with asyncio.timeout(self.limits.send_timeout_s):  # (no task per send, unlike wait_for)
                await self.ws.send(json.dumps(event))
        except TimeoutError:
            reason = f"the client read nothing for {self.limits.send_timeout_s:g} s: output dropped"
            log.warning("session %s: %s; closing it", self.sid, reason)
            if self.response is not None:
                self.response.stop("client_cancelled")
            try:  # the close frame is queued behind what the client did not read: a short wait, then drop
                await asyncio.wait_for(self.ws.close(1008, reason[:120]), 1.0)
            except (TimeoutError, ConnectionClosed):
                pass
            self.ws.transport.abort()
            raise ConnectionClosedError(None, Close(1008, reason)) from None

    async def send_error(self, e: ProtocolError) -> None:
        await self.send(self.ev.error(e))

    def _options(self, cfg: SessionConfig, voice: str | None) -> SessionOptions:
        d = self.server.config.defaults
        return replace(d, voice=voice, system_prompt=cfg.instructions or d.system_prompt,
                       max_new_tokens=cfg.max_output_tokens or d.max_new_tokens,
                       temperature=d.temperature if cfg.temperature is None else cfg.temperature,
                       transcribe=cfg.transcription is not None)

    def _voice(self, cfg: SessionConfig) -> str | None:
        return self.resolve_voice(cfg.voice, "session.voice") if cfg.audio_out else None

    def resolve_voice(self, v: str | None, param: str) -> str | None:
        """A voice name the client gave -> the checkpoint's voice (ProtocolError ``invalid_value`` if it
        has none of that name); OpenAI's voice names and None map to the server's default voice."""
        voices, default = self.server.voices, self.server.default_voice
        if v is None or (voices is not None and v not in voices and v.lower() in OPENAI_VOICES):
            return default
        if voices is not None and v not in voices:
            raise ProtocolError("invalid_value", f"unknown voice {v!r}: this model has {voices} (OpenAI voice "
                                f"names map to the default, {default})", param)
        return v

    @property
    def last_item_id(self) -> str | None:
        return self.items.last

    def _session_json(self) -> dict:
        o = self.pending_options or self.options
        return self.ev.session(self.sid, self.cfg, o.voice, self.cfg.max_output_tokens)

    # -- lifecycle
    async def run(self) -> None:
        self._bound_send_buffer()
        busy = self.client.admission()
        if busy is not None:  # one more session would make the others fall behind real time
            await self.send_error(ProtocolError("server_busy", f"the server is busy: {busy}; try again later",
                                                type="server_error"))
            await self.ws.close(1013, "server busy: try again later")
            return
        self.options = self._options(self.cfg, self._voice(self.cfg))
        try:
            self.sid = await self.client.open_session(self.options)
        except ClientError as e:
            await self.send_error(ProtocolError("session_unavailable", str(e), type="server_error"))
            await self.ws.close(1013, "no session available")
            return
        except Exception as e:  # the pipeline is broken: say so, in the protocol, before closing
            log.exception("opening a session failed")
            await self.send_error(ProtocolError("server_error", f"cannot open a session: {type(e).__name__}: {e}",
                                                type="server_error"))
            await self.ws.close(1011, "cannot open a session")
            return
        self.server.metrics.session_opened(self)  # metrics
        self._watch_transcripts()
        vad_error = None
        if self.cfg.turn_detection is not None:
            try:
                await self._ensure_vad()
            except ProtocolError as e:  # silero-vad missing: manual turns, and the client is told
                vad_error = e
        try:
            await self.send(self.ev.event("session.created", session=self._session_json()))
            if vad_error is not None:
                await self.send_error(vad_error)
            async for msg in self.ws:
                await self._on_message(msg)
        except ConnectionClosed:
            pass

    def _bound_send_buffer(self) -> None:
        """What a client that stops reading pins in the kernel is bounded (SO_SNDBUF)."""
        n = self.limits.send_buffer_bytes
        sock = self.ws.transport.get_extra_info("socket") if self.ws.transport is not None else None
        if n is not None and sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, n)
            except OSError:
                log.debug("cannot set SO_SNDBUF", exc_info=True)

    def _watch_transcripts(self) -> None:
        """Start forwarding input transcriptions once the session asks for them (only then: a task
        per session that never transcribes cost ~0.3 MB of RSS each under connection churn)."""
        if self.cfg.transcription is not None and self.transcripts_task is None and self.sid is not None:
            self.transcripts_task = asyncio.create_task(self._forward_transcripts())

    async def _forward_transcripts(self) -> None:
        """Input transcription events, as the Thinker produces them (a reply's end also flushes them)."""
        try:
            while self.sid is not None:
                await self.client.wait_transcripts(self.sid)
                await self.flush_transcripts()
        except (ConnectionClosed, ClientError):
            pass

    async def flush_transcripts(self) -> None:
        """Send the transcription events that arrived (``conversation.item.input_audio_transcription.*``)."""
        async with self.transcripts_lock:
            for t in self.client.take_transcripts(self.sid):
                if t.final and t.error is None:
                    self.items.set_transcript(t.item, t.text)
                await self.send(self.ev.transcript(t, t.item))

    async def cleanup(self) -> None:
        if self.transcripts_task is not None:
            self.transcripts_task.cancel()
        if self.response is not None:
            self.response.stop("client_cancelled")
            if self.sid is not None:
                await self.client.cancel(self.sid)
        if self.sid is not None:
            try:
                await self.client.close_session(self.sid)
            except Exception:
                log.debug("close_session failed", exc_info=True)

    async def _ensure_vad(self) -> None:
        from omnistream.apps.vad import ServerVad, VadUnavailable

        td = self.cfg.turn_detection
        if self.buf.vad is None:
            try:
                vad = await asyncio.to_thread(ServerVad, td.threshold, td.silence_duration_ms, td.prefix_padding_ms)
            except VadUnavailable as e:
                self.cfg = replace(self.cfg, turn_detection=None)
                raise ProtocolError("unsupported_feature", str(e), "turn_detection") from None
            self.buf.set_vad(vad)
        else:
            self.buf.vad.configure(td.threshold, td.silence_duration_ms, td.prefix_padding_ms)

    async def _on_message(self, msg) -> None:
        c, lim = self.server.config, self.limits
        try:
            if not self.bucket.take():
                raise ProtocolError("rate_limit_exceeded", f"more than {c.rate_limit:g} events/s: event dropped")
            if len(msg) > lim.offload_bytes:  # JSON, base64 and images of a large message: off the loop
                ev = await asyncio.to_thread(_parse, msg, c.max_message, lim)
            else:
                ev = _parse(msg, c.max_message, lim)
            audio = ev.pcm if isinstance(ev, AudioAppend) else getattr(ev, "audio", None)
            if isinstance(ev, AudioAppend):
                self.bucket.refund()  # an append is charged in audio time instead
            if audio is not None:
                self._charge_audio(len(audio), ev.event_id)
            await self._dispatch(ev)
        except ProtocolError as e:
            await self.send_error(e)
        except ClientError as e:
            await self.send_error(ProtocolError("invalid_request", str(e)))
        except ConnectionClosed:
            raise
        except Exception as e:
            log.exception("session %s: error handling an event", self.sid)
            await self.send_error(ProtocolError("server_error", f"{type(e).__name__}: {e}", type="server_error"))
        await self._take_errors()

    def _charge_audio(self, n: int, event_id: str | None) -> None:
        lim = self.limits
        s = max(n / SAMPLE_RATE, lim.min_append_s)
        if s > lim.audio_burst_s:
            raise ProtocolError("input_too_large", f"{s:.1f} s of audio in one event: at most {lim.audio_burst_s:g} s "
                                "are taken at once (send it in pieces)", "audio", event_id)
        if not self.audio_bucket.take(s):
            raise ProtocolError("rate_limit_exceeded", f"audio arrives faster than {lim.audio_rate:g} s per second "
                                f"(bursts up to {lim.audio_burst_s:g} s): event dropped", "audio", event_id)

    async def _take_errors(self) -> bool:
        """Send the pipeline's input errors; True if a stage loss took the open user turn."""
        lost = False
        for err in self.client.take_errors(self.sid):
            if err.code == "stage_lost" and self._turn_open():
                lost = self.turn_lost = True
            await self.send_error(ProtocolError(err.code, err.message, type="server_error"))
        return lost

    def _turn_open(self) -> bool:
        return self.turn_t0 is not None or self.buf.speaking

    async def _dispatch(self, ev) -> None:
        if isinstance(ev, AudioAppend):
            await self._append(ev.pcm)
        elif isinstance(ev, SessionUpdate):
            await self._session_update(ev)
        elif isinstance(ev, AudioCommit):
            await self._commit(ev)
        elif isinstance(ev, AudioClear):
            await self._clear()
        elif isinstance(ev, ItemCreate):
            await items.create_user(self, ev)
        elif isinstance(ev, MessageCreate):
            await items.create_message(self, ev)
        elif isinstance(ev, FunctionOutput):
            await items.function_output(self, ev)
        elif isinstance(ev, ItemDelete):
            await items.delete(self, ev)
        elif isinstance(ev, ItemRetrieve):
            await items.retrieve(self, ev)
        elif isinstance(ev, ItemTruncate):
            await self._truncate(ev)
        elif isinstance(ev, ResponseCreate):
            await self._response_create(ev)
        elif isinstance(ev, ResponseCancel):
            await self._response_cancel(ev)
        if self._over_cap():
            await self._cap_turn()

    # -- session.update
    async def _session_update(self, ev: SessionUpdate) -> None:
        new = ev.patch.apply(self.cfg)
        if new.tool_choice.startswith("function:") and new.tool_choice[9:] not in {t["name"] for t in new.tools}:
            raise ProtocolError("invalid_value", f"session.tool_choice names {new.tool_choice[9:]!r}, which is not "
                                "among the session's tools", "session.tool_choice", ev.event_id)
        try:
            voice = self._voice(new)
        except ProtocolError as e:
            e.event_id = ev.event_id
            raise
        opts = self._options(new, voice)
        if opts != (self.pending_options or self.options):
            if self.response is not None or self._turn_open():
                self.pending_options = None if opts == self.options else opts  # applied once idle
            else:
                await self.client.update_session(self.sid, opts)  # ClientError (bad voice...) keeps the old
                self.options, self.pending_options = opts, None
        old_td, self.cfg = self.cfg.turn_detection, new
        self._watch_transcripts()
        if ev.patch.dialect is not None:
            self.ev.dialect = ev.patch.dialect
        if new.turn_detection is not None:
            await self._ensure_vad()
        elif old_td is not None and self.buf.speaking:  # VAD off mid-speech: the turn stays open, manual now
            await self._push_turn_audio(self.buf.flush(reset_vad=False))
        await self.send(self.ev.event("session.updated", session=self._session_json()))

    async def _apply_pending(self, opening: bool = False) -> None:
        """A deferred session.update reaches the pipeline: only when no reply runs and no turn is
        open (``opening``: a turn is about to open, nothing of it has reached the pipeline yet)."""
        opts = self.pending_options
        if opts is None or self.response is not None or (self._turn_open() and not opening) or self.sid is None:
            return
        self.pending_options = None
        try:
            await self.client.update_session(self.sid, opts)
            self.options = opts
        except ClientError as e:
            await self.send_error(ProtocolError("invalid_request", f"session.update could not be applied: {e}"))

    # -- input audio
    async def _push_turn_audio(self, pcm: np.ndarray | None) -> None:
        if pcm is None or len(pcm) == 0:
            return
        await self._open_turn()
        await self._flush_idle_frame()
        if self.turn_samples < items.RETAINED_AUDIO_S * SAMPLE_RATE:
            self.turn_pcm.append(pcm)
        self.turn_samples += len(pcm)
        await self.client.push_audio(self.sid, pcm, SAMPLE_RATE)

    async def _open_turn(self) -> None:
        if self.turn_t0 is None:
            await self._apply_pending(opening=True)
            self.turn_t0 = time.monotonic()

    async def _append(self, pcm: np.ndarray) -> None:
        td = self.cfg.turn_detection
        if len(pcm) > self.limits.offload_vad_s * SAMPLE_RATE and td is not None and self.buf.vad is not None:
            steps = await asyncio.to_thread(self.buf.append, pcm, td)
        else:
            steps = self.buf.append(pcm, td)
        for st in steps:
            if st.kind == "audio":
                await self._push_turn_audio(st.pcm)
            elif st.kind == "speech_started":
                await self._speech_started(st.ms)
            else:
                item_id = self.user_item_id = self.user_item_id or new_id("item")
                await self.send(self.ev.event("input_audio_buffer.speech_stopped", audio_end_ms=st.ms,
                                              item_id=item_id))
                await self._commit_turn(auto=td.create_response)

    async def _speech_started(self, ms: int) -> None:
        self.user_item_id = new_id("item")
        r = self.response
        td = self.cfg.turn_detection
        interrupted = r is not None and td.interrupt_response and r.stopped is None
        truncate = interrupted and r.audio and not r.out_of_band  # an out-of-band reply is not in the conversation
        if interrupted:
            played_ms = r.played() * 1000 // SAMPLE_RATE  # whole ms, as conversation.item.truncate has it
            r.stop("turn_detected")  # no audio delta leaves after this point
            await self.client.cancel(self.sid)
        await self.send(self.ev.event("input_audio_buffer.speech_started", audio_start_ms=ms,
                                      item_id=self.user_item_id))
        if truncate:
            try:  # queued behind the cancelled reply, before this turn's audio
                await self.client.truncate(self.sid, played_ms * SAMPLE_RATE // 1000)
            except Exception:
                log.debug("truncate after barge-in failed", exc_info=True)
            else:
                r.truncated_ms = played_ms
                await self.send(self.ev.event("conversation.item.truncated", item_id=r.item_id, content_index=0,
                                              audio_end_ms=r.truncated_ms))

    async def _commit(self, ev: AudioCommit) -> None:
        await self._push_turn_audio(self.buf.flush())
        if self.turn_samples < SAMPLE_RATE // 10 and not self.turn_lost:
            raise ProtocolError("input_audio_buffer_commit_empty", "buffer too small: expected at least 100 ms "
                                f"of audio, the buffer holds {self.turn_samples * 1000 // SAMPLE_RATE} ms",
                                event_id=ev.event_id)
        await self._commit_turn(auto=False)

    async def _commit_turn(self, auto: bool) -> None:
        item_id = self.user_item_id or new_id("item")
        self.user_item_id = None
        if await self._lost_turn():
            return
        await self._seal_frames_only_turn()
        async with self.transcripts_lock:  # the item's transcription events never precede its committed event
            await self.client.commit(self.sid, transcribe=item_id if self.options.transcribe else None, item=item_id)
            if await self._take_errors():  # the commit itself found a stage gone
                await self._lost_turn()
                return
            self.items.link(self.turn_items, item_id)
            pcm = np.concatenate(self.turn_pcm) if self.turn_pcm else None
            self._turn_closed()
            prev = self.items.add(self.ev.user_item(item_id, [{"type": "input_audio", "transcript": None}]), item_id)
            if pcm is not None:
                self.items.keep_audio(item_id, pcm)
            await self.send(self.ev.event("input_audio_buffer.committed", item_id=item_id, previous_item_id=prev))
            await self.send(self.ev.event("conversation.item.created", previous_item_id=prev,
                                          item=self.items.items[item_id]))
        if auto:
            await self._start_response()

    async def _lost_turn(self) -> bool:
        """A turn the pipeline lost is dropped, not committed: the client is told (stage_lost)."""
        await self._take_errors()
        if not self.turn_lost:
            return False
        await self.send_error(ProtocolError("stage_lost", "the user turn was lost with a pipeline stage and is not "
                                            "committed: nothing was answered; please say it again",
                                            type="server_error"))
        await self._clear(announce=False)
        return True

    def _turn_closed(self) -> None:
        self.turn_samples, self.turn_t0, self.last_frame_t, self.turn_frames = 0, None, -1.0, 0
        self.turn_lost = False
        self.turn_items, self.turn_pcm = [], []

    async def _seal_frames_only_turn(self) -> None:
        """A turn of camera frames without audio goes to the model as video with a silent
        soundtrack (what a muted microphone sends): the Thinker's audio-in-video layout needs both."""
        if self.turn_frames and not self.turn_samples:
            await self._push_turn_audio(np.zeros(int(max(0.5, self.last_frame_t + 0.5) * SAMPLE_RATE), np.int16))

    async def _clear(self, announce: bool = True) -> None:
        self.buf.clear()
        self.idle_frame, self.user_item_id = None, None
        await self.client.clear(self.sid)
        self._turn_closed()
        if announce:
            await self.send(self.ev.event("input_audio_buffer.cleared"))
        await self._apply_pending()

    def _over_cap(self) -> bool:
        return self.turn_t0 is not None and (self.turn_samples >= self.limits.max_turn_s * SAMPLE_RATE
                                             or self.last_frame_t >= self.limits.max_turn_s)

    async def _cap_turn(self) -> None:
        """The open turn reached ``max_turn_s``: it is committed as it is (no reply is started
        for it) and what follows is a new turn."""
        await self.send_error(ProtocolError("turn_too_long", f"the user turn reached max_turn_s="
                                            f"{self.limits.max_turn_s:g} s: it was committed as it is (no reply); "
                                            "what follows starts a new turn", "audio"))
        await self._push_turn_audio(self.buf.flush())
        await self._commit_turn(auto=False)

    # -- items
    async def _push_frame(self, frame: np.ndarray) -> None:
        await self._open_turn()
        t = max(self.turn_samples / SAMPLE_RATE, time.monotonic() - self.turn_t0, self.last_frame_t + 1e-3)
        self.last_frame_t = t
        self.turn_frames += 1
        await self.client.push_frame(self.sid, frame, t)

    async def _flush_idle_frame(self) -> None:
        f, self.idle_frame = self.idle_frame, None
        if f is not None:
            await self._push_frame(f)

    async def _truncate(self, ev: ItemTruncate) -> None:
        r = self.last_reply
        if r is None or ev.item_id != r.item_id:
            raise ProtocolError("item_truncate_invalid_item_id", f"no assistant audio item {ev.item_id!r} to "
                                "truncate (only the latest reply can be)", "item_id", ev.event_id)
        if ev.content_index != 0 or not r.audio:
            raise ProtocolError("invalid_value", "the item has no audio content part at that index",
                                "content_index", ev.event_id)
        samples = ev.audio_end_ms * SAMPLE_RATE // 1000
        if samples > r.sent:
            raise ProtocolError("invalid_value", f"audio_end_ms {ev.audio_end_ms} is beyond the item's audio "
                                f"({r.sent * 1000 // SAMPLE_RATE} ms)", "audio_end_ms", ev.event_id)
        if r.stopped is None and self.response is r:  # truncating a reply still playing stops it
            r.stop("client_cancelled")
            await self.client.cancel(self.sid)
        try:
            await self.client.truncate(self.sid, samples)
        except RuntimeError as e:
            raise ProtocolError("item_truncate_invalid_item_id", str(e), "item_id", ev.event_id) from None
        await self.send(self.ev.event("conversation.item.truncated", item_id=r.item_id, content_index=0,
                                      audio_end_ms=ev.audio_end_ms))

    # -- responses
    async def _response_create(self, ev: ResponseCreate) -> None:
        if self.response is not None:
            raise ProtocolError("conversation_already_has_active_response", "Conversation already has an active "
                                f"response in progress: {self.response.id}", event_id=ev.event_id)
        if ev.out_of_band and self._turn_open():
            raise ProtocolError("item_busy", "an out-of-band response answers the conversation as it is: commit or "
                                "clear the open user turn first", "response.conversation", ev.event_id)
        await self._push_turn_audio(self.buf.flush())  # mid-speech: the turn so far is the input
        if not ev.out_of_band:  # (the latest camera frame waits for the next turn)
            await self._flush_idle_frame()
        if self._turn_open() and await self._lost_turn():
            return
        reply = Reply(self, self.response, ev)  # checks the response's own settings (voice...) first
        await self._seal_frames_only_turn()
        self._turn_closed()  # the pipeline commits an open turn before replying
        await self._start_response(reply)

    async def _response_cancel(self, ev: ResponseCancel) -> None:
        r = self.response
        if r is None or r.stopped is not None or (ev.response_id and ev.response_id != r.id):
            raise ProtocolError("response_cancel_not_active", "Cancellation failed: no active response found",
                                "response_id", ev.event_id)
        r.stop("client_cancelled")
        await self.client.cancel(self.sid)

    async def _start_response(self, r: Reply | None = None) -> None:
        r = r or Reply(self, self.response)
        self.response = r
        if not r.out_of_band:  # (an out-of-band reply is not in the conversation: nothing to truncate there)
            self.last_reply = r
        r.task = asyncio.create_task(r.run())

    def response_finished(self, r: Reply) -> None:
        """The reply ended (called before its ``response.done`` leaves: the client may answer it at once)."""
        if self.response is r:
            self.response = None
