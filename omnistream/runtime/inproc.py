"""The in-process client: the same four workers the stages run, on one thread of this process.

:class:`InProcClient` is :class:`~omnistream.runtime.wireclient.WireClient` over an in-memory
transport: the encoders, thinker, talker and token2wav workers (:mod:`omnistream.runtime.workers`)
live on one engine thread and hand their messages to each other in memory (tensors stay where they
are, nothing is encoded); events for the client go to the event loop with
``call_soon_threadsafe``. So the fast tests (and ``omnistream serve`` without ``--layout``) run the
exact code that serves across processes, with its per-stage batching scheduler: one thread is
enough on a CPU, where torch already uses every core for one forward.

The engine thread's loop mirrors a stage's (:mod:`omnistream.runtime.stage`): take what the event
loop sent, deliver what the workers sent each other, give every worker one scheduler tick, and
sleep only when nothing is left to do. It also measures how busy it is, which is what admission
control reads (:class:`~omnistream.engine.load.LoadMeter`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque

from omnistream.engine.load import LoadMeter
from omnistream.runtime import wire
from omnistream.runtime.client import ClientError
from omnistream.runtime.layout import PIPELINE
from omnistream.runtime.wireclient import WireClient
from omnistream.runtime.worker import load_figures

log = logging.getLogger("omnistream.inproc")

_STOP = object()


def engine_threads(device, threads: int | None = None) -> int | None:
    """Torch intra-op threads for the in-process engine: ``threads`` if given; on a CPU, every core
    but one, because the event loop on the other one runs VAD, the WebSocket and the pacing of every
    session (torch taking all cores makes them wait on each forward: on 2 cores, 1 engine thread holds
    3 real-time sessions where 2 threads hold 2); elsewhere None (leave torch's setting)."""
    if threads is not None:
        return threads
    import os

    return max(1, (os.cpu_count() or 1) - 1) if str(device).split(":")[0] == "cpu" else None


class InProcClient(WireClient):
    """Sessions over the pipeline's workers on an engine thread of this process (see the module doc)."""

    def __init__(self, ck, *, max_sessions: int = 8, max_batch: int = 64, op_timeout_s: float = 120.0,
                 headroom: float | None = 0.9, threads: int | None = None):
        super().__init__(max_sessions=max_sessions, op_timeout_s=op_timeout_s)
        self.threads = threads  # torch intra-op threads, set when the engine starts (None: leave torch's; engine_threads)
        from omnistream.runtime.workers import WORKER_TYPES

        self.ck = ck
        self.workers = {name: WORKER_TYPES[name](ck, self._route, max_batch=max_batch) for name in PIPELINE}
        self.headroom = headroom  # None: no admission control beyond max_sessions
        self.load = LoadMeter(headroom=headroom or 0.9)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # messages from the event loop
        self._local: deque = deque()  # (worker, msg) the workers sent each other
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)  # (process-wide: the engine thread runs every forward)
        self._thread = threading.Thread(target=self._run, name="omnistream-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in list(self._sessions.values()):
            self._fail_replies(s, "closed", "the client was closed")
            self._inbox.put(wire.CloseSession(session=s.sid))
        self._inbox.put(_STOP)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    async def _ready(self) -> None:
        if self._closed:
            raise ClientError("the client is closed")
        if self._thread is None:
            raise ClientError("the client is not started: call start() first")

    # ------------------------------------------------------------------ transport
    async def _post(self, msg, frames: list | None = None) -> None:
        self._inbox.put(msg)

    async def _broadcast(self, msg: wire.Epoch) -> None:
        self._inbox.put(msg)

    def _route(self, dest: str, msg) -> None:
        """A worker's send (on the engine thread): to another worker, or to the client's event loop."""
        if dest == "client":
            self._loop.call_soon_threadsafe(self._event, msg)
        else:
            self._local.append((self.workers[dest], msg))

    def _event(self, msg) -> None:
        try:
            self._on_event(msg)
        except Exception:  # one bad event must not stop the others
            log.exception("event %s failed", type(msg).__name__)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        busy = False
        while True:
            try:
                item = self._inbox.get(timeout=None if not busy and not self._local else 0)
            except queue.Empty:
                item = None
            t0 = time.perf_counter()
            n = 0
            while item is not None:
                if item is _STOP:
                    return
                self._deliver_external(item)
                n += 1
                try:
                    item = self._inbox.get_nowait() if n < 64 else None  # bounded, like a stage's loop
                except queue.Empty:
                    item = None
            self._drain_local()
            busy = False
            for w in self.workers.values():
                try:
                    busy = w.tick() or busy
                except Exception:  # a worker bug must not stop the engine
                    log.exception("%s: tick failed", w.name)
                self._drain_local()
            replying, speaking, speech_s = load_figures(self.workers.values())
            self.load.record(time.perf_counter() - t0, replying, did_work=bool(n) or busy, speaking=speaking,
                             speech_s=speech_s)

    def _deliver_external(self, msg) -> None:
        if isinstance(msg, wire.Epoch):  # barge-in reaches every worker at once
            targets = self.workers.values()
        else:
            targets = [self.workers[PIPELINE[0]]]
        for w in targets:
            try:
                w.deliver(msg)
            except Exception:
                log.exception("%s <- %s failed", w.name, type(msg).__name__)

    def _drain_local(self) -> None:
        while self._local:
            w, msg = self._local.popleft()
            try:
                w.deliver(msg)
            except Exception:
                log.exception("%s <- %s failed", w.name, type(msg).__name__)

    # ------------------------------------------------------------------ figures
    def admission(self) -> str | None:
        if len(self._sessions) >= self.max_sessions:
            return f"too many sessions (max {self.max_sessions})"
        return None if self.headroom is None else self.load.admission(len(self._sessions))

    def status(self) -> dict:
        alive = self._thread is not None and self._thread.is_alive()
        return {
            "serving": alive, "reason": None if alive else "the engine thread is not running",
            "mode": "in-process",
            "stages": [{"name": "all", "pid": None, "alive": alive, "last_heartbeat_s": 0.0 if alive else None}],
            "sessions": self._sessions_status(),
            "queues": {"inbox": self._inbox.qsize(), "replies_in_flight": sum(len(s.replies) for s in
                                                                                self._sessions.values())},
            "scheduler": {name: w.status() for name, w in self.workers.items()},
            "load": self.load.status(len(self._sessions)),
        }
