"""Spawn the stage processes of a layout, watch them for death AND hangs, restart them.

The supervisor lives in the client's asyncio event loop (the server's process). It binds the
control ``ROUTER`` (Hello/Ready handshake, Ping/Pong) and the epochs ``PUB`` (barge-in epochs,
Shutdown), spawns one process per :class:`~omnistream.runtime.layout.StageSpec` with
multiprocessing's ``spawn`` start method (a fresh interpreter: no forked CUDA or ZMQ state), and
every ``ping_interval_s``:

* a stage whose process exited (crash, kill -9, OOM) is **dead**;
* a serving stage that has not answered a Ping for ``hang_timeout_s`` is **hung** (its main
  loop answers pings between two pieces of work, so a stuck forward, a deadlock or a stopped
  process all look like this) and is killed with SIGKILL;
* a stage that has not become Ready within ``load_timeout_s`` is killed as well.

``hang_timeout_s`` (the CLI's ``--hang-s``) is how long a silent stage is given before it is
killed: long enough for the slowest forward of the deployment, else a busy stage is restarted
for nothing. Well before that, a stage silent for ``stall_s`` (default: 4 ping intervals, at
least 5 s, as one batched Token2Wav call of a busy CPU stage can take seconds; at most
``hang_timeout_s``) makes :meth:`Supervisor.health` report the pipeline as not
serving -- ``{"serving": false, "reason": ...}`` -- so a load balancer's ``/health`` check stops
sending new users to a server whose replies are stalled, without anything being killed.

A lost stage is restarted (a new *incarnation*, so late messages of the old one are ignored):
with ``spares=True`` by promoting a warm standby process that has already loaded its model part
(a restart then costs a handshake, not an interpreter start and a checkpoint load; memory is
doubled), else by spawning a fresh process;
and ``on_lost(stage, reason)`` tells the owner, which errors the sessions whose work was lost;
``on_ready(stage, restarted)`` fires when a (re)started stage serves. A stage that fails its
handshake (protocol mismatch) is not restarted in a loop: it is marked failed.

Remote stages (``remote: true``, on other hosts) are not spawned, so not restarted, from here:
whoever starts them restarts them (``python -m omnistream.runtime.stage --respawn`` keeps one
process of the stage running). The supervisor attaches whichever process of the stage says Hello
and reports a loss (``on_lost``) when the serving one is gone: its control connection closed (the
host's kernel closes a killed process's socket; ZMTP heartbeats time a dead host or link out) and
it answered no ping for ``stall_s``; or it was silent for ``hang_timeout_s``; or a new process of
the stage said Hello first (a fast respawn). The new process's Ready then makes ``on_ready(stage,
restarted=True)`` fire as for a local restart; a stage given up for lost that answers pings again
(a link that came back) is re-attached the same way.

Orphans: stages are daemonic multiprocessing children (terminated at interpreter exit) and
ask the kernel to SIGKILL them when the supervisor dies (``PR_SET_PDEATHSIG``), so even a
kill -9 of the server leaves no stage behind. :meth:`Supervisor.shutdown` asks every stage to
drain (Shutdown), waits, then terminates and kills what is left.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from omnistream.runtime import wire
from omnistream.runtime.layout import Layout, StageSpec
from omnistream.runtime.stage import stage_main

log = logging.getLogger("omnistream.supervisor")
HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 1000, 5000  # ZMTP heartbeats on links to remote stages


class SupervisorError(RuntimeError):
    """The stages could not be started (timeout, handshake failure)."""


@dataclass
class StageProc:
    """One stage as the supervisor tracks it."""

    spec: StageSpec
    proc: mp.process.BaseProcess | None = None
    incarnation: int = 0
    state: str = "stopped"  # starting | handshake | ready | dead | failed | stopped
    started_at: float = 0.0
    last_pong: float = 0.0
    stats: dict = field(default_factory=dict)  # the stage's load and batch figures, from its last pong
    restarts: int = 0
    hangs: int = 0  # hung-stage detections (no pong within the hang timeout): /metrics
    error: str | None = None
    crash_loop: int = 0  # consecutive deaths before serving
    history: list = field(default_factory=list)  # (time, reason) of each loss

    remote_pid: int | None = None  # a remote stage's pid (from its Hello), on its own host
    suspect_since: float | None = None  # a control connection closed at this time; this remote stage may be gone
    spare: mp.process.BaseProcess | None = None  # a warm standby process (spares=True)
    spare_inc: int = 0
    spare_ident: bytes | None = None  # set when the spare said Hello: loaded, waiting to be promoted

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else self.remote_pid

    @property
    def identity(self) -> bytes:
        return f"{self.spec.name}#{self.incarnation}".encode()


class Supervisor:
    MAX_START_FAILURES = 3

    def __init__(self, layout: Layout, model: str | None, *, ctx: zmq.asyncio.Context | None = None,
                 ping_interval_s: float = 0.5, hang_timeout_s: float = 30.0, load_timeout_s: float = 180.0,
                 max_sessions: int = 8, on_lost: Callable | None = None, on_ready: Callable | None = None,
                 spares: bool = False, log_level: int = logging.WARNING, stall_s: float | None = None):
        self._own_run_dir = layout.run_dir is None  # a private temp directory for ipc:// paths: removed at shutdown
        if layout.run_dir is None:
            layout = layout.resolved()
        self.layout, self.model = layout, model
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.ping_interval_s, self.hang_timeout_s, self.load_timeout_s = ping_interval_s, hang_timeout_s, load_timeout_s
        for k, v in (("ping_interval_s", ping_interval_s), ("hang_timeout_s", hang_timeout_s),
                     ("load_timeout_s", load_timeout_s)):
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                raise ValueError(f"{k} must be a positive number of seconds, got {v!r}")
        self.stall_s = min(hang_timeout_s, max(4 * ping_interval_s, 5.0)) if stall_s is None else stall_s
        self.max_sessions, self.log_level = max_sessions, log_level
        self.on_lost, self.on_ready = on_lost, on_ready
        self.spares = spares  # keep one loaded standby process per spawned stage (memory x2, restarts ~instant)
        self._incs = itertools.count(1)  # incarnation numbers, unique across stages and spares
        self.stages = {s.name: StageProc(s) for s in layout.stages}
        self.rejected: list[str] = []  # handshakes refused (protocol mismatch, unknown stage)
        self._mp = mp.get_context("spawn")
        self._seq = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self._ready = asyncio.Event()
        self._closing = False
        self.ctrl = self.pub = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self, timeout_s: float | None = None) -> None:
        """Bind the control and epochs sockets, spawn every stage, wait until all serve."""
        self.ctrl = self.ctx.socket(zmq.ROUTER)
        self.ctrl.setsockopt(zmq.LINGER, 0)
        if any(sp.spec.remote for sp in self.stages.values()):  # ZMTP heartbeats: a dead host drops its link
            self.ctrl.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            self.ctrl.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            self._tasks.append(asyncio.create_task(self._disconnects(self.ctrl.get_monitor_socket(zmq.EVENT_DISCONNECTED))))
        self.ctrl.bind(self.layout.bind_of("control"))
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 10_000)  # epochs are tiny and rare; still bounded
        self.pub.bind(self.layout.bind_of("epochs"))
        for sp in self.stages.values():
            if sp.spec.remote:  # started on its own host; it connects to us
                sp.state, sp.started_at = "waiting", time.monotonic()
            else:
                self._spawn(sp)
        self._tasks += [asyncio.create_task(self._control_loop()), asyncio.create_task(self._watch_loop())]
        await self.wait_ready(timeout_s or self.load_timeout_s)

    async def wait_ready(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError:
            bad = {n: sp.state for n, sp in self.stages.items() if sp.state != "ready"}
            raise SupervisorError(f"stages not ready after {timeout_s:.0f}s: {bad}") from None
        failed = [f"{n}: {sp.error}" for n, sp in self.stages.items() if sp.state == "failed"]
        if failed:
            raise SupervisorError("; ".join(failed))

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def _process(self, spec: StageSpec, inc: int) -> mp.process.BaseProcess:
        # Started from the event-loop thread, which lives as long as the supervisor: PR_SET_PDEATHSIG
        # fires when the spawning *thread* exits.
        p = self._mp.Process(target=stage_main, name=f"omnistream-{spec.name}", daemon=True,
                             args=(spec, self.layout, self.model, inc, os.getpid(), self.max_sessions, self.log_level))
        p.start()
        return p

    def _spawn(self, sp: StageProc) -> None:
        sp.incarnation = next(self._incs)
        sp.proc = self._process(sp.spec, sp.incarnation)
        sp.state, sp.started_at, sp.last_pong = "starting", time.monotonic(), 0.0
        self._ready.clear()
        log.info("spawned stage %s (pid %d, incarnation %d)", sp.spec.name, sp.proc.pid, sp.incarnation)

    def _spawn_spares(self) -> None:
        """One warm standby per local stage (spares=True), started once everything serves."""
        if not self.spares or self._closing:
            return
        for sp in self.stages.values():
            if not sp.spec.remote and sp.spare is None and sp.state != "failed":
                sp.spare_inc, sp.spare_ident = next(self._incs), None
                sp.spare = self._process(sp.spec, sp.spare_inc)
                log.info("spawned a spare for stage %s (pid %d)", sp.spec.name, sp.spare.pid)

    async def _promote(self, sp: StageProc) -> bool:
        """Replace a lost stage by its loaded spare: Ready makes it bind the address and serve."""
        spare, ident = sp.spare, sp.spare_ident
        if spare is None or ident is None or not spare.is_alive():
            return False
        sp.proc, sp.incarnation, sp.spare, sp.spare_ident = spare, sp.spare_inc, None, None
        sp.state, sp.started_at, sp.last_pong = "handshake", time.monotonic(), 0.0
        await self.ctrl.send_multipart([ident, *wire.encode(wire.Ready(stage="supervisor", pid=os.getpid()))])
        log.info("promoted the spare of stage %s (pid %d)", sp.spec.name, spare.pid)
        return True

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Drain and stop every stage: Shutdown, wait up to ``timeout_s``, then SIGTERM/SIGKILL."""
        self._closing = True
        for t in self._tasks:
            t.cancel()
        if self._tasks:  # their sockets (the disconnect monitor) close before the context ends
            await asyncio.wait(self._tasks, timeout=5)
        if self.pub is not None:
            await self.pub.send_multipart(wire.encode(wire.Shutdown()))
            for sp in self.stages.values():
                if sp.state in ("ready", "handshake"):
                    await self.ctrl.send_multipart([sp.identity, *wire.encode(wire.Shutdown())])
        for sp in self.stages.values():  # spares serve nothing: nothing to drain
            if sp.spare is not None and sp.spare.is_alive():
                os.kill(sp.spare.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        procs = [p for sp in self.stages.values() for p in (sp.proc, sp.spare) if p is not None]
        for sp in self.stages.values():
            sp.state = "stopped"
        for p in procs:
            while p.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
                if not p.is_alive():
                    break
                os.kill(p.pid, sig)
                end = time.monotonic() + wait
                while p.is_alive() and time.monotonic() < end:
                    await asyncio.sleep(0.05)
            p.join(0.1)
        for s in (self.ctrl, self.pub):
            if s is not None:
                s.close(0)
        if self._own_run_dir:
            shutil.rmtree(self.layout.run_dir, ignore_errors=True)

    # ------------------------------------------------------------------ sockets
    async def publish(self, msg) -> None:
        """Broadcast ``msg`` (an Epoch) to every stage."""
        await self.pub.send_multipart(wire.encode(msg))

    async def _control_loop(self) -> None:
        while True:
            ident, *frames = await self.ctrl.recv_multipart()
            name, _, inc = ident.decode(errors="replace").partition("#")
            sp = self.stages.get(name)
            try:
                msg = wire.decode(frames)
            except wire.WireError as e:
                self._reject(sp, name, f"bad message: {e}")
                continue
            if sp is not None and sp.spare is not None and inc == str(sp.spare_inc):
                if isinstance(msg, wire.Hello):
                    sp.spare_ident = ident  # loaded; it waits for a Ready until it is needed
                continue
            if sp is not None and sp.spec.remote and isinstance(msg, wire.Hello):
                if inc != str(sp.incarnation) and sp.state in ("ready", "handshake"):  # respawned before we noticed
                    await self._remote_lost(sp, f"was replaced on its host by a new process (pid {msg.pid})")
                sp.incarnation, sp.remote_pid = inc, msg.pid  # a remote stage names its own incarnation
            if sp is None or inc != str(sp.incarnation):
                if isinstance(msg, wire.Hello):
                    self._reject(None, name, "unknown stage or stale incarnation")
                continue  # a late message of an older incarnation
            if isinstance(msg, wire.Hello):
                sp.state = "handshake"
                await self.ctrl.send_multipart([ident, *wire.encode(wire.Ready(stage="supervisor", pid=os.getpid()))])
            elif isinstance(msg, wire.Ready):
                log.info("stage %s ready (pid %d)", name, msg.pid)
                await self._serving(sp)
            elif isinstance(msg, wire.Pong):
                sp.last_pong, sp.stats = time.monotonic(), msg.stats
                if sp.spec.remote and sp.state == "waiting":  # given up for lost, yet alive: it serves again
                    log.warning("remote stage %s answers again: re-attached", name)
                    await self._serving(sp)

    async def _serving(self, sp: StageProc) -> None:
        """A (re)started stage serves: once every stage does, ``on_ready`` and wake the waiters."""
        restarted = sp.restarts > 0
        sp.state, sp.last_pong, sp.suspect_since = "ready", time.monotonic(), None
        if all(s.state == "ready" for s in self.stages.values()):
            if self.on_ready is not None:
                await _maybe_await(self.on_ready(sp.spec.name, restarted))
            self._ready.set()
            self._spawn_spares()

    async def _disconnects(self, monitor) -> None:
        """A control connection closed (a remote stage's process died: its host's kernel closed the
        socket; or ZMTP heartbeats timed out: the host or the link is gone). The monitor does not say
        whose, so every serving remote stage becomes a suspect: one that answers no ping for
        ``stall_s`` after it is lost (see :meth:`_watch_remote`); a live one answers and is cleared."""
        from zmq.utils.monitor import parse_monitor_message

        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    now = time.monotonic()
                    for sp in self.stages.values():
                        if sp.spec.remote and sp.state == "ready" and sp.suspect_since is None:
                            sp.suspect_since = now
        finally:  # stop the events first: libzmq's I/O thread blocks sending one that nobody reads
            if not self.ctrl.closed:
                self.ctrl.disable_monitor()
            monitor.close(0)

    def _reject(self, sp: StageProc | None, name: str, why: str) -> None:
        log.error("stage %r rejected: %s", name, why)
        self.rejected.append(f"{name}: {why}")
        if sp is not None and sp.proc is not None and sp.proc.is_alive():
            sp.state, sp.error = "failed", why
            os.kill(sp.proc.pid, signal.SIGKILL)
            self._ready.set()  # wake wait_ready(): it reports the failure

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval_s)
            now = time.monotonic()
            for sp in self.stages.values():
                if sp.spec.remote:
                    await self._watch_remote(sp, now)
                    continue
                if sp.spare is not None and not sp.spare.is_alive():
                    log.error("the spare of stage %s died (exit code %s)", sp.spec.name, sp.spare.exitcode)
                    sp.spare.join(0.1)
                    sp.spare = None
                    if self.ready:
                        self._spawn_spares()
                if sp.state in ("failed", "stopped") or sp.proc is None:
                    continue
                if not sp.proc.is_alive():
                    await self._lost(sp, f"died (exit code {sp.proc.exitcode})")
                elif sp.state == "ready" and now - sp.last_pong > self.hang_timeout_s:
                    os.kill(sp.proc.pid, signal.SIGKILL)
                    sp.hangs += 1
                    await self._lost(sp, f"hung (no pong for {now - sp.last_pong:.1f}s)")
                elif sp.state != "ready" and now - sp.started_at > self.load_timeout_s:
                    os.kill(sp.proc.pid, signal.SIGKILL)
                    await self._lost(sp, f"not ready after {self.load_timeout_s:.0f}s")
                elif sp.state == "ready":
                    ping = wire.Ping(seq=next(self._seq), t=now)
                    await self.ctrl.send_multipart([sp.identity, *wire.encode(ping)])

    async def _watch_remote(self, sp: StageProc, now: float) -> None:
        """A remote stage cannot be restarted from here (whoever started it restarts it: ``--respawn``):
        one that is silent for ``hang_timeout_s``, or for ``stall_s`` after its connection closed, is
        lost until a process of it says Hello again -- or answers a ping again (a stopped process or a
        broken link that came back), so the one given up for lost is still pinged."""
        if sp.state == "waiting" and sp.remote_pid is not None:
            await self.ctrl.send_multipart([sp.identity, *wire.encode(wire.Ping(seq=next(self._seq), t=now))])
        if sp.state != "ready":
            return
        if sp.suspect_since is not None and sp.last_pong > sp.suspect_since:
            sp.suspect_since = None  # it answered after the disconnect: alive
        if sp.suspect_since is not None and now - sp.suspect_since > self.stall_s:
            await self._remote_lost(sp, f"disconnected and silent for {now - sp.last_pong:.1f}s (remote)")
        elif now - sp.last_pong > self.hang_timeout_s:
            await self._remote_lost(sp, f"silent for {now - sp.last_pong:.1f}s (remote)")
        else:
            await self.ctrl.send_multipart([sp.identity, *wire.encode(wire.Ping(seq=next(self._seq), t=now))])

    async def _remote_lost(self, sp: StageProc, reason: str) -> None:
        log.error("remote stage %s (pid %s on its host) %s: waiting for it to reconnect", sp.spec.name, sp.pid, reason)
        sp.history.append((time.time(), reason))
        sp.state, sp.restarts, sp.suspect_since = "waiting", sp.restarts + 1, None
        self._ready.clear()
        await self._tell_lost(sp.spec.name, reason)

    async def _tell_lost(self, stage: str, reason: str) -> None:
        """``on_lost``, which must not stop the watchdog: a failing owner callback is logged, and the
        stage is restarted all the same (else one bug there would leave the pipeline down for good)."""
        if self.on_lost is None:
            return
        try:
            await _maybe_await(self.on_lost(stage, reason))
        except Exception:
            log.exception("on_lost(%s) failed; restarting the stage anyway", stage)

    async def _lost(self, sp: StageProc, reason: str) -> None:
        if self._closing:
            return
        log.error("stage %s (pid %s) %s: restarting", sp.spec.name, sp.pid, reason)
        sp.history.append((time.time(), reason))
        sp.proc.join(1.0)  # reap it (SIGKILL was sent where needed)
        never_served = sp.last_pong == 0.0
        sp.state = "dead"
        sp.restarts += 1
        sp.crash_loop = sp.crash_loop + 1 if never_served else 0
        self._ready.clear()
        await self._tell_lost(sp.spec.name, reason)
        if sp.crash_loop >= self.MAX_START_FAILURES:  # it cannot start: stop trying, say why
            sp.state, sp.error = "failed", f"failed to start {sp.crash_loop} times in a row; last: {reason}"
            log.error("stage %s: %s", sp.spec.name, sp.error)
            self._ready.set()  # wake wait_ready(): it reports the failure
            return
        if not await self._promote(sp):
            self._spawn(sp)

    # ------------------------------------------------------------------ status
    def health(self) -> dict:
        """``{"serving": bool, "reason": str | None}``: False while a stage is not ready (starting,
        restarting, failed) or has not answered a ping for ``stall_s`` -- the field ``/health``
        reads, so it does not answer 200 during a stall."""
        if self._closing:
            return {"serving": False, "reason": "shutting down"}
        now = time.monotonic()
        for name, sp in self.stages.items():
            if sp.state == "failed":
                return {"serving": False, "reason": f"stage {name} failed: {sp.error}"}
            if sp.state != "ready":
                return {"serving": False, "reason": f"stage {name} is {sp.state}, not ready"}
            if sp.last_pong and now - sp.last_pong > self.stall_s:
                return {"serving": False, "reason": f"stage {name} has not answered for {now - sp.last_pong:.1f} s "
                        f"(stalled; killed after {self.hang_timeout_s:g} s)"}
        return {"serving": True, "reason": None}

    def admission(self, sessions: int, headroom: float = 0.9) -> str | None:
        """The busiest stage decides (each measures its own loop, :class:`~omnistream.engine.load.LoadMeter`)."""
        for name, sp in self.stages.items() if sessions else ():  # (an idle server always takes one)
            cost = (sp.stats.get("load") or {}).get("cost_per_replying_session")
            if cost and (sessions + 1) * cost > headroom:
                return (f"at capacity: stage {name} spends {100 * cost:.0f}% of its loop per replying session, "
                        f"so at most {int(headroom / cost)} sessions keep real time; try again later")
        return None

    def status(self) -> list[dict]:
        now = time.monotonic()
        return [{"name": n, "pid": sp.pid, "remote": sp.spec.remote,
                 "spare_pid": sp.spare.pid if sp.spare is not None else None, "spare_ready": sp.spare_ident is not None,
                 "alive": sp.state == "ready" if sp.spec.remote else bool(sp.proc is not None and sp.proc.is_alive()),
                 "state": sp.state, "workers": list(sp.spec.workers), "device": sp.spec.device,
                 "address": sp.spec.address, "restarts": sp.restarts, "hangs": sp.hangs,
                 "last_heartbeat_s": round(now - sp.last_pong, 3) if sp.last_pong else None, **sp.stats}
                for n, sp in self.stages.items()]


async def _maybe_await(x):
    if asyncio.iscoroutine(x):
        return await x
    return x
