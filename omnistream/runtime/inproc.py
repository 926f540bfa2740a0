"""The in-process client: the same four workers the stages run, on engine threads of this process.

:class:`InProcClient` is :class:`~omnistream.runtime.wireclient.WireClient` over an in-memory
transport: the encoders, thinker, talker and token2wav workers (:mod:`omnistream.runtime.workers`)
live on an engine thread and hand their messages to each other in memory (tensors stay where they
are, nothing is encoded); events for the client go to the event loop with
``call_soon_threadsafe``. So the fast tests (and ``omnistream serve`` without ``--layout``) run the
exact code that serves across processes, with its per-stage batching scheduler.

``speech_thread=True`` (``serve`` on a CPU with 2+ cores) puts Token2Wav on a second engine thread,
as the ``split`` layout puts it in its own process: its DiT windows (most of a spoken reply's work)
then run beside the Thinker's and Talker's steps instead of stalling them, and torch's ops release
the GIL, so the two threads use two cores. Measured with 3-s replies on 2 cores: 1 -> 2 sessions at
real time, exact (benchmarks/capacity.py). Messages between the threads go through the receiving
thread's inbox, in order, as between stage processes; a barge-in's epoch goes to every thread.

Each engine thread's loop mirrors a stage's (:mod:`omnistream.runtime.stage`): take what was sent
to it, deliver what its workers sent each other, give every worker one scheduler tick, and sleep
only when nothing is left to do. It also measures how busy it is, which is what admission control
reads (:class:`~omnistream.engine.load.LoadMeter`; the busiest thread decides).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from functools import partial

from omnistream.engine.load import LoadMeter
from omnistream.runtime import wire
from omnistream.runtime.client import ClientError
from omnistream.runtime.layout import PIPELINE
from omnistream.runtime.wireclient import WireClient
from omnistream.runtime.worker import load_figures

log = logging.getLogger("omnistream.inproc")

_STOP = object()


def engine_options(device, threads: int | None = None) -> dict:
    """``InProcClient``'s thread options for serving on ``device``. On a CPU with 2+ cores: Token2Wav on
    its own engine thread (``speech_thread``), and torch intra-op threads ``threads`` if given, else the
    cores but one (the event loop's: VAD, the WebSockets and the pacing of every session) shared by the
    two engine threads (torch taking all cores makes the event loop wait on each forward, and two
    threads per op where the cores are busy made Token2Wav 1.3-1.5x slower on 2 cores). Elsewhere one
    engine thread and torch's own setting."""
    import os

    cores = os.cpu_count() or 1
    if str(device).split(":")[0] != "cpu":
        return {"threads": threads, "speech_thread": False}
    speech = cores >= 2
    return {"threads": threads or max(1, (cores - 1) // (2 if speech else 1)), "speech_thread": speech}


class _Engine:
    """One engine thread: its workers (chain order), its inbox ((worker or None, message) items from
    the event loop and the other engine thread), what its workers sent each other, its load meter."""

    def __init__(self, name: str, workers: dict, headroom: float):
        self.name, self.workers = name, workers
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.local: deque = deque()  # (worker, msg) its workers sent each other
        self.load = LoadMeter(headroom=headroom)
        self.thread: threading.Thread | None = None


class InProcClient(WireClient):
    """Sessions over the pipeline's workers on engine threads of this process (see the module doc)."""

    def __init__(self, ck, *, max_sessions: int = 8, max_batch: int = 64, op_timeout_s: float = 120.0,
                 headroom: float | None = 0.9, threads: int | None = None, speech_thread: bool = False):
        super().__init__(max_sessions=max_sessions, op_timeout_s=op_timeout_s)
        self.threads = threads  # torch intra-op threads, set when the engine starts (None: leave torch's; see engine_options)
        from omnistream.runtime.workers import WORKER_TYPES

        self.ck = ck
        self.workers = {name: WORKER_TYPES[name](ck, partial(self._route, name), max_batch=max_batch)
                        for name in PIPELINE}
        self.headroom = headroom  # None: no admission control beyond max_sessions
        groups = [PIPELINE[:-1], PIPELINE[-1:]] if speech_thread else [PIPELINE]
        names = ["engine", "speech"] if speech_thread else ["all"]
        self.engines = [_Engine(n, {w: self.workers[w] for w in g}, headroom or 0.9) for n, g in zip(names, groups)]
        self._engine_of = {w: e for e in self.engines for w in e.workers}
        self._loop: asyncio.AbstractEventLoop | None = None
        # With Token2Wav on its own thread, its vocoder's switch to batch-invariant convolutions (process-wide,
        # model/token2wav_jobs.py) would flip the encoders' convolutions on the other thread at random moments,
        # and their bits with it: the client holds the switch for its whole life instead.
        self._convs = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)  # (process-wide: the engine threads run every forward)
        if len(self.engines) > 1:  # see _convs
            from omnistream.model.token2wav_jobs import batch_invariant_convs

            self._convs = batch_invariant_convs()
            self._convs.__enter__()
        for e in self.engines:
            e.thread = threading.Thread(target=self._run, args=(e,), name=f"omnistream-{e.name}", daemon=True)
            e.thread.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in list(self._sessions.values()):
            self._fail_replies(s, "closed", "the client was closed")
            self.engines[0].inbox.put((None, wire.CloseSession(session=s.sid)))
        self.engines[0].inbox.put(_STOP)  # the first thread passes the stop on once the closes went through
        for e in self.engines:
            if e.thread is not None:
                await asyncio.to_thread(e.thread.join, 10)
        if self._convs is not None:
            self._convs.__exit__(None, None, None)
            self._convs = None

    async def _ready(self) -> None:
        if self._closed:
            raise ClientError("the client is closed")
        if self.engines[0].thread is None:
            raise ClientError("the client is not started: call start() first")

    # ------------------------------------------------------------------ transport
    async def _post(self, msg, frames: list | None = None) -> None:
        self.engines[0].inbox.put((None, msg))

    async def _broadcast(self, msg: wire.Epoch) -> None:
        for e in self.engines:
            e.inbox.put((None, msg))

    def _route(self, src: str, dest: str, msg) -> None:
        """Worker ``src``'s send (on its engine thread): to another worker, or to the client's event loop."""
        if dest == "client":
            self._loop.call_soon_threadsafe(self._event, msg)
            return
        e = self._engine_of[dest]
        if e is self._engine_of[src]:
            e.local.append((self.workers[dest], msg))
        else:
            e.inbox.put((self.workers[dest], msg))

    def _event(self, msg) -> None:
        try:
            self._on_event(msg)
        except Exception:  # one bad event must not stop the others
            log.exception("event %s failed", type(msg).__name__)

    # ------------------------------------------------------------------ the engine threads
    def _run(self, e: _Engine) -> None:
        busy = False
        while True:
            try:
                item = e.inbox.get(timeout=None if not busy and not e.local else 0)
            except queue.Empty:
                item = None
            t0 = time.perf_counter()
            n = 0
            while item is not None:
                if item is _STOP:
                    later = self.engines.index(e) + 1
                    if later < len(self.engines):  # after everything this thread sent them
                        self.engines[later].inbox.put(_STOP)
                    return
                self._deliver(e, *item)
                n += 1
                try:
                    item = e.inbox.get_nowait() if n < 64 else None  # bounded, like a stage's loop
                except queue.Empty:
                    item = None
            self._drain_local(e)
            busy = False
            for w in e.workers.values():
                try:
                    busy = w.tick() or busy
                except Exception:  # a worker bug must not stop the engine
                    log.exception("%s: tick failed", w.name)
                self._drain_local(e)
            replying, speaking, speech_s = load_figures(e.workers.values())
            e.load.record(time.perf_counter() - t0, replying, did_work=bool(n) or busy, speaking=speaking,
                          speech_s=speech_s)

    def _deliver(self, e: _Engine, worker, msg) -> None:
        """An inbox item: for ``worker`` (sent by the other thread), or from the event loop (None): an
        epoch for every worker of this thread (a barge-in reaches all at once), the rest for the first."""
        if worker is not None:
            targets = [worker]
        elif isinstance(msg, wire.Epoch):
            targets = e.workers.values()
        else:
            targets = [self.workers[PIPELINE[0]]]
        for w in targets:
            try:
                w.deliver(msg)
            except Exception:
                log.exception("%s <- %s failed", w.name, type(msg).__name__)

    @staticmethod
    def _drain_local(e: _Engine) -> None:
        while e.local:
            w, msg = e.local.popleft()
            try:
                w.deliver(msg)
            except Exception:
                log.exception("%s <- %s failed", w.name, type(msg).__name__)

    # ------------------------------------------------------------------ figures
    def _busiest(self) -> _Engine:
        """The thread whose measured cost per session is highest (it decides admission)."""
        return max(self.engines, key=lambda e: e.load.cost() or 0.0)

    def admission(self) -> str | None:
        if len(self._sessions) >= self.max_sessions:
            return f"too many sessions (max {self.max_sessions})"
        return None if self.headroom is None else self._busiest().load.admission(len(self._sessions))

    def status(self) -> dict:
        alive = all(e.thread is not None and e.thread.is_alive() for e in self.engines)
        n = len(self._sessions)
        stages = [{"name": e.name, "pid": None, "alive": e.thread is not None and e.thread.is_alive(),
                   "last_heartbeat_s": 0.0 if alive else None} for e in self.engines]
        if len(self.engines) > 1:  # per thread (the one-thread engine reports them at the top level)
            for st, e in zip(stages, self.engines):
                st["load"] = e.load.status(n)
                st["workers"] = {name: w.status() for name, w in e.workers.items()}
        return {
            "serving": alive, "reason": None if alive else "an engine thread is not running",
            "mode": "in-process",
            "stages": stages,
            "sessions": self._sessions_status(),
            "queues": {"inbox": sum(e.inbox.qsize() for e in self.engines),
                       "replies_in_flight": sum(len(s.replies) for s in self._sessions.values())},
            "scheduler": {name: w.status() for name, w in self.workers.items()},
            "load": self._busiest().load.status(n),
        }
