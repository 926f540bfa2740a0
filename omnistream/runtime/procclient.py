"""The multi-process client: the chat pipeline in stage processes linked by ZeroMQ.

:class:`MultiProcClient` implements :class:`omnistream.runtime.client.Client` -- the same
interface, and the same test cases, as the in-process client -- over a
:class:`~omnistream.runtime.supervisor.Supervisor` running the stages of a layout
(``all-in-one``: one process hosting encoders, thinker, talker and token2wav; ``split``: one
process each; or any YAML / CLI layout, see :mod:`omnistream.runtime.layout`).

Data path: session ops and user media go PUSH -> the stage hosting the encoders and travel the
chain in order; text deltas (thinker), PCM (token2wav), ``Done`` parts, acks and errors come
back to this process's events PULL. Barge-in (:meth:`MultiProcClient.cancel`) bumps the
session's epoch, broadcasts it over PUB at once and stamps every later op with it; every stage
drops reply work of older epochs, and this client drops any late event of an older epoch.

Stage loss: when the supervisor finds a stage dead or hung it restarts it, and this client errors
the sessions whose work was lost with ``SessionError(code="stage_lost")`` -- in their running
reply if they have one, else in :meth:`take_errors` -- and bumps their epoch so the surviving
stages drop what they still hold for them. What was lost depends on what the stage hosted:

* ``thinker`` (every session's KV cache) or ``talker`` (the spoken sessions' Talker caches): those
  conversations restart *fresh* -- the system prompt only, earlier turns forgotten -- and the
  session goes on with its next turn;
* ``encoders``: only the open user turns (cleared in the thinker); the conversations stay;
* ``token2wav``: only the replies being spoken; the conversations stay.

Sessions with nothing in the lost stage are untouched. Calls made while a stage restarts wait for
it (up to ``ready_timeout_s``). SIGTERM: :meth:`MultiProcClient.drain` takes no new replies, lets
the running ones finish, then shuts every stage down.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import numpy as np
import zmq
import zmq.asyncio

from omnistream.runtime import layout as layouts
from omnistream.runtime import wire
from omnistream.runtime.client import (
    AudioDelta,
    Client,
    ClientError,
    Event,
    ResponseDone,
    SessionError,
    SessionOptions,
    TextDelta,
)
from omnistream.runtime.session import options_to_wire
from omnistream.runtime.stage import link_hwm
from omnistream.runtime.supervisor import Supervisor, SupervisorError

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
        self.finished = False


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


class MultiProcClient(Client):
    """Sessions over the Thinker-Talker pipeline running in stage processes (see the module doc)."""

    def __init__(self, model: str, layout: str | layouts.Layout = "all-in-one", *, max_sessions: int = 8,
                 device: str = "cpu", ping_interval_s: float = 0.5, hang_timeout_s: float = 30.0,
                 load_timeout_s: float = 180.0, ready_timeout_s: float = 120.0, op_timeout_s: float = 120.0,
                 spares: bool = False, log_level: int = logging.WARNING):
        self.model = str(model)
        self.layout = layouts.load(layout, device)
        if "encoders" not in self.layout.workers:
            raise layouts.LayoutError(f"{self.layout.source}: a chat client needs the pipeline workers "
                                      f"{', '.join(layouts.PIPELINE)}")
        self.max_sessions = max_sessions
        self.ready_timeout_s, self.op_timeout_s = ready_timeout_s, op_timeout_s
        self._sv_kw = {"ping_interval_s": ping_interval_s, "hang_timeout_s": hang_timeout_s,
                       "load_timeout_s": load_timeout_s, "max_sessions": max_sessions, "spares": spares,
                       "log_level": log_level}
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count(1)
        self._reqs = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future]] = {}
        self._lost_workers: set[str] = set()
        self.supervisor: Supervisor | None = None
        self._closed = False
        self._draining = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.layout = self.layout.resolved()
        self.ctx = zmq.asyncio.Context()
        hwm = link_hwm(self.max_sessions)
        self.events = self.ctx.socket(zmq.PULL)
        self.events.setsockopt(zmq.RCVHWM, hwm)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.bind(self.layout.events)
        self.head = self.ctx.socket(zmq.PUSH)
        self.head.setsockopt(zmq.SNDHWM, hwm)
        self.head.setsockopt(zmq.LINGER, 0)
        self.head.connect(self.layout.stage_of("encoders").address)
        self.supervisor = Supervisor(self.layout, self.model, ctx=self.ctx, on_lost=self._on_lost,
                                     on_ready=self._on_ready, **self._sv_kw)
        self._rx = asyncio.create_task(self._recv_loop())
        try:
            await self.supervisor.start(self.ready_timeout_s)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sid in list(self._sessions):
            self._fail_replies(self._sessions[sid], "closed", "the client was closed")
        if getattr(self, "_rx", None) is not None:
            self._rx.cancel()
        if self.supervisor is not None:
            await self.supervisor.shutdown()
        for s in (getattr(self, "events", None), getattr(self, "head", None)):
            if s is not None:
                s.close(0)
        if getattr(self, "ctx", None) is not None:
            self.ctx.term()

    async def drain(self, timeout_s: float = 30.0) -> None:
        """SIGTERM path: take no new replies, let running ones finish (bounded), then close."""
        self._draining = True
        end = time.monotonic() + timeout_s
        while any(s.replies for s in self._sessions.values()) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        await self.close()

    async def _ready(self) -> None:
        if self._closed:
            raise ClientError("the client is closed")
        if self.supervisor is None:
            raise ClientError("the client is not started: call start() first")
        if not self.supervisor.ready:
            try:
                await self.supervisor.wait_ready(self.ready_timeout_s)
            except SupervisorError as e:
                raise ClientError(f"stage_lost: {e}") from e

    def _session(self, sid: str) -> _Session:
        try:
            return self._sessions[sid]
        except KeyError:
            raise ClientError(f"unknown session {sid!r}") from None

    # ------------------------------------------------------------------ sending
    async def _send(self, msg, *tensors) -> None:
        await self.head.send_multipart(wire.encode(msg, *tensors), copy=False)

    async def _call(self, sid: str, make) -> wire.Result:
        """Send ``make(req)`` and wait for its Result (raised as ClientError when it carries an error)."""
        req = next(self._reqs)
        fut = asyncio.get_running_loop().create_future()
        self._pending[req] = (sid, fut)
        try:
            await self._send(make(req))
            res = await asyncio.wait_for(fut, self.op_timeout_s)
        except TimeoutError:
            raise ClientError(f"session {sid}: no answer from the stages in {self.op_timeout_s:.0f}s") from None
        finally:
            self._pending.pop(req, None)
        if res.error is not None:
            raise ClientError(res.error)
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
            await self._send(wire.CloseSession(session=sid))
            raise
        return sid

    async def close_session(self, sid: str) -> None:
        s = self._sessions.pop(sid, None)
        if s is not None:
            self._fail_replies(s, "closed", "the session was closed")
            if not self._closed:
                await self._send(wire.CloseSession(session=sid))

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
            msg = wire.AudioChunk(session=sid, epoch=s.epoch, seq=next(s.seq), sample_rate=int(sample_rate),
                                  pcm=wire.TensorRef.of(x))
            frames = wire.encode(msg, x)
        except (ValueError, TypeError, wire.WireError) as e:
            s.errors.append(SessionError(s.epoch, "invalid_audio", str(e)))
            return
        s.media_open = True
        await self.head.send_multipart(frames, copy=False)

    async def push_frame(self, sid: str, frame: np.ndarray, t_s: float) -> None:
        s = self._session(sid)
        await self._ready()
        try:
            x = _wire_array(frame, "image")
            t = float(t_s)
            msg = wire.Frame(session=sid, epoch=s.epoch, t_s=t, image=wire.TensorRef.of(x))
            frames = wire.encode(msg, x)
        except (ValueError, TypeError, wire.WireError) as e:
            s.errors.append(SessionError(s.epoch, "invalid_image", str(e)))
            return
        s.media_open = True
        await self.head.send_multipart(frames, copy=False)

    async def commit(self, sid: str, text: str | None = None) -> None:
        s = self._session(sid)
        await self._ready()
        s.media_open = False
        await self._call_input(s, lambda req: wire.Commit(session=sid, epoch=s.epoch, text=text, req=req))

    async def clear(self, sid: str) -> None:
        s = self._session(sid)
        await self._ready()
        s.media_open = False
        await self._call_input(s, lambda req: wire.Clear(session=sid, epoch=s.epoch, req=req))

    async def _call_input(self, s: _Session, make) -> None:
        try:
            await self._call(s.sid, make)
        except ClientError as e:  # the turn is lost, not the session
            code = "stage_lost" if str(e).startswith("stage_lost") else "invalid_request"
            s.errors.append(SessionError(s.epoch, code, str(e)))

    def take_errors(self, sid: str) -> list[SessionError]:
        s = self._sessions.get(sid)
        if s is None:
            return []
        errors, s.errors = s.errors, []
        return errors

    # ------------------------------------------------------------------ output
    async def respond(self, sid: str) -> AsyncIterator[Event]:
        s = self._session(sid)
        await self._ready()
        if self._draining:
            yield SessionError(s.epoch, "shutting_down", "the server is shutting down")
            return
        r = _Reply(s.epoch)
        s.replies.append(r)
        s.media_open = False
        await self._send(wire.Respond(session=sid, epoch=r.epoch))
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
        if self.supervisor is not None and self.supervisor.pub is not None:
            await self.supervisor.publish(wire.Epoch(session=sid, epoch=s.epoch))
        return s.epoch

    async def truncate(self, sid: str, played_samples: int) -> int:
        s = self._session(sid)
        await self._ready()
        played = max(0, int(played_samples))
        res = await self._call(sid, lambda req: wire.Truncate(session=sid, epoch=s.epoch, played_samples=played,
                                                              req=req))
        return res.value

    def status(self) -> dict:
        return {
            "mode": "multi-process",
            "layout": self.layout.source,
            "stages": self.supervisor.status() if self.supervisor is not None else [],
            "sessions": [{"id": s.sid, "epoch": s.epoch, "replies": len(s.replies)} for s in self._sessions.values()],
            "queues": {"replies_in_flight": sum(len(s.replies) for s in self._sessions.values()),
                       "pending_acks": len(self._pending)},
        }

    # ------------------------------------------------------------------ events from the stages
    async def _recv_loop(self) -> None:
        while True:
            frames = await self.events.recv_multipart(copy=False)
            try:
                msg, arrays = wire.decode(frames)
            except wire.WireError as e:
                log.warning("dropped a bad event: %s", e)
                continue
            try:
                self._on_event(msg, arrays)
            except Exception:  # one bad event must not stop the loop
                log.exception("event %s failed", type(msg).__name__)

    def _reply_for(self, s: _Session, epoch: int, part: str) -> _Reply | None:
        for r in s.replies:
            if r.epoch == epoch and (r.text_done if part == "text" else r.audio_done) is None:
                return r
        return None

    def _on_event(self, msg, arrays) -> None:
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
        elif isinstance(msg, wire.TextDelta):
            r = self._reply_for(s, msg.epoch, "text")
            if r is not None:
                r.ttft_s = r.ttft_s or time.perf_counter() - r.t0
                r.queue.put_nowait(TextDelta(msg.epoch, msg.text))
        elif isinstance(msg, wire.AudioChunk):
            r = self._reply_for(s, msg.epoch, "audio")
            if r is not None:
                r.first_audio_s = r.first_audio_s or time.perf_counter() - r.t0
                r.samples += arrays[0].shape[0]
                r.queue.put_nowait(AudioDelta(msg.epoch, arrays[0]))
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
                    asyncio.ensure_future(self.cancel(s.sid))  # stop what the other stages still do for it
                    break

    def _finish(self, s: _Session, r: _Reply) -> None:
        t = r.text_done
        cancelled = t.cancelled or (r.audio_done is not None and r.audio_done.cancelled) or s.epoch != r.epoch
        stats = {"ttft_s": r.ttft_s, "first_audio_s": r.first_audio_s, "decode_s": time.perf_counter() - r.t0,
                 **t.stats}
        self._end(s, r, ResponseDone(r.epoch, t.text, t.reply_tokens, r.samples, cancelled, stats))

    def _end(self, s: _Session, r: _Reply, ev) -> None:
        if r in s.replies:
            s.replies.remove(r)
        r.queue.put_nowait(ev)

    def _fail_replies(self, s: _Session, code: str, message: str) -> bool:
        had = bool(s.replies)
        for r in list(s.replies):
            self._end(s, r, SessionError(r.epoch, code, message))
        return had

    # ------------------------------------------------------------------ stage loss
    async def _on_lost(self, stage: str, reason: str) -> None:
        """A stage died or hung (it is being restarted): error the sessions whose work it held."""
        workers = set(self.layout.stages[[st.name for st in self.layout.stages].index(stage)].workers)
        self._lost_workers |= workers
        msg = f"stage {stage} {reason}; it is being restarted"
        for req, (sid, fut) in list(self._pending.items()):
            if not fut.done():
                fut.set_result(wire.Result(session=sid, req=req, error=f"stage_lost: {msg}"))
        for s in self._sessions.values():
            voice = s.options.voice is not None
            reply_path = {"thinker"} | ({"talker", "token2wav"} if voice else set())
            conv = "thinker" in workers or ("talker" in workers and voice)  # its KV caches are gone
            lost_turn = "encoders" in workers and s.media_open
            why = msg + ("; the conversation restarts" if conv else "")
            had_reply = bool(workers & reply_path) and self._fail_replies(s, "stage_lost", why)
            if not (had_reply or conv or lost_turn):
                continue  # untouched
            s.epoch += 1  # whatever the other stages still do for it is stale now
            await self.supervisor.publish(wire.Epoch(session=s.sid, epoch=s.epoch))
            if not had_reply:
                s.errors.append(SessionError(s.epoch, "stage_lost", why if conv else msg + "; the open turn was dropped"))
            s.reset_conv = s.reset_conv or conv
            s.reset_turn = s.reset_turn or (lost_turn and not conv)
            s.media_open = False

    async def _on_ready(self, stage: str, restarted: bool) -> None:
        """Every stage serves again: give the restarted ones the sessions (a fresh conversation
        where a thinker or talker was lost; the open turn cleared where the encoders were)."""
        if not restarted or not self._lost_workers:
            return
        self._lost_workers = set()
        for s in self._sessions.values():
            await self._send(wire.OpenSession(session=s.sid, epoch=s.epoch, options=options_to_wire(s.options),
                                              fresh=s.reset_conv))
            if s.reset_turn:
                await self._send(wire.Clear(session=s.sid, epoch=s.epoch))
            s.reset_conv = s.reset_turn = False


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
