"""A stage process: one main loop over its ZeroMQ sockets, driving the workers it hosts.

Sockets (the supervisor binds control/events/epochs; each stage binds its own input):

* ``DEALER`` -> supervisor ``ROUTER`` (control): Hello/Ready handshake, Ping -> Pong, Shutdown;
* ``SUB`` <- supervisor ``PUB`` (epochs): barge-in ``Epoch`` broadcasts and ``Shutdown``;
* ``PULL`` at the stage's address (data in), ``PUSH`` to the next stage's address and to the
  client's events socket (data out). High-water marks are sized in time (:func:`wire.hwm_for`).

Handshake: the stage loads its model part, then sends ``Hello`` (its protocol version); the
supervisor answers ``Ready`` (its version: each side rejects a mismatch); the stage binds its
input address and sends ``Ready`` when it serves. A *warm spare* is a stage process the supervisor
leaves waiting after its Hello -- loaded, not bound -- and promotes with a Ready the moment the
stage it stands in for is lost, so a restart costs a handshake instead of an interpreter start
and a checkpoint load. Pings are answered by the same loop that
runs the model, between two pieces of work (one decoded token, one DiT chunk), so a stage stuck
in a forward -- or stopped, or deadlocked -- stops answering and the supervisor restarts it.

Workers co-located in one process hand messages over in memory (no copies, tensors stay on
their device); messages to another process are encoded with tensors as separate zero-copy
frames. Barge-in epochs are applied to every local worker as soon as they arrive.

The process dies with its parent (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), and SIGTERM (or a
``Shutdown`` message) makes it drain: it keeps working until its tasks and input are done
(bounded by ``drain_s``) and exits 0.

A remote stage (another host; :func:`main`) has no supervisor process to die with: it exits after
``--orphan-s`` without a ping, and with ``--respawn`` a small keeper process restarts it whenever it
dies (:func:`respawn`) -- the supervisor re-attaches the new process at its Hello.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from collections import deque

import zmq

from omnistream.engine.load import LoadMeter
from omnistream.runtime import wire
from omnistream.runtime.layout import WORKERS, Layout, StageSpec
from omnistream.runtime.worker import load_figures

log = logging.getLogger("omnistream.stage")

PR_SET_PDEATHSIG = 1
BUFFER_S = 2.0  # seconds of 40 ms audio each link may buffer per session (the HWM, sized in time)
CHUNK_S = 0.04
SLOW_S = 1.0  # a piece of work longer than this is logged
SEND_TIMEOUT_MS = 5000  # a peer that takes no data for this long: drop the message, report it


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; no-op elsewhere).

    The signal fires when the parent *thread* that spawned us exits, so the supervisor spawns
    stages from its event-loop thread, which lives as long as the supervisor. The getppid check
    closes the race where the parent died before prctl ran.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def link_hwm(max_sessions: int) -> int:
    """Messages a link may queue: BUFFER_S of 40 ms chunks for every session (never unlimited)."""
    return wire.hwm_for(BUFFER_S * max(1, max_sessions), CHUNK_S)


class Stopped(Exception):
    """SIGTERM arrived before the stage served (e.g. a warm spare at shutdown)."""


class EchoWorker:
    """Sends every AudioChunk straight back to the client (no model): supervisor tests, hop benchmark."""

    name = "echo"

    def __init__(self, send):
        self.send = send

    def deliver(self, msg) -> None:
        if isinstance(msg, wire.AudioChunk):
            self.send("client", msg)

    def tick(self) -> bool:
        return False


class Stage:
    """The sockets, the workers and the loop of one stage process."""

    def __init__(self, spec: StageSpec, layout: Layout, model: str | None, incarnation: int = 0, *,
                 max_sessions: int = 8, drain_s: float = 30.0, orphan_s: float | None = None):
        self.spec, self.layout, self.model = spec, layout, model
        self.identity = f"{spec.name}#{incarnation}".encode()
        self.hwm = link_hwm(max_sessions)
        self.drain_s = drain_s
        self.orphan_s = orphan_s  # a remote stage exits after this long without a Ping (no PDEATHSIG across hosts)
        self.last_ping = time.monotonic()
        self.ctx = zmq.Context()
        self.ctrl = self._sock(zmq.DEALER, identity=self.identity)
        self.ctrl.connect(layout.control)
        self.sub = self._sock(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(layout.epochs)
        self.pull = self._sock(zmq.PULL)  # bound in activate(): a standby spare must not take the address
        self.out: dict[str, zmq.Socket] = {}  # address -> PUSH
        self.local: deque = deque()  # (worker, msg) handed over in memory
        self.workers: dict = {}
        self._accepts: list = []
        self.ck = None
        self.draining_since: float | None = None
        self.orphaned = False  # run() ended because the supervisor went silent (not a Shutdown)
        self.meter = LoadMeter()

    def _sock(self, kind, identity: bytes | None = None) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 1000)  # flush what is queued on exit, but never hang on a dead peer
        if identity is not None:
            s.setsockopt(zmq.IDENTITY, identity)
        if kind in (zmq.PUSH, zmq.PULL):
            s.setsockopt(zmq.SNDHWM, self.hwm)
            s.setsockopt(zmq.RCVHWM, self.hwm)
            s.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        return s

    # ------------------------------------------------------------------ handshake
    def start(self, ready_timeout_s: float | None = None) -> None:
        """load -> Hello -> (supervisor) Ready -> bind -> Ready. A warm spare waits in the middle."""
        self.load()
        self.hello()
        self.wait_ready(ready_timeout_s)
        self.activate()

    def hello(self) -> None:
        wire.send(self.ctrl, wire.Hello(stage=self.spec.name, pid=os.getpid()))

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait for the supervisor's Ready (WireError on a protocol mismatch); SIGTERM ends the wait."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.ctrl.poll(200):
            if self.draining_since is not None:
                raise Stopped
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"stage {self.spec.name}: no Ready from the supervisor in {timeout_s:.0f}s")
        msg = wire.recv(self.ctrl)
        if not isinstance(msg, wire.Ready):
            raise wire.WireError(f"expected Ready from the supervisor, got {type(msg).__name__}")

    def activate(self) -> None:
        """Take the stage's input address and tell the supervisor this process serves."""
        self.pull.bind(self.spec.listen)  # the advertised address, or the local endpoint the layout binds
        wire.send(self.ctrl, wire.Ready(stage=self.spec.name, pid=os.getpid()))

    def load(self) -> None:
        """Load the model part the hosted workers need (none for echo) and build the workers."""
        self._accepts = []  # (worker, message types it takes from outside; None: everything)
        for w in sorted(self.spec.workers, key=WORKERS.index):  # chain order
            if w == "echo":
                self.workers[w] = EchoWorker(self.send)
                self._accepts.append((self.workers[w], None))
                continue
            from omnistream.checkpoints import load_omni
            from omnistream.runtime.workers import WORKER_TYPES

            if self.ck is None:
                self._threads()
                self.ck = load_omni(self.model, talker=self.spec.needs_talker, device=self.spec.device,
                                    dtype=self.spec.dtype)
            cls = WORKER_TYPES[w]
            self.workers[w] = cls(self.ck, self.send, self.spec.device)
            self._accepts.append((self.workers[w], cls.handles + (wire.OpenSession, wire.CloseSession)))

    # ------------------------------------------------------------------ routing
    def send(self, dest: str, msg) -> None:
        """To a local worker (in memory, tensors where they are) or over ZeroMQ (the next stage, or
        "client": tensors moved to CPU first)."""
        if dest in self.workers:
            self.local.append((self.workers[dest], msg))
            return
        addr = self.layout.events if dest == "client" else self.layout.stage_of(dest).address
        sock = self.out.get(addr)
        if sock is None:
            sock = self.out[addr] = self._sock(zmq.PUSH)
            sock.connect(addr)
        try:
            wire.send(sock, wire.to_cpu(msg))
        except zmq.Again:
            log.error("%s: %s to %s dropped: the link stayed full for %d ms", self.spec.name,
                      type(msg).__name__, dest, SEND_TIMEOUT_MS)

    def _incoming(self, frames) -> None:
        try:
            msg = wire.decode(frames)  # (model tensors arrive as torch, media as numpy: wire.Tensor / wire.Array)
        except wire.WireError as e:
            log.warning("%s: dropped a bad message: %s", self.spec.name, e)
            return
        if isinstance(msg, wire.Epoch):
            for w in self.workers.values():
                w.deliver(msg)
            return
        target = self._target(msg)
        if target is not None:
            target.deliver(msg)

    def _target(self, msg):
        """Data arriving from outside goes to the first local worker of the chain that takes it."""
        for w, types in self._accepts:
            if types is None or isinstance(msg, types):
                return w
        return self._accepts[0][0] if self._accepts else None

    # ------------------------------------------------------------------ the loop
    def _control(self, sock) -> None:
        while sock.poll(0):
            try:
                msg = wire.recv(sock)
            except wire.WireError as e:
                log.warning("%s: bad control message: %s", self.spec.name, e)
                continue
            if isinstance(msg, wire.Ping):
                self.last_ping = time.monotonic()
                wire.send(self.ctrl, wire.Pong(seq=msg.seq, t=msg.t, stage=self.spec.name, stats=self.stats()))
            elif isinstance(msg, wire.Shutdown):
                self.drain()
            elif isinstance(msg, wire.Epoch):
                for w in self.workers.values():
                    w.deliver(msg)

    def stats(self) -> dict:
        """What the supervisor learns with every pong: this stage's load and its workers' batches."""
        workers = {n: w.status() for n, w in self.workers.items() if hasattr(w, "status")}
        return {"load": self.meter.status(self._sessions()), "workers": workers}

    def _sessions(self) -> int:
        return max((len(getattr(w, "slots", ())) for w in self.workers.values()), default=0)

    def drain(self) -> None:
        if self.draining_since is None:
            log.info("%s: draining", self.spec.name)
            self.draining_since = time.monotonic()

    def run(self) -> None:
        poller = zmq.Poller()
        for s in (self.ctrl, self.sub, self.pull):
            poller.register(s, zmq.POLLIN)
        busy = False
        self.last_ping = time.monotonic()
        while True:
            ready = dict(poller.poll(0 if busy or self.local else 50))
            t_work = time.perf_counter()
            if self.ctrl in ready:
                self._control(self.ctrl)
            if self.sub in ready:
                self._control(self.sub)
            n = 0
            while n < 64 and self.pull.poll(0):  # bounded: pings are answered at least every 64 messages
                self._incoming(self.pull.recv_multipart(copy=False))
                n += 1
            while self.local:
                w, msg = self.local.popleft()
                t = time.monotonic()
                w.deliver(msg)
                self._slow(t, f"{w.name} <- {type(msg).__name__}")
            busy = False
            for w in self.workers.values():
                t = time.monotonic()
                busy = w.tick() or busy
                self._slow(t, f"{w.name} tick")
            replying, speaking, speech_s = load_figures(self.workers.values())
            self.meter.record(time.perf_counter() - t_work, replying, did_work=bool(n) or busy, speaking=speaking,
                              speech_s=speech_s)
            if self.orphan_s is not None and time.monotonic() - self.last_ping > self.orphan_s:
                log.error("%s: no ping from the supervisor for %.0fs: exiting", self.spec.name, self.orphan_s)
                self.orphaned = True
                return
            if self.draining_since is not None:
                idle = not busy and not self.local and not n
                if idle or time.monotonic() - self.draining_since > self.drain_s:
                    return

    def _threads(self) -> None:
        """CPU stages share the host's cores instead of each taking all of them (oversubscription
        makes every forward slower and pings later)."""
        import torch

        if self.spec.device == "cpu":
            n_cpu = sum(1 for s in self.layout.stages if s.device == "cpu" and s.needs_model)
            torch.set_num_threads(self.spec.threads or max(1, (os.cpu_count() or 1) // max(1, n_cpu)))

    def _slow(self, t0: float, what: str) -> None:
        dt = time.monotonic() - t0
        if dt > SLOW_S:  # pings wait behind this: a hang timeout must exceed it
            log.warning("%s: %s took %.2fs", self.spec.name, what, dt)

    def close(self) -> None:
        for s in (self.ctrl, self.sub, self.pull, *self.out.values()):
            s.close()
        self.ctx.term()


def stage_main(spec: StageSpec, layout: Layout, model: str | None, incarnation: int, parent_pid: int,
               max_sessions: int = 8, log_level: int = logging.WARNING) -> None:
    """Entry point of a stage process (a multiprocessing 'spawn' target)."""
    die_with_parent(parent_pid)
    logging.basicConfig(level=log_level, format=f"%(asctime)s {spec.name}[%(process)d] %(levelname)s %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    stage = Stage(spec, layout, model, incarnation, max_sessions=max_sessions)
    signal.signal(signal.SIGTERM, lambda *_: stage.drain())
    try:
        stage.start()  # a warm spare waits inside for the supervisor's Ready
        stage.run()
    except Stopped:
        pass
    except wire.WireError as e:
        log.error("handshake failed: %s", e)
        stage.close()
        sys.exit(3)
    stage.close()


EXIT_HANDSHAKE = 3  # protocol mismatch or a refused handshake: restarting cannot help
EXIT_NO_SUPERVISOR = 4  # no Ready, or no ping for --orphan-s: a respawned process waits for it again
RESPAWN_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # between restarts of a stage that keeps dying young
RESPAWN_STABLE_S = 60.0  # a process that lived this long resets the backoff


def main(argv=None) -> int:
    """``python -m omnistream.runtime.stage``: run a layout's ``remote`` stage on this host.

    Exit codes: 0 drained (SIGTERM, or the supervisor's Shutdown), 2 bad arguments or layout,
    3 handshake refused, 4 no supervisor. With ``--respawn`` the command is a small keeper that
    runs the stage as its child and starts a new one whenever it dies (kill -9, OOM, a crash, an
    orphan exit) -- a remote stage is not spawned by the supervisor, so this is how it comes back;
    the supervisor re-attaches the new process at its Hello (see :mod:`omnistream.runtime.supervisor`).
    """
    import argparse
    from dataclasses import replace

    from omnistream.runtime.layout import LayoutError, check_endpoints, load

    p = argparse.ArgumentParser(description="Run one stage of a layout on this host; it connects to the supervisor.")
    p.add_argument("--layout", required=True, help="the YAML layout the supervisor runs (tcp:// addresses)")
    p.add_argument("--stage", required=True, help="the stage's name in the layout")
    p.add_argument("--model", help="checkpoint directory (not needed for echo stages)")
    p.add_argument("--bind", help="listen here instead of the layout's bind/address (e.g. tcp://0.0.0.0:5601); "
                   "peers still connect to the layout's address")
    p.add_argument("--orphan-s", type=float, default=60.0, help="exit after this long without a ping")
    p.add_argument("--respawn", action="store_true", help="restart the stage whenever its process dies")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # set by --respawn: die with the keeper
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    try:
        layout = load(args.layout)
        spec = next((s for s in layout.stages if s.name == args.stage), None)
        if spec is None:
            raise LayoutError(f"no stage {args.stage!r} in {args.layout}; stages: "
                              f"{', '.join(s.name for s in layout.stages)}")
        if args.bind:
            spec = replace(spec, bind=args.bind)
            check_endpoints(spec.address, spec.bind, f"--bind for stage {spec.name!r}")
    except LayoutError as e:
        p.error(str(e))
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s {spec.name}[%(process)d] %(levelname)s %(message)s")
    if args.respawn:
        argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--respawn"]
        return respawn([sys.executable, "-m", "omnistream.runtime.stage", *argv, "--parent-pid", str(os.getpid())])
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    stage = Stage(spec, layout, args.model, incarnation=os.getpid(), orphan_s=args.orphan_s)
    signal.signal(signal.SIGTERM, lambda *_: stage.drain())
    try:
        stage.start(ready_timeout_s=args.orphan_s)
        stage.run()
    except Stopped:
        pass
    except TimeoutError as e:
        log.error("%s", e)
        return EXIT_NO_SUPERVISOR
    except wire.WireError as e:
        log.error("handshake failed: %s", e)
        return EXIT_HANDSHAKE
    finally:
        stage.close()
    return EXIT_NO_SUPERVISOR if stage.orphaned else 0


def respawn(cmd: list[str]) -> int:
    """Keep one stage process (``cmd``) running: start it again whenever it dies, with a backoff
    while it keeps dying young. Ends with the child's code when it exits 0 (drained) or 3 (its
    handshake was refused: a restart would be refused too), and on SIGTERM/SIGINT, which it passes
    on to the child (a drain) and waits for. The child dies with this keeper (``--parent-pid``)."""
    import subprocess

    stopping = False
    child: subprocess.Popen | None = None

    def stop(signum, _frame):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    young = 0  # deaths in a row of processes that lived less than RESPAWN_STABLE_S
    while True:
        t0 = time.monotonic()
        child = subprocess.Popen(cmd)
        log.info("stage process %d started", child.pid)
        rc = child.wait()
        if stopping or rc in (0, EXIT_HANDSHAKE):
            return rc
        young = young + 1 if time.monotonic() - t0 < RESPAWN_STABLE_S else 0
        delay = RESPAWN_BACKOFF_S[min(young, len(RESPAWN_BACKOFF_S)) - 1] if young else 0.0
        log.error("stage process %d exited with %s; starting a new one in %.1fs", child.pid,
                  f"signal {-rc}" if rc < 0 else f"code {rc}", delay)
        end = time.monotonic() + delay
        while not stopping and time.monotonic() < end:
            time.sleep(0.05)
        if stopping:
            return rc


if __name__ == "__main__":
    raise SystemExit(main())
