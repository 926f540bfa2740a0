"""The client half of the pipeline, whatever carries its messages.

:class:`WireClient` implements :class:`~omnistream.runtime.client.Client` over the pipeline's
messages (:mod:`omnistream.runtime.wire`): session ops and user media go to the first worker of
the chain (the encoders), events come back from the workers (text deltas from the thinker, PCM
from token2wav, ``Done`` parts, acks and errors). It keeps the per-session bookkeeping -- epochs,
replies in flight matched to their events, input errors -- in one place. Two transports sit under
it: :class:`~omnistream.runtime.client.InProcClient` (the same workers on a thread of this
process, messages handed over in memory) and :class:`~omnistream.runtime.procclient.MultiProcClient`
(stage processes linked by ZeroMQ). The same tests run against both.

Barge-in (:meth:`WireClient.cancel`) bumps the session's epoch, broadcasts it at once and stamps
every later op with it; every worker drops reply work of older epochs, and this client drops any
late event of an older epoch before it reaches the caller.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from abc import abstractmethod
from collections import deque
from collections.abc import AsyncIterator

import numpy as np

from omnistream.runtime import wire
from omnistream.runtime.client import (
    ArgumentsDelta,
    AudioDelta,
    Client,
    ClientError,
    Event,
    ResponseDone,
    ResponseOptions,
    SessionError,
    SessionOptions,
    TextDelta,
    Transcript,
)
from omnistream.runtime.session import options_to_wire

log = logging.getLogger("omnistream.client")


class _Reply:
    """A respond() in flight: events are matched to it by epoch and by part (text / audio)."""

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.queue: asyncio.Queue = asyncio.Queue()
        self.t0 = time.perf_counter()
        self.text_done: wire.Done | None = None
        self.audio_done: wire.Done | None = None
        self.samples = 0
        self.ttft_s = self.first_audio_s = 0.0


class _Session:
    def __init__(self, sid: str, options: SessionOptions):
        self.sid = sid
        self.options = options
        self.epoch = 0
        self.seq = itertools.count(1)
        self.replies: deque[_Reply] = deque()
        self.errors: list[SessionError] = []
        self.media_open = False  # user media pushed since the last commit/clear/respond
        self.reset_turn = False  # an encoders restart lost the open turn: clear it in the thinker
        self.reset_conv = False  # a thinker/talker restart lost the conversation: rebuild it fresh
        self.transcripts: list[Transcript] = []  # input transcription events not yet taken
        self.transcript_ready = asyncio.Event()


class WireClient(Client):
    """Sessions over the pipeline's messages; subclasses carry them (see the module docstring)."""

    def __init__(self, *, max_sessions: int = 8, op_timeout_s: float = 120.0):
        self.max_sessions = max_sessions
        self.op_timeout_s = op_timeout_s
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count(1)
        self._reqs = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future]] = {}
        self._closed = False
        self._draining = False

    # ------------------------------------------------------------------ transport (subclasses)
    @abstractmethod
    async def _ready(self) -> None:
        """Wait until the workers serve (raise ClientError when they cannot)."""

    @abstractmethod
    async def _post(self, msg, frames: list | None = None) -> None:
        """Hand ``msg`` (``frames``: its wire encoding when already made) to the first worker of the chain."""

    @abstractmethod
    async def _broadcast(self, msg: wire.Epoch) -> None:
        """Deliver a barge-in epoch to every worker at once."""

    async def drain(self, timeout_s: float = 30.0) -> None:
        """SIGTERM path: take no new replies, let running ones finish (bounded), then close."""
        self._draining = True
        end = time.monotonic() + timeout_s
        while any(s.replies for s in self._sessions.values()) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        await self.close()

    # ------------------------------------------------------------------ helpers
    def _session(self, sid: str) -> _Session:
        try:
            return self._sessions[sid]
        except KeyError:
            raise ClientError(f"unknown session {sid!r}") from None

    async def _call(self, sid: str, make) -> wire.Result:
        """Send ``make(req)`` and wait for its Result (raised as ClientError when it carries an error)."""
        req = next(self._reqs)
        fut = asyncio.get_running_loop().create_future()
        self._pending[req] = (sid, fut)
        try:
            await self._post(make(req))
            res = await asyncio.wait_for(fut, self.op_timeout_s)
        except TimeoutError:
            raise ClientError(f"session {sid}: no answer from the pipeline in {self.op_timeout_s:.0f}s") from None
        finally:
            self._pending.pop(req, None)
        if res.error is not None:
            raise ClientError(res.error, res.code)
        return res

    # ------------------------------------------------------------------ sessions
    async def open_session(self, options: SessionOptions | None = None) -> str:
        await self._ready()
        if self._draining:
            raise ClientError("the server is shutting down")
        if len(self._sessions) >= self.max_sessions:
            raise ClientError(f"too many sessions (max {self.max_sessions})")
        sid = f"sess_{next(self._ids)}"
        s = _Session(sid, options or SessionOptions())
        self._sessions[sid] = s
        try:
            await self._call(sid, lambda req: wire.OpenSession(session=sid, epoch=0, options=options_to_wire(s.options),
                                                               req=req))
        except ClientError:
            self._sessions.pop(sid, None)
            await self._post(wire.CloseSession(session=sid))
            raise
        return sid

    async def close_session(self, sid: str) -> None:
        s = self._sessions.pop(sid, None)
        if s is not None:
            self._fail_replies(s, "closed", "the session was closed")
            s.transcript_ready.set()  # wait_transcripts returns: the session is gone
            if not self._closed:
                await self._post(wire.CloseSession(session=sid))

    async def update_session(self, sid: str, options: SessionOptions) -> None:
        s = self._session(sid)
        await self._ready()
        await self._call(sid, lambda req: wire.OpenSession(session=sid, epoch=s.epoch, options=options_to_wire(options),
                                                           req=req))
        s.options = options  # (a ClientError -- e.g. an unknown voice -- keeps the old ones)

    # ------------------------------------------------------------------ input
    async def push_audio(self, sid: str, pcm: np.ndarray, sample_rate: int) -> None:
        s = self._session(sid)
        await self._ready()
        try:
            x = _wire_array(pcm, "audio")
            if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or not (
                    1000 <= sample_rate <= 384000):
                raise ValueError(f"sample_rate {sample_rate!r} is invalid; expected an int in 1000..384000 Hz")
            msg = wire.AudioChunk(session=sid, epoch=s.epoch, seq=next(s.seq), sample_rate=int(sample_rate), pcm=x)
            frames = wire.encode(msg)  # (also checks it can travel, in-process too)
        except (ValueError, TypeError, wire.WireError) as e:
            s.errors.append(SessionError(s.epoch, "invalid_audio", str(e)))
            return
        s.media_open = True
        await self._post(msg, frames)

    async def push_frame(self, sid: str, frame: np.ndarray, t_s: float) -> None:
        s = self._session(sid)
        await self._ready()
        try:
            x = _wire_array(frame, "image")
            msg = wire.Frame(session=sid, epoch=s.epoch, t_s=float(t_s), image=x)
            frames = wire.encode(msg)
        except (ValueError, TypeError, wire.WireError) as e:
            s.errors.append(SessionError(s.epoch, "invalid_image", str(e)))
            return
        s.media_open = True
        await self._post(msg, frames)

    async def commit(self, sid: str, text: str | None = None, transcribe: str | None = None,
                     item: str | None = None) -> None:
        s = self._session(sid)
        await self._ready()
        if item is not None and (msg := _bad_item(item)):
            s.errors.append(SessionError(s.epoch, "invalid_item", msg))  # (the turn stays open)
            return
        s.media_open = False
        await self._call_input(s, lambda req: wire.Commit(session=sid, epoch=s.epoch, text=text, req=req,
                                                          transcribe=transcribe, item=item))

    async def add_item(self, sid: str, item: str, role: str, text: str, after: str | None = None) -> None:
        s = self._session(sid)
        await self._ready()
        if msg := _bad_item(item) or (after is not None and _bad_item(after)) or (
                role not in ("user", "assistant", "system") and f"role {role!r}: user, assistant or system") or (
                not isinstance(text, str) and "the message text must be a string"):
            raise ClientError(msg, "invalid_item")  # (checked here: the wire would not carry it)
        await self._call(sid, lambda req: wire.AddItem(session=sid, epoch=s.epoch, item=item, role=role, text=text,
                                                       after=after, req=req))

    async def delete_item(self, sid: str, item: str) -> None:
        s = self._session(sid)
        await self._ready()
        if msg := _bad_item(item):
            raise ClientError(msg, "invalid_item")
        await self._call(sid, lambda req: wire.DeleteItem(session=sid, epoch=s.epoch, item=item, req=req))

    async def clear(self, sid: str) -> None:
        s = self._session(sid)
        await self._ready()
        s.media_open = False
        await self._call_input(s, lambda req: wire.Clear(session=sid, epoch=s.epoch, req=req))

    async def _call_input(self, s: _Session, make) -> None:
        try:
            await self._call(s.sid, make)
        except ClientError as e:  # the turn is lost, not the session
            code = "stage_lost" if str(e).startswith("stage_lost") else \
                e.code if e.code not in (None, "server_error") else "invalid_request"
            s.errors.append(SessionError(s.epoch, code, str(e)))

    def take_transcripts(self, sid: str) -> list[Transcript]:
        s = self._sessions.get(sid)
        if s is None:
            return []
        out, s.transcripts = s.transcripts, []
        s.transcript_ready.clear()
        return out

    async def wait_transcripts(self, sid: str) -> None:
        await self._session(sid).transcript_ready.wait()  # (ClientError once the session is gone)

    def take_errors(self, sid: str) -> list[SessionError]:
        s = self._sessions.get(sid)
        if s is None:
            return []
        errors, s.errors = s.errors, []
        return errors

    # ------------------------------------------------------------------ output
    async def respond(self, sid: str, options: ResponseOptions | None = None) -> AsyncIterator[Event]:
        s = self._session(sid)
        await self._ready()
        if self._draining:
            yield SessionError(s.epoch, "shutting_down", "the server is shutting down")
            return
        r = _Reply(s.epoch)
        s.replies.append(r)
        s.media_open = False
        o = options or ResponseOptions()
        await self._post(wire.Respond(session=sid, epoch=r.epoch, max_new_tokens=o.max_new_tokens or 0,
                                      instructions=o.instructions, tools=list(o.tools), tool_choice=o.tool_choice,
                                      audio=o.audio, item=o.item, voice=o.voice, out_of_band=o.out_of_band))
        while True:
            ev = await r.queue.get()
            if ev.epoch != s.epoch and not isinstance(ev, (ResponseDone, SessionError)):
                continue  # barge-in: drop what the cancelled reply still produced
            yield ev
            if isinstance(ev, (ResponseDone, SessionError)):
                return

    async def cancel(self, sid: str) -> int:
        s = self._session(sid)
        s.epoch += 1
        await self._broadcast(wire.Epoch(session=sid, epoch=s.epoch))
        return s.epoch

    async def truncate(self, sid: str, played_samples: int) -> int:
        s = self._session(sid)
        await self._ready()
        played = max(0, int(played_samples))
        res = await self._call(sid, lambda req: wire.Truncate(session=sid, epoch=s.epoch, played_samples=played,
                                                              req=req))
        return res.value

    def _sessions_status(self) -> list[dict]:
        return [{"id": s.sid, "epoch": s.epoch, "replies": len(s.replies)} for s in self._sessions.values()]

    # ------------------------------------------------------------------ events from the workers
    def _reply_for(self, s: _Session, epoch: int, part: str) -> _Reply | None:
        for r in s.replies:
            if r.epoch == epoch and (r.text_done if part == "text" else r.audio_done) is None:
                return r
        return None

    def _on_event(self, msg) -> None:
        if isinstance(msg, wire.Result):
            pending = self._pending.get(msg.req)
            if pending is not None and not pending[1].done():
                pending[1].set_result(msg)
            return
        s = self._sessions.get(getattr(msg, "session", None))
        if s is None:
            return
        if isinstance(msg, wire.Error):
            s.errors.append(SessionError(s.epoch, msg.code, msg.message))
        elif isinstance(msg, wire.Transcript):
            s.transcripts.append(Transcript(msg.item, msg.text, msg.final, msg.error, dict(msg.usage)))
            s.transcript_ready.set()
        elif isinstance(msg, wire.TextDelta):
            r = self._reply_for(s, msg.epoch, "text")
            if r is not None:
                r.ttft_s = r.ttft_s or time.perf_counter() - r.t0
                r.queue.put_nowait(TextDelta(msg.epoch, msg.text) if msg.call is None else
                                   ArgumentsDelta(msg.epoch, msg.call, msg.text))
        elif isinstance(msg, wire.AudioChunk):
            r = self._reply_for(s, msg.epoch, "audio")
            if r is not None:
                r.first_audio_s = r.first_audio_s or time.perf_counter() - r.t0
                r.samples += msg.pcm.shape[0]
                r.queue.put_nowait(AudioDelta(msg.epoch, msg.pcm))
        elif isinstance(msg, wire.Done):
            r = self._reply_for(s, msg.epoch, msg.part)
            if r is None:
                return
            if msg.part == "text":
                r.text_done = msg
            else:
                r.audio_done = msg
            if r.text_done is not None and (r.audio_done is not None or not r.text_done.speech):
                self._finish(s, r)
        elif isinstance(msg, wire.ReplyError):
            for r in list(s.replies):
                if r.epoch == msg.epoch:
                    self._end(s, r, SessionError(msg.epoch, msg.code, msg.message))
                    asyncio.ensure_future(self.cancel(s.sid))  # stop what the other workers still do for it
                    break

    def _finish(self, s: _Session, r: _Reply) -> None:
        t = r.text_done
        cancelled = t.cancelled or (r.audio_done is not None and r.audio_done.cancelled) or s.epoch != r.epoch
        stats = {"ttft_s": r.ttft_s, "first_audio_s": r.first_audio_s, "decode_s": time.perf_counter() - r.t0,
                 **t.stats}
        from omnistream.engine.tools import ToolCall

        calls = [ToolCall(c["name"], c["arguments"]) for c in t.tool_calls]
        self._end(s, r, ResponseDone(r.epoch, t.text, t.reply_tokens, r.samples, cancelled, stats, dict(t.usage), calls))

    def _end(self, s: _Session, r: _Reply, ev) -> None:
        if r in s.replies:
            s.replies.remove(r)
        r.queue.put_nowait(ev)

    def _fail_replies(self, s: _Session, code: str, message: str) -> bool:
        had = bool(s.replies)
        for r in list(s.replies):
            self._end(s, r, SessionError(r.epoch, code, message))
        return had


def _bad_item(item) -> str | None:
    """Why ``item`` cannot be an item id on the wire (1-256 characters), or None."""
    return None if isinstance(item, str) and 0 < len(item) <= 256 else f"item id {str(item)[:40]!r}: 1-256 characters"


def _wire_array(x, what: str) -> np.ndarray:
    """User PCM / frame -> an ndarray that can travel; float64 becomes float32 (what the encoders use)."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(x).__name__}")
    if x.dtype == np.float64:
        x = x.astype(np.float32)
    if x.dtype not in [np.dtype(d) for d in wire.DTYPES.values()]:
        raise ValueError(f"unsupported {what} dtype {x.dtype}")
    return np.ascontiguousarray(x)
