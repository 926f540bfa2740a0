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

Sessions with nothing in the lost stage are untouched. A ``remote`` stage (another host) is
restarted there, by its ``--respawn`` keeper, and re-attached by the supervisor, with the same
effect. Calls made while a stage restarts wait for it (up to ``ready_timeout_s``). SIGTERM:
:meth:`MultiProcClient.drain` takes no new replies, lets the running ones finish, then shuts
every stage down.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile

import zmq
import zmq.asyncio

from omnistream.runtime import layout as layouts
from omnistream.runtime import wire
from omnistream.runtime.client import ClientError, SessionError, SessionOptions  # noqa: F401 (SessionOptions: re-exported)
from omnistream.runtime.session import options_to_wire
from omnistream.runtime.stage import link_hwm
from omnistream.runtime.supervisor import Supervisor, SupervisorError
from omnistream.runtime.wireclient import WireClient

log = logging.getLogger("omnistream.client")


class MultiProcClient(WireClient):
    """Sessions over the Thinker-Talker pipeline running in stage processes (see the module doc)."""

    def __init__(self, model: str, layout: str | layouts.Layout = "all-in-one", *, max_sessions: int = 8,
                 device: str = "cpu", ping_interval_s: float = 0.5, hang_timeout_s: float = 30.0,
                 load_timeout_s: float = 180.0, ready_timeout_s: float = 120.0, op_timeout_s: float = 120.0,
                 spares: bool = False, log_level: int = logging.WARNING, headroom: float | None = 0.9):
        self.model = str(model)
        self.layout = layouts.load(layout, device)
        if "encoders" not in self.layout.workers:
            raise layouts.LayoutError(f"{self.layout.source}: a chat client needs the pipeline workers "
                                      f"{', '.join(layouts.PIPELINE)}")
        super().__init__(max_sessions=max_sessions, op_timeout_s=op_timeout_s)
        self.ready_timeout_s = ready_timeout_s
        self._sv_kw = {"ping_interval_s": ping_interval_s, "hang_timeout_s": hang_timeout_s,
                       "load_timeout_s": load_timeout_s, "max_sessions": max_sessions, "spares": spares,
                       "log_level": log_level}
        self._lost_workers: set[str] = set()
        self.supervisor: Supervisor | None = None
        self.headroom = headroom  # None: no admission control beyond max_sessions

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="omnistream-")  # ipc:// sockets; removed by close()
        self.layout = self.layout.resolved(self.run_dir)
        self.ctx = zmq.asyncio.Context()
        hwm = link_hwm(self.max_sessions)
        self.events = self.ctx.socket(zmq.PULL)
        self.events.setsockopt(zmq.RCVHWM, hwm)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.bind(self.layout.bind_of("events"))
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
        if getattr(self, "run_dir", None) is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)

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

    # ------------------------------------------------------------------ transport
    async def _post(self, msg, frames: list | None = None) -> None:
        await self.head.send_multipart(frames if frames is not None else wire.encode(msg), copy=False)

    async def _broadcast(self, msg: wire.Epoch) -> None:
        if self.supervisor is not None and self.supervisor.pub is not None:
            await self.supervisor.publish(msg)

    def admission(self) -> str | None:
        if len(self._sessions) >= self.max_sessions:
            return f"too many sessions (max {self.max_sessions})"
        if self.headroom is None or self.supervisor is None:
            return None
        return self.supervisor.admission(len(self._sessions), self.headroom)

    def status(self) -> dict:
        health = self.supervisor.health() if self.supervisor is not None else {"serving": False,
                                                                                "reason": "not started"}
        return {
            **health,
            "mode": "multi-process",
            "layout": self.layout.source,
            "stages": self.supervisor.status() if self.supervisor is not None else [],
            "sessions": self._sessions_status(),
            "queues": {"replies_in_flight": sum(len(s.replies) for s in self._sessions.values()),
                       "pending_acks": len(self._pending)},
        }

    # ------------------------------------------------------------------ events from the stages
    async def _recv_loop(self) -> None:
        while True:
            frames = await self.events.recv_multipart(copy=False)
            try:
                msg = wire.decode(frames)
            except wire.WireError as e:
                log.warning("dropped a bad event: %s", e)
                continue
            try:
                self._on_event(msg)
            except Exception:  # one bad event must not stop the loop
                log.exception("event %s failed", type(msg).__name__)

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
                why = why if conv else msg + "; the open turn was dropped"
                s.errors.append(SessionError(s.epoch, "stage_lost", why))
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
            await self._post(wire.OpenSession(session=s.sid, epoch=s.epoch, options=options_to_wire(s.options),
                                              fresh=s.reset_conv))
            if s.reset_turn:
                await self._post(wire.Clear(session=s.sid, epoch=s.epoch))
            s.reset_conv = s.reset_turn = False
