"""The worker base shared by the four pipeline workers (:mod:`omnistream.runtime.workers`).

A :class:`Worker` is a message handler with per-session :class:`~omnistream.runtime.session.Slot` s:
dispatch (session ops in order; messages of a stale reply epoch dropped once, here, for every type
that declares ``reply_work``), the prefill budget, and the batching
:class:`~omnistream.engine.scheduler.Scheduler` whose tasks yield ``Need`` s answered by one batched
call per kind and tick. It never knows whether its neighbour runs in the same process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from omnistream.engine.scheduler import Scheduler
from omnistream.engine.turns import parse_window
from omnistream.runtime import wire
from omnistream.runtime.layout import PIPELINE
from omnistream.runtime.session import Slot, options_from_wire

log = logging.getLogger(__name__)

Send = Callable[[str, wire.Message], None]  # send(dest worker name or "client", msg)


def error_code(e: BaseException) -> str:
    """The client's stable codes for pipeline exceptions."""
    from omnistream.runtime.client import _error_code

    return _error_code(e) if isinstance(e, Exception) else "server_error"


class Worker:
    """Dispatch, per-session slots, the prefill budget and the batching scheduler shared by the workers."""

    name = ""
    handles: tuple[type, ...] = ()  # message types acted on here
    forwards: tuple[type, ...] = (wire.OpenSession, wire.CloseSession)  # passed on after handling
    batchers: dict = {}  # Need kind -> batched call (see omnistream.engine.scheduler)
    prefill_tokens = 0  # per-tick budget of prefill tokens (0: unbudgeted)
    speech_s: float | None = None  # a speech worker's running total of speech produced, seconds (else None)

    def __init__(self, ck, send: Send, device: str = "cpu", *, max_batch: int = 64):
        self.ck, self.send, self.device = ck, send, device
        i = PIPELINE.index(self.name)
        self.next = PIPELINE[i + 1] if i + 1 < len(PIPELINE) else None
        self.slots: dict[str, Slot] = {}
        self.scheduler = Scheduler(self.batchers, max_batch=max_batch)
        self._budget = self.prefill_tokens

    # ------------------------------------------------------------------ entry points
    def deliver(self, msg) -> None:
        """One message for this worker (from the wire or from a co-located worker; its tensor fields
        hold the tensors)."""
        if isinstance(msg, wire.Epoch):
            if (s := self.slots.get(msg.session)) is not None:
                s.see(msg.epoch)
                self.on_epoch(s)
            return
        if isinstance(msg, wire.CloseSession):
            s = self.slots.pop(msg.session, None)
            if s is not None:
                if s.run is not None and s.run.gen is not None:
                    s.run.gen.close()  # the task's cleanup runs (its end-of-reply messages)
                self.close(s)
            return self._forward(msg)
        s = self.slots.get(msg.session)
        if isinstance(msg, wire.OpenSession) and (s is None or not s.busy):
            return self._open(msg)
        if s is None:  # e.g. work queued for a stage that was restarted meanwhile
            log.debug("%s: dropping %s for unknown session %s", self.name, type(msg).__name__, msg.session)
            if getattr(msg, "req", 0):
                self.send("client", wire.Result(session=msg.session, req=msg.req, error="unknown session"))
            return
        if hasattr(msg, "epoch"):
            s.see(msg.epoch)
            self.on_epoch(s)
        cost = self.cost(msg)
        if s.busy or (cost and self._budget <= 0):  # in order behind the task / the next tick's budget
            s.backlog.append(msg)
        else:
            self._budget -= cost
            self._dispatch(s, msg)

    def tick(self) -> bool:
        """Advance every session's task by one model call (batched); True if work remains."""
        self._budget = self.prefill_tokens
        more = self.scheduler.tick(self.tasks(), self._ended, self.priority)
        for s in list(self.slots.values()):
            while s.run is None and s.backlog and (self._budget > 0 or not self.prefill_tokens):
                msg = s.backlog.popleft()
                if isinstance(msg, wire.OpenSession):
                    self._open(msg)
                    s = self.slots.get(msg.session, s)
                    continue
                self._budget -= self.cost(msg)
                self._dispatch(s, msg)
            more = more or s.busy
        return more

    def tasks(self):
        """(key, Running) of every task the scheduler advances this tick (one batch per Need kind)."""
        return ((s, s.run) for s in list(self.slots.values()) if s.run is not None)

    def _ended(self, s: Slot, error: BaseException | None) -> None:
        s.run = None
        if error is not None:
            log.error("%s: task of session %s failed: %s", self.name, s.sid, error, exc_info=error)
            self.send("client", wire.ReplyError(session=s.sid, epoch=s.task_epoch, code=error_code(error),
                                                message=f"{self.name}: {error}"))

    # ------------------------------------------------------------------ plumbing
    def _open(self, msg: wire.OpenSession) -> None:
        """Create / update / rebuild the session. The op is forwarded *before* the state is built,
        because building may already send to the next worker (the system prompt's prompt rows)."""
        s = self.slots.get(msg.session)
        try:
            options = options_from_wire(msg.options)
            self.check(options)
        except Exception as e:  # noqa: BLE001 -- bad options / unknown voice: tell the client
            log.info("%s: cannot open session %s: %s", self.name, msg.session, e)
            if msg.req:  # not forwarded: every worker checks the same, so none changes anything
                self.send("client", wire.Result(session=msg.session, req=msg.req, error=str(e)))
            return
        rebuild = s is None or msg.fresh or self.rebuilds(s, options)
        if rebuild and s is not None and not msg.fresh and self.defer_rebuild(s):
            s.pending_open = msg  # applied when the next user turn begins (see ThinkerWorker)
            if msg.req:
                self.send("client", wire.Result(session=msg.session, req=msg.req))
            return
        if rebuild and not msg.fresh and s is not None:
            msg = wire.OpenSession(session=msg.session, epoch=msg.epoch, options=msg.options, req=msg.req, fresh=True)
        if self.next is not None:
            self.send(self.next, msg)
        elif msg.req:
            self.send("client", wire.Result(session=msg.session, req=msg.req))
        if not rebuild:
            s.options = options
            s.see(msg.epoch)
            self.update(s)
            return
        if s is not None:
            self.close(s)
            self.slots.pop(msg.session, None)
        try:
            new = self.slots[msg.session] = Slot(msg.session, options, self.build(options, msg.session),
                                                 epoch=max(msg.epoch, s.epoch if s is not None else 0))
            if s is not None:
                new.backlog = s.backlog  # ops queued behind the old state keep their order
        except Exception as e:
            log.exception("%s: building session %s failed", self.name, msg.session)
            self.send("client", wire.Error(session=msg.session, code="server_error", message=f"{self.name}: {e}"))

    def _forward(self, msg) -> None:
        if self.next is not None:
            self.send(self.next, msg)

    def _dispatch(self, s: Slot, msg) -> None:
        if msg.reply_work and s.stale(msg.epoch):
            return  # work of an interrupted reply, also when it waited in the backlog (wire._Msg.reply_work)
        try:
            if isinstance(msg, self.handles):
                self.handle(s, msg)
            if not isinstance(msg, self.handles) or isinstance(msg, self.forwards):
                self._forward(msg)
        except Exception as e:  # noqa: BLE001 -- bad input: an error event, the session goes on
            log.info("%s: %s for session %s failed: %s", self.name, type(msg).__name__, s.sid, e)
            if getattr(msg, "req", 0):
                self.send("client", wire.Result(session=s.sid, req=msg.req, error=f"{type(e).__name__}: {e}",
                                                code=error_code(e)))
            else:
                self.send("client", wire.Error(session=s.sid, code=error_code(e), message=str(e)))

    def replying(self) -> int:
        """Sessions with a reply in progress here (what the load meter divides busy time by)."""
        return sum(s.run is not None for s in self.slots.values())

    def speaking(self) -> int:
        """Of those, the replies this worker turns into speech: all of them at a speech worker (one that
        counts ``speech_s``), none elsewhere."""
        return self.replying() if self.speech_s is not None else 0


    def status(self) -> dict:
        """Batch sizes and call times of this worker's scheduler (``/status``)."""
        return {"sessions": len(self.slots), "running": sum(s.run is not None for s in self.slots.values()),
                "backlog": sum(len(s.backlog) for s in self.slots.values()), **self.scheduler.status()}

    # ------------------------------------------------------------------ per worker
    def check(self, options) -> None:
        """Raise ValueError if ``options`` cannot be served (the first worker of the chain rejects them
        before any worker rebuilds anything)."""
        _check_voice(self.ck, options.voice)
        parse_window(options.window, video=True)
        if not isinstance(options.transcribe, bool):
            raise ValueError(f"session option transcribe must be true or false, got {options.transcribe!r}")

    def rebuilds(self, s: Slot, options) -> bool:
        """Does changing ``s.options`` to ``options`` need a fresh session state? (Only the thinker
        decides: it forwards ``fresh`` to the workers after it.)"""
        return False

    def defer_rebuild(self, s: Slot) -> bool:
        return False

    def update(self, s: Slot) -> None:
        """Options changed without a rebuild (limits, temperature): apply what the state keeps."""

    def cost(self, msg) -> int:
        """Prefill tokens ``msg`` costs (counted against the per-tick budget)."""
        return 0

    def priority(self, s: Slot) -> float:
        """Lower runs first when a batch is full (e.g. the seconds of audio queued ahead of playback)."""
        return 0.0

    def build(self, options, sid: str):
        return None

    def close(self, s: Slot) -> None:
        pass

    def on_epoch(self, s: Slot) -> None:
        """The session's epoch may have grown: stop stale work at once."""

    def handle(self, s: Slot, msg) -> None:
        raise NotImplementedError


def _check_voice(ck, voice) -> None:
    if voice is not None and voice not in ck.voices:
        raise ValueError(f"unknown voice {voice!r}; this checkpoint has {sorted(ck.voices)}")


def load_figures(workers) -> tuple[int, int, float | None]:
    """What an engine loop records in its :class:`~omnistream.engine.load.LoadMeter` for ``workers`` (the
    ones it runs): sessions replying, and, from the last speech worker of the chain (Token2Wav, else the
    Talker), its speaking replies and its running total of speech seconds (None without one)."""
    workers = [w for w in workers if isinstance(w, Worker)]  # (a stage's echo worker has no replies)
    replying = max((w.replying() for w in workers), default=0)
    speech = [w for w in workers if w.speech_s is not None]
    if not speech:
        return replying, 0, None
    return replying, speech[-1].speaking(), speech[-1].speech_s
