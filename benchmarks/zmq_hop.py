"""Per-message overhead of one ZeroMQ stage hop for a 40 ms chunk of 24 kHz audio.

    python benchmarks/zmq_hop.py --json               # ipc:// (one host)
    python benchmarks/zmq_hop.py --json --tcp         # tcp:// over loopback

A real stage process (the runtime's stage loop, hosting the ``echo`` worker, spawned as the
supervisor spawns stages) bounces ``AudioChunk`` messages (960 float32 samples, the PCM as a
separate zero-copy frame) back to this process. A round trip is two hops -- here -> stage ->
here -- each with encode, send, poll, receive and decode, so one hop is half the round trip.
Reported: the median (and p90) over ``n`` round trips after a warm-up, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnistream.runtime import wire
from omnistream.runtime.layout import Layout, StageSpec
from omnistream.runtime.stage import stage_main

CHUNK = 960  # 40 ms at 24 kHz


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_trips(n: int = 2000, tcp: bool = False, warmup: int = 200) -> list[float]:
    """Round-trip times (seconds) of ``n`` AudioChunks through a spawned echo stage."""
    with tempfile.TemporaryDirectory(prefix="omnistream-hop-") as d:
        if tcp:
            addr = lambda: f"tcp://127.0.0.1:{_free_port()}"
            layout = Layout((StageSpec("echo", ("echo",), address=addr()),), addr(), addr(), addr(), "hop")
        else:
            layout = Layout((StageSpec("echo", ("echo",)),), source="hop").resolved(d)
        ctx = zmq.Context()
        ctrl, pub, events = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB), ctx.socket(zmq.PULL)
        ctrl.bind(layout.control)
        pub.bind(layout.epochs)
        events.bind(layout.events)
        proc = mp.get_context("spawn").Process(target=stage_main, args=(layout.stages[0], layout, None, 1, os.getpid()),
                                               daemon=True)
        proc.start()
        try:
            ident, *frames = ctrl.recv_multipart()  # Hello
            ctrl.send_multipart([ident, *wire.encode(wire.Ready(stage="bench", pid=os.getpid()))])
            ident, *frames = ctrl.recv_multipart()  # Ready: the stage serves
            assert isinstance(wire.decode(frames), wire.Ready)
            push = ctx.socket(zmq.PUSH)
            push.connect(layout.stages[0].address)
            pcm = np.random.default_rng(0).uniform(-0.5, 0.5, CHUNK).astype(np.float32)  # (960,)
            out = []
            for i in range(warmup + n):
                t0 = time.perf_counter()
                wire.send(push, wire.AudioChunk(session="bench", epoch=0, seq=i, sample_rate=24000, pcm=pcm))
                msg = wire.recv(events)
                dt = time.perf_counter() - t0
                assert msg.seq == i and msg.pcm.shape == (CHUNK,)
                if i >= warmup:
                    out.append(dt)
            push.close(0)
            return out
        finally:
            pub.send_multipart(wire.encode(wire.Shutdown()))
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            for s in (ctrl, pub, events):
                s.close(0)
            ctx.term()


def hop_us(n: int = 2000, tcp: bool = False) -> float:
    """Median per-message overhead of one stage hop (half a round trip), microseconds."""
    return statistics.median(round_trips(n, tcp)) / 2 * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="round trips measured (after 200 warm-up ones)")
    p.add_argument("--tcp", action="store_true", help="tcp:// over loopback instead of ipc://")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    args = p.parse_args()
    rtt = sorted(round_trips(args.n, args.tcp))
    out = {
        "transport": "tcp" if args.tcp else "ipc",
        "chunk": "40 ms float32 mono 24 kHz (3840 bytes)",
        "round_trips": len(rtt),
        "zmq_hop_us": round(statistics.median(rtt) / 2 * 1e6, 1),
        "zmq_hop_p90_us": round(rtt[int(0.9 * (len(rtt) - 1))] / 2 * 1e6, 1),
    }
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
