"""How many real-time voice conversations one machine holds: a ramp over the WebSocket API.

    python benchmarks/capacity.py --json                    # tiny checkpoint, in-process + split
    python benchmarks/capacity.py --json --layouts inproc   # one layout
    python benchmarks/capacity.py --json --model DIR --device cuda --dtype bf16

For N = 1, 2, ... sessions at once, every session streams the same spoken question at real-time
pace (40 ms appends of 24 kHz pcm16, server VAD decides the end of the turn) and receives a spoken
reply of ``--speech-s`` seconds (forced: random weights would end it after ~0.6 s, see
``--natural-length``). A session keeps real time when no reply audio delta arrives after its playout deadline: a
client that starts playing ``jitter_s`` after the first delta and plays continuously needs delta k
by ``t_first + jitter_s + (samples before k) / 24000``; every late delta is an *underrun*. N passes
when no session has an underrun and every first audio arrives within ``--first-audio-max-s``. The
ramp goes on past the first failing N up to 8 (``throughput_scaling_8`` needs 8), then stops at a
failing N; ``max_realtime_sessions`` is the largest N with every N up to it passing. A session the
server refuses (admission control, HTTP 503) ends the ramp: ``--headroom 0`` turns that off. Before
the ramp each server answers one untimed session (``--no-warm-up`` to skip it), as ``first_packet.py
--warm-up`` does: the 7B shape's first capacity run on an H200 (2026-12-04) timed its N = 1 row cold.

Keys: ``max_realtime_sessions``, ``throughput_scaling_8`` (reply audio seconds per wall second
with 8 sessions / with 1; the server paces audio at real time, so 8.0 is the ceiling),
``first_audio_p95_s_1`` / ``first_audio_p95_s_8`` (end of speech -> first reply audio),
``underruns`` (at the reported capacity), ``batched_equals_solo`` (every session's reply text and
PCM at each N equal the N = 1 reply: greedy text, seeded Talker and Token2Wav noise). Speed goals
live here, never in test asserts; note ``loadavg``: this machine's figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]  # (a benchmark named kernels.py
sys.path.insert(0, str(ROOT))  # would shadow the `kernels` package transformers imports)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

from benchmarks.serve import hello_24k, speech_end  # noqa: E402
from omnistream.apps.server import ServerConfig, serving  # noqa: E402
from omnistream.runtime.client import SessionOptions  # noqa: E402

RATE = 24000


async def _recv(ws) -> dict:
    ev = json.loads(await ws.recv())
    ev["_t"] = time.perf_counter()
    return ev


async def voice_session(url: str, clip: np.ndarray, speech_done_at: int, start: asyncio.Event, jitter_s: float) -> dict:
    """One session: stream ``clip`` at real time when ``start`` fires; time the spoken reply."""
    async with connect(url, max_size=None) as ws:
        await _recv(ws)  # session.created
        await start.wait()
        marks: dict = {}

        async def send():
            t0 = time.perf_counter()
            for i in range(0, len(clip), 960):  # 40 ms appends, paced like a microphone
                await asyncio.sleep(max(0.0, t0 + i / RATE - time.perf_counter()))
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(clip[i:i + 960].tobytes()).decode()}))
                if i <= speech_done_at < i + 960:
                    marks["eos"] = time.perf_counter()

        sender = asyncio.create_task(send())
        pcm, t_first, late, text = [], None, 0, []
        while True:
            ev = await _recv(ws)
            kind = ev["type"]
            if kind in ("response.output_audio.delta", "response.audio.delta"):
                x = np.frombuffer(base64.b64decode(ev["delta"]), "<i2")
                if t_first is None:
                    t_first = ev["_t"]
                elif ev["_t"] > t_first + jitter_s + sum(map(len, pcm)) / RATE:
                    late += 1
                pcm.append(x)
            elif kind in ("response.output_audio_transcript.delta", "response.audio_transcript.delta",
                          "response.output_text.delta", "response.text.delta"):
                text.append(ev["delta"])
            elif kind == "response.done":
                break
            elif kind == "error":
                raise RuntimeError(ev["error"])
        await sender
    audio = np.concatenate(pcm) if pcm else np.zeros(0, "<i2")
    return {"first_audio_s": None if t_first is None else t_first - marks["eos"], "underruns": late,
            "audio_s": len(audio) / RATE, "pcm": audio, "text": "".join(text), "t_end": time.perf_counter()}


async def round_of(url: str, n: int, clip, speech_done_at: int, jitter_s: float) -> list[dict]:
    start = asyncio.Event()
    async def one():
        try:
            return await voice_session(url, clip, speech_done_at, start, jitter_s)
        except InvalidStatus as e:  # admission control (503: the server says one more would not keep real time)
            return {"refused": e.response.status_code}

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await asyncio.sleep(0.3 + 0.05 * n)  # every session connected
    t0 = time.perf_counter()
    start.set()
    res = await asyncio.gather(*tasks)
    for r in res:
        if "t_end" in r:
            r["wall_s"] = r["t_end"] - t0
    return res


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


async def ramp(client, args) -> dict:
    speech = hello_24k()
    end = speech_end(speech)
    clip = np.concatenate([np.zeros(RATE // 4, "<i2"), speech[:end], np.zeros(RATE, "<i2")])
    cfg = ServerConfig(port=0, max_sessions=args.max_sessions + 1, rate_limit=0, max_sessions_per_ip=0,
                       defaults=SessionOptions(max_new_tokens=args.max_new_tokens, max_speech_s=args.speech_s,
                                               seed=0, window="auto", block_sparse_dit=args.block_sparse_dit))
    rows, solo, best = [], None, 0
    async with serving(client, cfg) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime"
        if args.warm_up:  # first-use costs (kernel choices, CUDA graph captures, lazy inits) a server pays once
            await round_of(url, 1, clip, RATE // 4 + end, args.jitter_s)
        last_s, stopped = 0.0, None
        for n in range(1, args.max_sessions + 1):
            if n > 1 and time.perf_counter() + 1.5 * last_s > args.deadline:  # (a round takes longer with more sessions)
                stopped = f"--time-budget-s: {n} sessions would not finish in time"
                print(f"  stopped: {stopped}", file=sys.stderr)
                break
            t_round = time.perf_counter()
            res = await round_of(url, n, clip, RATE // 4 + end, args.jitter_s)
            last_s = time.perf_counter() - t_round
            refused = [r["refused"] for r in res if "refused" in r]
            if refused:  # the server's own capacity estimate ends the ramp
                rows.append({"sessions": n, "realtime": False, "refused": len(refused), "status": sorted(set(refused)),
                             "loadavg": os.getloadavg()[0]})
                print(f"  {n:2d} sessions: {len(refused)} refused (HTTP {sorted(set(refused))}: admission control)",
                      file=sys.stderr)
                break
            if solo is None:
                solo = res[0]
            firsts = [r["first_audio_s"] for r in res if r["first_audio_s"] is not None]
            same = all(r["text"] == solo["text"] and len(r["pcm"]) == len(solo["pcm"])
                       and (not len(r["pcm"]) or int(np.abs(r["pcm"].astype(int) - solo["pcm"]).max()) <= 1)
                       for r in res)
            ok = len(firsts) == n and max(firsts) <= args.first_audio_max_s and sum(r["underruns"] for r in res) == 0
            row = {"sessions": n, "realtime": ok, "underruns": sum(r["underruns"] for r in res),
                   "first_audio_p95_s": round(p95(firsts), 3) if firsts else None,
                   "reply_audio_s": round(sum(r["audio_s"] for r in res) / n, 2),
                   "audio_s_per_wall_s": round(sum(r["audio_s"] for r in res) / max(r["wall_s"] for r in res), 3),
                   "batched_equals_solo": same, "loadavg": os.getloadavg()[0]}
            rows.append(row)
            print(f"  {n:2d} sessions: real time {ok!s:5}  underruns {row['underruns']:3d}  first audio p95 "
                  f"{row['first_audio_p95_s']} s  reply {row['reply_audio_s']} s  audio {row['audio_s_per_wall_s']} s/s"
                  f"  equal {same}", file=sys.stderr)
            if ok and best == n - 1:  # the capacity: every N up to it kept real time
                best = n
            elif n >= 8 and not ok:  # past the capacity, on to 8 for throughput_scaling_8
                break
    by = {r["sessions"]: r for r in rows if "refused" not in r}
    scaling = round(by[8]["audio_s_per_wall_s"] / by[1]["audio_s_per_wall_s"], 2) if 8 in by else None
    return {"max_realtime_sessions": best, "throughput_scaling_8": scaling,
            "first_audio_p95_s_1": by[1]["first_audio_p95_s"],
            "first_audio_p95_s_8": by[8]["first_audio_p95_s"] if 8 in by else None,
            "underruns": by[best]["underruns"] if best else None,
            "batched_equals_solo": all(r["batched_equals_solo"] for r in rows if "refused" not in r),
            "stopped": stopped, "ramp": rows}


def build_client(args, layout: str):
    if layout != "inproc":
        from omnistream.runtime.procclient import MultiProcClient

        return MultiProcClient(args.model, layout=layout, max_sessions=args.max_sessions + 1, device=args.device,
                               hang_timeout_s=120, headroom=args.headroom or None)
    from omnistream.checkpoints import load_omni
    from omnistream.runtime.inproc import InProcClient, engine_options

    kw = {"device": args.device} | ({"dtype": args.dtype} if args.dtype != "auto" else {})
    return InProcClient(load_omni(args.model, **kw), max_sessions=args.max_sessions + 1,
                        **engine_options(args.device, args.threads), headroom=args.headroom or None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: a tiny random one written to a temp dir)")
    p.add_argument("--layouts", default="inproc,split", help="comma list of inproc | all-in-one | split | FILE.yaml")
    p.add_argument("--max-sessions", type=int, default=12, help="ramp up to this many sessions (default 12; the "
                   "ramp goes on past the first N that falls behind until 8, for throughput_scaling_8)")
    p.add_argument("--speech-s", type=float, default=3.0, help="reply speech per session, seconds (default 3)")
    p.add_argument("--natural-length", action="store_true", help="let replies end where the (random) model ends "
                   "them: on the tiny checkpoint after ~0.6 s, which measures start-up, not the steady state "
                   "(default: replies forced to --speech-s, OMNISTREAM_FORCE_LENGTH=1)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="reply text tokens (default 24)")
    p.add_argument("--jitter-s", type=float, default=0.3, help="the client's playout buffer (default 0.3 s)")
    p.add_argument("--first-audio-max-s", type=float, default=3.0, help="first audio later than this fails N")
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false", help="skip the untimed solo session "
                   "each layout's server answers before the ramp (by default first-use costs, which a server pays "
                   "once, stay out of the N = 1 row; larger CUDA-graph buckets are still captured at their first use)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-sparse-dit", action="store_true", help="as serve --block-sparse-dit (faster, not bit-equal)")
    p.add_argument("--headroom", type=float, default=0.9, help="in-process admission control as serve's "
                   "--headroom (default 0.9; 0: off, the ramp then runs until a session falls behind)")
    p.add_argument("--threads", type=int, default=None, help="in-process engine's torch threads (default as serve: "
                   "all cores but one on a CPU)")
    p.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16 (in-process layout)")
    p.add_argument("--cuda-graphs", action="store_true", help="Thinker, Talker and DiT steps as CUDA graph replays "
                   "(OMNISTREAM_CUDA_GRAPHS=1, read by every load_omni here and in the stage processes; CUDA only)")
    p.add_argument("--time-budget-s", type=float, default=None, help="start no ramp step that would end past "
                   "this many seconds from the start (estimated from the step before); the JSON says where it "
                   "stopped (the GPU check: a slow model must still leave figures before the step's time limit)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    args.deadline = time.perf_counter() + args.time_budget_s if args.time_budget_s else float("inf")
    import torch

    torch.set_flush_denormal(True)
    if not args.natural_length:  # every load_omni, here and in the stage processes, forces the length
        from omnistream.checkpoints import FORCE_LENGTH_ENV

        os.environ[FORCE_LENGTH_ENV] = "1"
    from omnistream.model.graphs import GRAPHS_ENV, graphs_wanted

    if args.cuda_graphs:
        os.environ[GRAPHS_ENV] = "1"
    out = {"loadavg_start": os.getloadavg()[0], "reply_length": "natural" if args.natural_length else "forced",
           "cuda_graphs": graphs_wanted(args.device),
           "warm_up": args.warm_up}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from omnistream.random_checkpoints import make_tiny

            args.model = str(make_tiny(Path(tmp) / "tiny"))
            out["model"] = "tiny (random weights)"
        else:
            out["model"] = args.model
        for layout in args.layouts.split(","):
            print(f"{layout}:", file=sys.stderr)
            out[layout] = asyncio.run(ramp(build_client(args, layout), args))
    out["loadavg_end"] = os.getloadavg()[0]
    for k in ("max_realtime_sessions", "throughput_scaling_8", "first_audio_p95_s_1", "first_audio_p95_s_8",
              "underruns", "batched_equals_solo"):  # the headline: the first layout's figures
        out[k] = out[args.layouts.split(",")[0]][k]
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
