"""Many replicas behind HAProxy: what the balancer costs, and how long a replica takes to drain.

    python benchmarks/scale.py --json                 # tiny checkpoint, 1 and 2 replicas
    python benchmarks/scale.py --json --model DIR --sessions 8 --serve-arg=--device --serve-arg=cuda

Starts real ``omnistream serve`` processes (in-process layout, loopback, free ports) and a real
``haproxy`` running ``deploy/haproxy.cfg`` -- the shipped file, with only its addresses, ports,
check intervals and socket paths changed (:func:`render_haproxy_cfg`). The sessions are
``benchmarks/capacity.py``'s voice sessions: the spoken "hello" streamed at real time in 40 ms
appends, server VAD ends the turn, a spoken reply comes back.

Keys:
- ``routing_overhead_ms``: first-audio p50 (end of speech -> first reply audio) through HAProxy
  minus direct to the same replica, one session at a time, alternating (goal <= 5 ms). It
  includes the model's work, so on a shared CPU it is noisy; ``rtt_overhead_ms`` is the same
  difference for a bare event round trip (``session.update`` -> ``session.updated``), the
  balancer's cost without the model's noise.
- ``replicas_1`` / ``replicas_2``: ``--sessions`` concurrent voice sessions through HAProxy to one
  replica, then to two: first-audio p50/p95, underruns, how the sessions were spread (each
  replica's own ``/status`` connection count). Both replicas share this machine's cores, so two
  replicas add no compute here: on real hardware each has its own GPU.
- ``drain_s``: SIGTERM to process exit for a replica with one reply running (null with
  ``drain_note`` when ``serve`` has no drain, ``--drain-grace-s``); split into
  ``drain_reply_left_s`` (SIGTERM to that reply's ``response.done``: the reply finishing) and
  ``drain_after_reply_s`` (its ``response.done`` to exit: closing the session and the pipeline),
  with the reply's status and the session's close code (1012).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.capacity import RATE, p95, voice_session  # noqa: E402
from benchmarks.serve import hello_24k, speech_end  # noqa: E402

HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
SERVE_READY = re.compile(r"serving ws://([\d.]+):(\d+)/v1/realtime")


# ---------------------------------------------------------------------------------- the shipped config
def render_haproxy_cfg(text: str, *, bind: str, replicas: list[str], stats_socket: str, stats_bind: str,
                       inter_ms: int | None = None) -> str:
    """``deploy/haproxy.cfg`` with its addresses, ports, intervals and socket path replaced, and
    nothing else: the tests and the benchmark run the shipped balancing, health checks, retries
    and timeouts. ``inter_ms`` scales ``inter``/``fastinter``/``downinter`` (the shipped 2 s /
    500 ms / 2 s) down for tests. Each line it replaces must be there exactly once: a changed
    config fails here with one line instead of testing something else."""
    if not replicas:
        raise ValueError("render_haproxy_cfg: at least one replica address")

    def sub(pattern: str, repl, s: str) -> str:
        out, n = re.subn(pattern, repl, s, flags=re.M)
        if n != 1:
            raise ValueError(f"deploy/haproxy.cfg: expected one line matching {pattern!r}, found {n}")
        return out

    text = sub(r"^(\s*bind) :8080$", rf"\1 {bind}", text)
    text = sub(r"^(\s*bind) :8404$", rf"\1 {stats_bind}", text)
    text = sub(r"^(\s*stats socket) \S+", rf"\1 {stats_socket}", text)
    if inter_ms is not None:
        fast = max(10, inter_ms // 4)
        text = sub(r"^(\s*default-server .*)\binter 2s fastinter 500ms downinter 2s\b",
                   rf"\1inter {inter_ms}ms fastinter {fast}ms downinter {inter_ms}ms", text)
    servers = re.findall(r"^(\s*)server replica\d+ \S+$", text, flags=re.M)
    if len(servers) < 1:
        raise ValueError("deploy/haproxy.cfg: no `server replicaN ADDRESS` lines")
    indent = servers[0]
    block = "\n".join(f"{indent}server replica{i + 1} {a}" for i, a in enumerate(replicas))
    text = re.sub(r"^\s*server replica\d+ \S+\n", "", text, flags=re.M)  # drop the shipped ones ...
    return sub(r"^(\s*default-server .*)$", lambda m: m.group(1) + "\n" + block, text)  # ... ours follow


def haproxy_exe() -> str | None:
    """The ``haproxy`` binary: on PATH, or where Debian puts it (/usr/sbin, off a normal user's PATH)."""
    exe = shutil.which("haproxy")
    return exe or (str(Path("/usr/sbin/haproxy")) if os.access("/usr/sbin/haproxy", os.X_OK) else None)


def free_port() -> int:
    """A loopback port nobody listens on now (HAProxy binds its own; a race is possible but rare)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; an HTTP error status is an answer, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ---------------------------------------------------------------------------------- processes
@dataclass
class Replica:
    """One ``omnistream serve`` child process; ``port`` once it printed its address."""

    name: str
    proc: subprocess.Popen
    log: Path
    model: str
    args: tuple[str, ...]
    port: int | None = None

    @classmethod
    def spawn(cls, name: str, model, log: Path, *args: str, port: int = 0) -> Replica:
        cmd = [sys.executable, "-m", "omnistream", "serve", "--model", str(model), "--port", str(port), *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        with open(log, "w") as f:  # a file, not a pipe: a pipe nobody drains would block the server's log lines
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return cls(name, proc, log, str(model), args)

    def respawn(self) -> Replica:
        """The same replica started again on its port (after it died); the old log is kept."""
        log = self.log.with_name(f"{self.log.stem}-{time.monotonic_ns()}.log")
        return Replica.spawn(self.name, self.model, log, *self.args, port=self.port)

    def wait_ready(self, timeout: float = 120.0) -> Replica:
        deadline = time.monotonic() + timeout
        while not (m := SERVE_READY.search(self.log.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"replica {self.name} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        self.port = int(m.group(2))
        return self

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def status(self) -> dict:
        """The replica's own account (``GET /status``): its connection count is the test oracle."""
        code, body = http_get(f"http://{self.addr}/status")
        return json.loads(body) if code == 200 else {"http_status": code}

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code (None if it was gone already)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class HAProxy:
    """A ``haproxy`` child process running the rendered shipped config, and its runtime API."""

    proc: subprocess.Popen
    port: int
    stats_port: int  # HAProxy's own page (/stats) and Prometheus exporter (/metrics)
    stats_socket: Path
    log: Path
    servers: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, workdir: Path, replicas: list[str], inter_ms: int | None = 200) -> HAProxy:
        exe = haproxy_exe()
        if exe is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy; tools/system-deps.sh does it)")
        for _ in range(5):  # another process may take the port between free_port() and haproxy's bind
            port, stats_port, sock = free_port(), free_port(), workdir / "haproxy.sock"
            cfg = workdir / "haproxy.cfg"
            cfg.write_text(render_haproxy_cfg(HAPROXY_CFG.read_text(), bind=f"127.0.0.1:{port}", replicas=replicas,
                                              stats_socket=str(sock), stats_bind=f"127.0.0.1:{stats_port}",
                                              inter_ms=inter_ms))
            log = workdir / "haproxy.log"
            with open(log, "w") as f:
                proc = subprocess.Popen([exe, "-db", "-f", str(cfg)], stdout=f, stderr=subprocess.STDOUT)
            lb = cls(proc, port, stats_port, sock, log, [f"replica{i + 1}" for i in range(len(replicas))])
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    lb.command("show info")
                    return lb
                time.sleep(0.05)
            lb.stop()
            if "cannot bind socket" not in log.read_text():
                break
        raise RuntimeError(f"haproxy did not start: {log.read_text()[-2000:]}")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    def command(self, line: str) -> str:
        """One runtime API command over the stats socket (``show stat``, ``set server ...``)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while b := s.recv(65536):
                chunks.append(b)
        return b"".join(chunks).decode()

    def server_stats(self) -> dict[str, dict]:
        """Backend ``omnistream``'s servers: name -> HAProxy's CSV row (``status`` UP/DOWN/..., ``stot``
        sessions sent there in total, ``scur`` open now)."""
        lines = [ln for ln in self.command("show stat").splitlines() if ln]
        head = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(head, ln.split(","), strict=False)) for ln in lines[1:]]
        return {r["svname"]: r for r in rows if r["pxname"] == "omnistream" and r["svname"] in self.servers}

    def routes(self) -> dict[int, str]:
        """Open client connections: the client's local port -> the server HAProxy sent it to."""
        return {int(m.group(1)): m.group(2) for m in re.finditer(r"src=127\.0\.0\.1:(\d+) fe=realtime be=omnistream "
                                                                 r"srv=(\S+)", self.command("show sess"))}

    def wait_status(self, server: str, status: str, timeout: float) -> float:
        """Seconds until ``server``'s check status starts with ``status`` (UP, DOWN); TimeoutError past ``timeout``."""
        t0 = time.monotonic()
        while not self.server_stats()[server]["status"].startswith(status):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{server} not {status} after {timeout} s: {self.server_stats()[server]['status']}")
            time.sleep(0.02)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def cluster(model, workdir: Path, n: int, serve_args: tuple[str, ...] = (), inter_ms: int | None = 200):
    """``n`` replicas (started together) behind one HAProxy; every process is stopped on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    reps = [Replica.spawn(f"replica{i + 1}", model, workdir / f"replica{i + 1}.log", *serve_args) for i in range(n)]
    lb = None
    try:
        for r in reps:
            r.wait_ready()
        lb = HAProxy.start(workdir, [r.addr for r in reps], inter_ms=inter_ms)
        for s in lb.servers:
            lb.wait_status(s, "UP", 30)
        yield lb, reps
    finally:
        if lb is not None:
            lb.stop()
        for r in reps:
            r.stop()


# ---------------------------------------------------------------------------------- measurements
def _clip() -> tuple[np.ndarray, int]:
    speech = hello_24k()
    end = speech_end(speech)
    return np.concatenate([np.zeros(RATE // 4, "<i2"), speech[:end], np.zeros(RATE, "<i2")]), RATE // 4 + end


async def _one(url: str, clip, done_at: int) -> dict:
    start = asyncio.Event()
    start.set()
    return await voice_session(url, clip, done_at, start, jitter_s=0.3)


async def rtt_ms(url: str, n: int) -> list[float]:
    """``n`` bare event round trips (session.update -> session.updated) on one session, in ms."""
    from websockets.asyncio.client import connect

    out = []
    async with connect(url, max_size=None) as ws:
        json.loads(await ws.recv())  # session.created
        for _ in range(n):
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "hi"}}))
            while json.loads(await ws.recv())["type"] != "session.updated":
                pass
            out.append((time.perf_counter() - t0) * 1e3)
    return out


async def overhead(lb: HAProxy, rep: Replica, turns: int, rtts: int) -> dict:
    """Direct vs through HAProxy to the same replica, alternating so load drifts hit both alike."""
    clip, done_at = _clip()
    direct, proxied = [], []
    for _ in range(turns):
        direct.append((await _one(f"ws://{rep.addr}/v1/realtime", clip, done_at))["first_audio_s"])
        proxied.append((await _one(lb.url, clip, done_at))["first_audio_s"])
    rd, rp = await rtt_ms(f"ws://{rep.addr}/v1/realtime", rtts), await rtt_ms(lb.url, rtts)
    med = statistics.median
    return {"routing_overhead_ms": round((med(proxied) - med(direct)) * 1e3, 2),
            "first_audio_p50_s_direct": round(med(direct), 3), "first_audio_p50_s_haproxy": round(med(proxied), 3),
            "rtt_overhead_ms": round(med(rp) - med(rd), 3), "rtt_p50_ms_direct": round(med(rd), 3),
            "rtt_p50_ms_haproxy": round(med(rp), 3), "turns": turns}


async def concurrent(lb: HAProxy, reps: list[Replica], n: int) -> dict:
    """``n`` voice sessions at once through HAProxy; how they spread, first audio, underruns."""
    clip, done_at = _clip()
    start = asyncio.Event()
    tasks = [asyncio.create_task(voice_session(lb.url, clip, done_at, start, 0.3)) for _ in range(n)]
    await asyncio.sleep(0.3 + 0.05 * n)  # every session connected (and counted by its replica)
    spread = [r.status().get("connections") for r in reps]
    start.set()
    res = await asyncio.gather(*tasks)
    firsts = [r["first_audio_s"] for r in res if r["first_audio_s"] is not None]
    return {"sessions": n, "spread": spread, "replies_with_audio": len(firsts),
            "first_audio_p50_s": round(statistics.median(firsts), 3) if firsts else None,
            "first_audio_p95_s": round(p95(firsts), 3) if firsts else None,
            "underruns": sum(r["underruns"] for r in res), "loadavg": os.getloadavg()[0]}


async def text_reply(url: str, audio_started: asyncio.Event | None = None, *, wait_close: bool = False,
                     headers: dict | None = None) -> dict:
    """One session asks a typed question and reads the spoken reply; ``audio_started`` is set at the
    first audio delta. Returns the reply's ``response.done`` status (and its reason when not
    completed), its audio seconds (and each delta's arrival: ``audio_at``, monotonic time and
    seconds), the error events seen, and with ``wait_close`` the close code the
    server ended the session with."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    out = {"status": None, "reason": None, "audio_s": 0.0, "audio_at": [], "errors": [], "close_code": None}
    async with connect(url, max_size=None, additional_headers=headers) as ws:
        try:
            json.loads(await ws.recv())  # session.created
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]}}))
            await ws.send(json.dumps({"type": "response.create"}))
            while out["status"] is None or wait_close:
                ev = json.loads(await ws.recv())
                if ev["type"] in ("response.output_audio.delta", "response.audio.delta"):
                    sec = len(base64.b64decode(ev["delta"])) / 2 / RATE
                    out["audio_s"] += sec
                    out["audio_at"].append((time.monotonic(), sec))
                    if audio_started is not None:
                        audio_started.set()
                elif ev["type"] == "response.done":
                    out["status"] = ev["response"]["status"]
                    out["reason"] = (ev["response"].get("status_details") or {}).get("reason")
                    out["done_at"] = time.monotonic()
                elif ev["type"] == "error":
                    out["errors"].append(ev["error"])
        except ConnectionClosed:
            pass
        out["close_code"] = ws.close_code
    return out


async def drain_seconds(model, workdir: Path, serve_args: tuple[str, ...]) -> dict:
    """SIGTERM a replica while one reply runs; seconds to its exit, its exit code, the reply's end."""
    rep = Replica.spawn("drain", model, workdir / "drain.log", *serve_args).wait_ready()
    try:
        started = asyncio.Event()
        task = asyncio.create_task(text_reply(f"ws://{rep.addr}/v1/realtime", started, wait_close=True))
        await asyncio.wait_for(started.wait(), 60)
        t0 = time.monotonic()
        rep.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(rep.proc.wait, 120)
        t_exit = time.monotonic()
        reply = await asyncio.wait_for(task, 10)
        done_at = reply.get("done_at")
        return {"drain_s": round(t_exit - t0, 3), "drain_exit_code": rc, "drain_reply_status": reply["status"],
                "drain_reply_left_s": None if done_at is None else round(done_at - t0, 3),
                "drain_after_reply_s": None if done_at is None else round(t_exit - done_at, 3),
                "drain_reply_audio_s": round(reply["audio_s"], 2), "drain_close_code": reply["close_code"]}
    finally:
        rep.stop()


async def bench(args, workdir: Path) -> dict:
    serve_args = ("--max-sessions", str(args.sessions + 2), "--headroom", "0", "--rate-limit", "0",
                  "--max-new-tokens", str(args.max_new_tokens), "--max-speech-s", str(args.speech_s),
                  "--max-sessions-per-ip", "0", *args.serve_arg)  # (every session comes from 127.0.0.1)
    out: dict = {}
    with cluster(args.model, workdir / "one", 1, serve_args, inter_ms=None) as (lb, reps):
        out.update(await overhead(lb, reps[0], args.turns, args.rtts))
        out["replicas_1"] = await concurrent(lb, reps, args.sessions)
    with cluster(args.model, workdir / "two", 2, serve_args, inter_ms=None) as (lb, reps):
        out["replicas_2"] = await concurrent(lb, reps, args.sessions)
    out.update(await drain_seconds(args.model, workdir, serve_args))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: a tiny random one written to a temp dir)")
    p.add_argument("--sessions", type=int, default=4, help="concurrent sessions for the 1 vs 2 replica rounds (default 4)")
    p.add_argument("--turns", type=int, default=5, help="voice turns each way for routing_overhead_ms (default 5)")
    p.add_argument("--rtts", type=int, default=50, help="event round trips each way for rtt_overhead_ms (default 50)")
    p.add_argument("--speech-s", type=float, default=2.0, help="reply speech per session, seconds (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="reply text tokens (default 16)")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `omnistream serve` argument (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    if haproxy_exe() is None:
        print("scale.py: haproxy is not installed (apt-get install haproxy)", file=sys.stderr)
        return 2
    out = {"loadavg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from omnistream.random_checkpoints import make_tiny

            args.model = str(make_tiny(Path(tmp) / "tiny"))
            out["model"] = "tiny (random weights)"
        else:
            out["model"] = args.model
        out.update(asyncio.run(bench(args, Path(tmp))))
    out["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
