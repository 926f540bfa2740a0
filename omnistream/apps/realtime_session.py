"""One Realtime session: a WebSocket's client events in, the pipeline's reply out, paced.

:class:`RealtimeSession` owns the session state the protocol implies -- the input audio buffer
(with server VAD, only speech and its prefix padding reach the model, so a long silence does not
fill the context), the conversation's item ids, the active response -- and maps each client event
onto the :class:`~omnistream.runtime.client.Client` calls. :class:`_Response` streams one reply:
text deltas at once, audio re-chunked into 40 ms deltas sent at real-time pace with at most
``output_lead_ms`` of lead (Pipecat's rule), so a barge-in takes effect at once and the server
knows how much the user heard: on ``speech_started`` during a reply the reply is cancelled (epoch
bump), no further audio goes out, and the conversation is truncated to the played samples
(``conversation.item.truncated`` tells the client).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque
from dataclasses import replace

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from omnistream.apps.realtime import (
    OPENAI_VOICES,
    SAMPLE_RATE,
    AudioAppend,
    AudioClear,
    AudioCommit,
    ItemCreate,
    ItemTruncate,
    ProtocolError,
    ResponseCancel,
    ResponseCreate,
    ServerEvents,
    SessionConfig,
    SessionUpdate,
    encode_pcm16,
    parse_client_event,
)
from omnistream.runtime.client import AudioDelta, ClientError, ResponseDone, SessionError, SessionOptions, TextDelta

log = logging.getLogger(__name__)


def subprotocols(headers) -> list[str]:
    """The subprotocols a handshake offered (one header or several, comma-separated)."""
    return [p.strip() for h in headers.get_all("Sec-WebSocket-Protocol") for p in h.split(",") if p.strip()]


class _TokenBucket:
    """``rate`` events per second on average, bursts of up to ``burst`` (rate <= 0: no limit)."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst, self.tokens, self.t = rate, burst, burst, time.monotonic()

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class RealtimeSession:
    """One WebSocket = one Realtime session = one pipeline session."""

    def __init__(self, server, ws: ServerConnection):
        self.server, self.ws, self.client = server, ws, server.client
        c = server.config
        beta = "realtime=v1" in ws.request.headers.get("OpenAI-Beta", "") or \
            "openai-beta.realtime-v1" in subprotocols(ws.request.headers)
        self.ev = ServerEvents("beta" if beta else "ga")
        self.cfg = SessionConfig(turn_detection=SessionConfig().turn_detection if c.server_vad else None)
        self.bucket = _TokenBucket(c.rate_limit, c.rate_burst or max(50.0, 2 * c.rate_limit))
        self.sid: str | None = None
        self.options: SessionOptions | None = None
        self.vad = None
        self.audio_pos = 0  # 24 kHz samples appended during the session
        self.hist = np.zeros(0, np.int16)  # VAD mode: recent audio from hist_pos on, not yet in a turn
        self.hist_pos = 0
        self.speaking = False
        self.turn_from = 0  # VAD mode: first sample of the current turn not yet pushed
        self.turn_samples = 0  # samples in the open user turn (the "input audio buffer")
        self.turn_t0: float | None = None  # monotonic time the open turn began (frame clock)
        self.last_frame_t = -1.0
        self.turn_frames = 0  # camera frames in the open user turn
        self.idle_frame = None  # VAD mode, no speech: only the latest camera frame is kept
        self.user_item_id: str | None = None
        self.last_item_id: str | None = None
        self.response: _Response | None = None
        self.last_reply: _Response | None = None

    # -- plumbing
    async def send(self, event: dict) -> None:
        await self.ws.send(json.dumps(event))

    async def send_error(self, e: ProtocolError) -> None:
        await self.send(self.ev.error(e))

    def _options(self, cfg: SessionConfig, voice: str | None) -> SessionOptions:
        d = self.server.config.defaults
        return replace(d, voice=voice, system_prompt=cfg.instructions or d.system_prompt,
                       max_new_tokens=cfg.max_output_tokens or d.max_new_tokens,
                       temperature=d.temperature if cfg.temperature is None else cfg.temperature)

    def _voice(self, cfg: SessionConfig) -> str | None:
        if not cfg.audio_out:
            return None
        v, voices, default = cfg.voice, self.server.voices, self.server.default_voice
        if v is None or (voices is not None and v not in voices and v.lower() in OPENAI_VOICES):
            return default  # OpenAI's voice names map to the server's default voice
        if voices is not None and v not in voices:
            raise ProtocolError("invalid_value", f"unknown voice {v!r}: this model has {voices} (OpenAI voice "
                                f"names map to the default, {default})", "session.voice")
        return v

    def _session_json(self) -> dict:
        return self.ev.session(self.sid, self.cfg, self.options.voice, self.cfg.max_output_tokens)

    # -- lifecycle
    async def run(self) -> None:
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
        vad_error = None
        if self.cfg.turn_detection is not None:
            try:
                await self._ensure_vad()
            except ProtocolError as e:  # silero-vad missing: manual turns, and the client is told
                vad_error = e
        await self.send(self.ev.event("session.created", session=self._session_json()))
        if vad_error is not None:
            await self.send_error(vad_error)
        try:
            async for msg in self.ws:
                await self._on_message(msg)
        except ConnectionClosed:
            pass

    async def cleanup(self) -> None:
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
        if self.vad is None:
            try:
                self.vad = await asyncio.to_thread(ServerVad, td.threshold, td.silence_duration_ms,
                                                   td.prefix_padding_ms)
            except VadUnavailable as e:
                self.cfg = replace(self.cfg, turn_detection=None)
                raise ProtocolError("unsupported_feature", str(e), "turn_detection") from None
            self.vad.skip(self.audio_pos)
        else:
            self.vad.configure(td.threshold, td.silence_duration_ms, td.prefix_padding_ms)

    async def _on_message(self, msg) -> None:
        c = self.server.config
        try:
            if not self.bucket.take():
                raise ProtocolError("rate_limit_exceeded", f"more than {c.rate_limit:g} events/s: event dropped")
            size = len(msg) if isinstance(msg, bytes) else (len(msg) if len(msg) * 4 <= c.max_message
                                                            else len(msg.encode("utf-8", "surrogatepass")))
            if size > c.max_message:
                raise ProtocolError("message_too_large", f"message of {size} bytes is over the "
                                    f"{c.max_message} byte limit: event dropped")
            await self._dispatch(parse_client_event(msg))
        except ProtocolError as e:
            await self.send_error(e)
        except ClientError as e:
            await self.send_error(ProtocolError("invalid_request", str(e)))
        except ConnectionClosed:
            raise
        except Exception as e:
            log.exception("session %s: error handling an event", self.sid)
            await self.send_error(ProtocolError("server_error", f"{type(e).__name__}: {e}", type="server_error"))
        for err in self.client.take_errors(self.sid):
            await self.send_error(ProtocolError(err.code, err.message))

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
            await self._item_create(ev)
        elif isinstance(ev, ItemTruncate):
            await self._truncate(ev)
        elif isinstance(ev, ResponseCreate):
            await self._response_create(ev)
        elif isinstance(ev, ResponseCancel):
            await self._response_cancel(ev)

    # -- session.update
    async def _session_update(self, ev: SessionUpdate) -> None:
        new = ev.patch.apply(self.cfg)
        try:
            voice = self._voice(new)
        except ProtocolError as e:
            e.event_id = ev.event_id
            raise
        opts = self._options(new, voice)
        if opts != self.options:
            await self.client.update_session(self.sid, opts)  # ClientError (bad voice...) keeps the old
            self.options = opts
        old_td, self.cfg = self.cfg.turn_detection, new
        if ev.patch.dialect is not None:
            self.ev.dialect = ev.patch.dialect
        if new.turn_detection is not None:
            await self._ensure_vad()
        elif old_td is not None and self.speaking:  # VAD off mid-speech: the turn stays open, manual now
            await self._push_hist(self.audio_pos)
            self.speaking = False
        await self.send(self.ev.event("session.updated", session=self._session_json()))

    # -- input audio
    async def _push_turn_audio(self, pcm: np.ndarray) -> None:
        if len(pcm) == 0:
            return
        if self.turn_t0 is None:
            self.turn_t0 = time.monotonic()
        await self._flush_idle_frame()
        self.turn_samples += len(pcm)
        await self.client.push_audio(self.sid, pcm, SAMPLE_RATE)

    async def _append(self, pcm: np.ndarray) -> None:
        if len(pcm) == 0:
            return
        self.audio_pos += len(pcm)
        td = self.cfg.turn_detection
        if td is None or self.vad is None:
            if self.vad is not None:
                self.vad.skip(len(pcm))
            await self._push_turn_audio(pcm)
            return
        self.hist = np.concatenate([self.hist, pcm])
        for e in self.vad.push(pcm):
            p = e.ms * SAMPLE_RATE // 1000
            if e.kind == "speech_started":
                self.turn_from = max(p, self.hist_pos)
                self.speaking = True
                await self._speech_started(e.ms)
            elif self.speaking:
                await self._push_hist(min(p, self.audio_pos))
                self.speaking = False
                item_id = self.user_item_id = self.user_item_id or _new_id("item")
                await self.send(self.ev.event("input_audio_buffer.speech_stopped", audio_end_ms=e.ms,
                                              item_id=item_id))
                await self._commit_turn(auto=td.create_response)
                self._drop_hist(p)
        if self.speaking:
            await self._push_hist(self.audio_pos)
            self._drop_hist(self.audio_pos)
        else:  # keep enough for the prefix padding of a start detected up to a window late
            self._drop_hist(self.audio_pos - (td.prefix_padding_ms + 300) * SAMPLE_RATE // 1000)

    async def _push_hist(self, end: int) -> None:
        a, b = self.turn_from - self.hist_pos, end - self.hist_pos
        if b > a:
            await self._push_turn_audio(self.hist[max(a, 0):b])
            self.turn_from = end

    def _drop_hist(self, before: int) -> None:
        k = min(max(before - self.hist_pos, 0), len(self.hist))
        if k:
            self.hist = self.hist[k:].copy()
            self.hist_pos += k

    async def _speech_started(self, ms: int) -> None:
        self.user_item_id = _new_id("item")
        r = self.response
        td = self.cfg.turn_detection
        interrupted = r is not None and td.interrupt_response and r.stopped is None
        if interrupted:
            played_ms = r.played() * 1000 // SAMPLE_RATE  # whole ms, as conversation.item.truncate has it
            r.stop("turn_detected")  # no audio delta leaves after this point
            await self.client.cancel(self.sid)
        await self.send(self.ev.event("input_audio_buffer.speech_started", audio_start_ms=ms,
                                      item_id=self.user_item_id))
        if interrupted and r.audio:
            try:  # queued behind the cancelled reply, before this turn's audio
                await self.client.truncate(self.sid, played_ms * SAMPLE_RATE // 1000)
            except Exception:
                log.debug("truncate after barge-in failed", exc_info=True)
            else:
                r.truncated_ms = played_ms
                await self.send(self.ev.event("conversation.item.truncated", item_id=r.item_id, content_index=0,
                                              audio_end_ms=r.truncated_ms))

    async def _commit(self, ev: AudioCommit) -> None:
        if self.speaking:
            await self._push_hist(self.audio_pos)
            self.vad.reset()
            self.speaking = False
        if self.turn_samples < SAMPLE_RATE // 10:
            raise ProtocolError("input_audio_buffer_commit_empty", "buffer too small: expected at least 100 ms "
                                f"of audio, the buffer holds {self.turn_samples * 1000 // SAMPLE_RATE} ms",
                                event_id=ev.event_id)
        await self._commit_turn(auto=False)

    async def _commit_turn(self, auto: bool) -> None:
        item_id = self.user_item_id or _new_id("item")
        self.user_item_id = None
        await self._seal_frames_only_turn()
        await self.client.commit(self.sid)
        self._turn_closed()
        await self.send(self.ev.event("input_audio_buffer.committed", item_id=item_id,
                                      previous_item_id=self.last_item_id))
        await self.send(self.ev.event("conversation.item.created", previous_item_id=self.last_item_id,
                                      item=self.ev.user_item(item_id, [{"type": "input_audio", "transcript": None}])))
        self.last_item_id = item_id
        if auto:
            await self._start_response()

    def _turn_closed(self) -> None:
        self.turn_samples, self.turn_t0, self.last_frame_t, self.turn_frames = 0, None, -1.0, 0

    async def _seal_frames_only_turn(self) -> None:
        """A turn of camera frames without audio goes to the model as video with a silent
        soundtrack (what a muted microphone sends): the Thinker's audio-in-video layout needs both."""
        if self.turn_frames and not self.turn_samples:
            await self._push_turn_audio(np.zeros(int(max(0.5, self.last_frame_t + 0.5) * SAMPLE_RATE), np.int16))

    async def _clear(self) -> None:
        if self.vad is not None:
            self.vad.reset()
        self.speaking, self.idle_frame, self.user_item_id = False, None, None
        self._drop_hist(self.audio_pos)
        self.turn_from = self.audio_pos
        await self.client.clear(self.sid)
        self._turn_closed()
        await self.send(self.ev.event("input_audio_buffer.cleared"))

    # -- items
    async def _push_frame(self, frame: np.ndarray) -> None:
        now = time.monotonic()
        if self.turn_t0 is None:
            self.turn_t0 = now
        t = max(self.turn_samples / SAMPLE_RATE, now - self.turn_t0, self.last_frame_t + 1e-3)
        self.last_frame_t = t
        self.turn_frames += 1
        await self.client.push_frame(self.sid, frame, t)

    async def _flush_idle_frame(self) -> None:
        f, self.idle_frame = self.idle_frame, None
        if f is not None:
            await self._push_frame(f)

    async def _item_create(self, ev: ItemCreate) -> None:
        item_id = ev.item_id or _new_id("item")
        content = []
        idle = self.cfg.turn_detection is not None and not self.speaking and self.turn_t0 is None
        for img in ev.images:
            if idle and ev.text is None and ev.audio is None:
                self.idle_frame = img  # latest-only until speech (or a response) opens the turn
            else:
                await self._flush_idle_frame()
                await self._push_frame(img)
            content.append({"type": "input_image", "image_url": None})
        if ev.audio is not None:
            await self._push_turn_audio(ev.audio)
            content.append({"type": "input_audio", "transcript": None})
        if ev.text is not None:
            await self._flush_idle_frame()
            if self.speaking:
                await self._push_hist(self.audio_pos)
                self.vad.reset()
                self.speaking = False
            await self._seal_frames_only_turn()
            await self.client.commit(self.sid, ev.text)
            self._turn_closed()
            content.append({"type": "input_text", "text": ev.text})
        await self.send(self.ev.event("conversation.item.created", previous_item_id=ev.previous_item_id or
                                      self.last_item_id, item=self.ev.user_item(item_id, content)))
        self.last_item_id = item_id

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
        if self.speaking:  # mid-speech: the turn so far is the input
            await self._push_hist(self.audio_pos)
            self.vad.reset()
            self.speaking = False
        await self._flush_idle_frame()
        await self._seal_frames_only_turn()
        self._turn_closed()  # the pipeline commits an open turn before replying
        await self._start_response()

    async def _response_cancel(self, ev: ResponseCancel) -> None:
        r = self.response
        if r is None or r.stopped is not None or (ev.response_id and ev.response_id != r.id):
            raise ProtocolError("response_cancel_not_active", "Cancellation failed: no active response found",
                                "response_id", ev.event_id)
        r.stop("client_cancelled")
        await self.client.cancel(self.sid)

    async def _start_response(self) -> None:
        prev = self.response
        r = _Response(self, prev)
        self.response = self.last_reply = r
        r.task = asyncio.create_task(r.run())

    def response_finished(self, r: _Response) -> None:
        if self.response is r:
            self.response = None


class _Response:
    """One reply: streams the pipeline's events out, pacing the audio in real time."""

    def __init__(self, conn: RealtimeSession, prev: _Response | None):
        self.conn, self.prev = conn, prev
        self.id, self.item_id = _new_id("resp"), _new_id("item")
        self.audio = conn.options.voice is not None
        self.voice = conn.options.voice
        self.max_tokens = conn.options.max_new_tokens
        self.task: asyncio.Task | None = None
        self.stopped: str | None = None  # cancel reason: "turn_detected" | "client_cancelled"
        self.truncated_ms: int | None = None
        self.pending: deque = deque()  # int16 pieces not yet sent
        self.pending_n = 0
        self.sent = 0  # samples sent
        self._play_pos, self._play_t = 0.0, None  # estimated samples played by the client
        self.wake = asyncio.Event()
        self.gen_done = False
        self.text: list[str] = []

    def stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason
            self.pending.clear()
            self.pending_n = 0
            self.wake.set()

    def played(self) -> int:
        """Samples the client has played: real time since the first chunk, stalling when it ran dry."""
        now = time.monotonic()
        if self._play_t is not None:
            self._play_pos = min(float(self.sent), self._play_pos + (now - self._play_t) * SAMPLE_RATE)
        self._play_t = now
        return int(self._play_pos)

    async def run(self) -> None:
        c = self.conn
        try:
            if self.prev is not None and self.prev.task is not None:
                await asyncio.shield(self.prev.task)  # an auto-response waits for the one it follows
            await self._run()
        except ConnectionClosed:
            self.stop("client_cancelled")
            try:  # the connection's cleanup may have closed the session already
                await c.client.cancel(c.sid)
            except ClientError:
                pass
        except Exception as e:
            log.exception("session %s: response failed", c.sid)
            try:
                await c.send_error(ProtocolError("server_error", f"{type(e).__name__}: {e}", type="server_error"))
            except ConnectionClosed:
                pass
        finally:
            c.response_finished(self)

    async def _run(self) -> None:
        c, ev = self.conn, self.conn.ev
        prev_item = c.last_item_id
        await c.send(ev.event("response.created", response=ev.response(
            self.id, "in_progress", self.audio, self.voice, max_output_tokens=self.max_tokens)))
        item = ev.assistant_item(self.item_id, "in_progress", self.audio)
        await c.send(ev.event("response.output_item.added", response_id=self.id, output_index=0, item=item))
        await c.send(ev.event("conversation.item.created", previous_item_id=prev_item, item=item))
        c.last_item_id = self.item_id
        ids = {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "content_index": 0}
        await c.send(ev.event("response.content_part.added", **ids, part=ev.part(self.audio)))
        pacer = asyncio.create_task(self._pace(ids))
        done: ResponseDone | None = None
        failure: SessionError | None = None
        try:
            if self.stopped is None:  # a barge-in before the reply began: nothing to generate
                async for e in c.client.respond(c.sid):
                    if isinstance(e, TextDelta):
                        self.text.append(e.text)
                        if self.stopped is None:
                            kind = "response.output_audio_transcript.delta" if self.audio else \
                                "response.output_text.delta"
                            await c.send(ev.event(kind, **ids, delta=e.text))
                    elif isinstance(e, AudioDelta):
                        if self.stopped is None and self.audio:
                            pcm = np.round(np.clip(e.pcm, -1.0, 1.0) * 32767.0).astype(np.int16)
                            self.pending.append(pcm)
                            self.pending_n += len(pcm)
                            self.wake.set()
                    elif isinstance(e, ResponseDone):
                        done = e
                    elif isinstance(e, SessionError):
                        failure = e
        finally:
            self.gen_done = True
            self.wake.set()
            await pacer
        text = "".join(self.text)
        if failure is not None:
            await c.send_error(ProtocolError(failure.code, failure.message, type="server_error"))
            status, details = "failed", {"type": "failed", "error": {"type": "server_error", "code": failure.code,
                                                                     "message": failure.message}}
        elif self.stopped is not None:
            status, details = "cancelled", {"type": "cancelled", "reason": self.stopped}
        elif done is not None and done.reply_tokens >= self.max_tokens:
            status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        else:
            status, details = "completed", None
        if self.audio:
            await c.send(ev.event("response.output_audio.done", **ids))
            await c.send(ev.event("response.output_audio_transcript.done", **ids, transcript=text))
        else:
            await c.send(ev.event("response.output_text.done", **ids, text=text))
        await c.send(ev.event("response.content_part.done", **ids, part=ev.part(self.audio, text)))
        item = ev.assistant_item(self.item_id, "completed" if status == "completed" else "incomplete", self.audio,
                                 text)
        await c.send(ev.event("response.output_item.done", response_id=self.id, output_index=0, item=item))
        n = done.reply_tokens if done is not None else 0
        usage = {"total_tokens": n, "input_tokens": 0, "output_tokens": n}
        stats = {"audio_samples": self.sent, **(done.stats if done is not None else {})}
        r = ev.response(self.id, status, self.audio, self.voice, [item], details, usage, self.max_tokens)
        r["metadata"] = {k: str(v) for k, v in stats.items()}  # server timings, for clients that care
        await c.send(ev.event("response.done", response=r))

    async def _pace(self, ids: dict) -> None:
        """Send reply audio in ``chunk_samples`` deltas, never more than ``output_lead_ms`` ahead."""
        c, cfg = self.conn, self.conn.server.config
        chunk, lead = cfg.chunk_samples, cfg.output_lead_ms * SAMPLE_RATE / 1000
        while self.stopped is None:
            if self.pending_n >= chunk or (self.gen_done and self.pending_n > 0):
                n = min(chunk, self.pending_n)
                while self.sent and (wait := (self.sent + n - self.played() - lead) / SAMPLE_RATE) > 0:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), wait)
                    except TimeoutError:
                        pass
                    if self.stopped is not None:
                        return
                pcm = self._take(n)
                self.played()
                self.sent += n
                await c.send(c.ev.event("response.output_audio.delta", **ids, delta=encode_pcm16(pcm)))
            elif self.gen_done:
                return
            else:
                self.wake.clear()
                await self.wake.wait()

    def _take(self, n: int) -> np.ndarray:
        out, need = [], n
        while need:
            head = self.pending[0]
            if len(head) <= need:
                out.append(self.pending.popleft())
                need -= len(head)
            else:
                out.append(head[:need])
                self.pending[0] = head[need:]
                need = 0
        self.pending_n -= n
        return np.concatenate(out) if len(out) > 1 else out[0]
