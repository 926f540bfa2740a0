"""Per-step latency of the JanusVLN agent: dual implicit memory vs re-encoding the history.

    python -m benchmarks.nav_step --json                 # tiny JanusVLN checkpoint (written to a temp dir)
    python -m benchmarks.nav_step --json --model DIR     # a real JanusVLN checkpoint (--device cuda)

(``-m``: run as a file, the script's folder comes first on ``sys.path`` and ``benchmarks/kernels.py``
hides the ``kernels`` package transformers imports.)

Measured in one run (one JSON object on stdout with --json; progress on stderr), same checkpoint,
same frames (seeded random RGB frames of ``--frame`` size, 224x224 by default: 261 VGGT tokens and
64 visual tokens per frame), same greedy decoding of ``--max-new-tokens`` tokens in every variant (4
by default: a trained JanusVLN answers with one action name, about 3 tokens + EOS; the random tiny
model never emits EOS, so it always decodes all of them; JanusVLN's cap is 24). CPU runs use
``--threads`` (1) threads, the setting least disturbed by a loaded machine.

* ``dual``: :class:`JanusAgent` with the dual memory (initial 8 + recent 48 frames); one episode of
  ``--steps`` (500, the VLN-CE step limit) steps. ``step_ms_at_60`` / ``step_ms_at_500``: median step
  time over steps 56-75 (the memory has just filled) / the last 20 steps;
  ``step_time_ratio_500_vs_60`` their ratio (goal <= 1.2: the cost must not grow). ``breakdown_ms``:
  spatial (VGGT step), prefill (vision tower + one LLM forward of the frame and the instruction
  suffix), decode.
* ``reencode_8`` / ``reencode_32``: the memory-less ablation of JanusVLN (``reencode=N``): every step
  runs VGGT (causal, all frames at once), the vision tower and the LLM prefill over the current frame
  and N history frames sampled as JanusVLN samples them. Timed over ``--reencode-steps`` (5) steps
  once the history holds more than N frames (the history frames are preprocessed, not run, to get
  there: the step cost depends only on how many frames it re-encodes).
* ``speedup_vs_reencode_8`` / ``speedup_vs_reencode_32``: re-encode step time / the median of the 40
  dual-memory steps (memory full) timed right before and right after it, so that a change of machine
  load between the two measurements does not pass for a speedup (JanusVLN's ablation: 48 cached
  frames 195 ms vs re-running 32 frames 1549 ms; goal >= 8).
* ``memory_bytes_max``: the dual memory's K/V bytes, maximum over the episode (sampled every step)
  and the extra steps, with ``memory_bytes_at_60`` and ``memory_bytes_at_500`` (equal: allocated once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from omnistream.memory.dual import MemoryConfig
from omnistream.navigation.janus import JanusAgent


class _Instr:
    instruction_text = "walk past the red sofa and stop at the door on your left"


class _Episode:
    episode_id = "bench"
    instruction = _Instr()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _frames(n: int, hw: tuple[int, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield rng.integers(0, 256, (hw[0], hw[1], 3), dtype=np.uint8)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed_step(agent: JanusAgent, frame, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    agent.step(frame)
    _sync(device)
    return time.perf_counter() - t0


def run_dual(agent: JanusAgent, steps: int, hw, device) -> dict:
    agent.reset(_Episode())
    times, parts, sizes = [], [], []
    for t, f in enumerate(_frames(steps, hw)):
        times.append(_timed_step(agent, f, device))
        parts.append(dict(agent.timings))
        sizes.append(agent.memory_bytes())
        if (t + 1) % 50 == 0:
            _log(f"dual: step {t + 1}/{steps}, {1e3 * times[-1]:.1f} ms, memory {sizes[-1] / 2**20:.2f} MiB")
    early = slice(55, 75)  # steps 56-75: the memory has just filled (56 frames)
    last = slice(steps - 20, steps)  # the last 20 steps
    med = lambda s: 1e3 * statistics.median(times[s])
    return {
        "step_ms_at_60": med(early),
        "step_ms_at_500": med(last),
        "step_time_ratio_500_vs_60": med(last) / med(early),
        "breakdown_ms_at_60": {
            k: 1e3 * statistics.median(p[k] for p in parts[early]) for k in ("spatial_s", "prefill_s", "decode_s")
        },
        "memory_bytes_max": max(sizes),
        "memory_bytes_at_60": sizes[59],
        "memory_bytes_at_500": sizes[-1],
        "kept_frames": len(agent.memory.semantic.kv.kept_frames()),
        "semantic_tokens_held": agent.memory.semantic.kv.held_tokens,
        "_last_ms": [1e3 * x for x in times[last]],
    }


def run_reencode(agent: JanusAgent, n_steps: int, hw, device) -> float:
    """Median step time once the history holds more than ``agent.reencode`` frames."""
    agent.reset(_Episode())
    frames = list(_frames(agent.reencode + 1 + n_steps, hw, seed=1))
    with torch.inference_mode():
        for f in frames[: agent.reencode + 1]:  # history: preprocessed only (its cost is not what we time)
            agent._frames.append(agent._prepare(f))
    times = [_timed_step(agent, f, device) for f in frames[agent.reencode + 1 :]]
    _log(f"reencode {agent.reencode}: {1e3 * statistics.median(times):.1f} ms/step")
    return 1e3 * statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="JanusVLN checkpoint directory (default: a tiny one, written to a temp dir)")
    ap.add_argument("--vggt", help="facebook/VGGT-1B weights when the checkpoint has none")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--reencode-steps", type=int, default=5)
    ap.add_argument("--frame", default="224x224", help="HxW of the simulator frames")
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: least sensitive to a loaded machine)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 95:
        ap.error("--steps must be >= 95")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    hw = tuple(int(x) for x in args.frame.lower().split("x"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:  # removed on every exit path, Ctrl-C included
        res = _measure(args, hw, dtype, tmp)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return res


def _measure(args, hw, dtype, tmp: str) -> dict:
    model_dir = args.model
    kw = {"vggt_path": args.vggt, "device": args.device, "dtype": dtype, "max_new_tokens": args.max_new_tokens}
    if model_dir is None:
        from omnistream.navigation.tiny import TINY_VGGT, make_tiny_janus

        # JanusVLN's input width (644) would make a 224-px frame 644 px wide: the tiny checkpoint is fed
        # frames at their own width (rounded to the patch size), as its aggregator's img_size says
        width = hw[1] // 14 * 14
        model_dir = make_tiny_janus(Path(tmp) / "tiny-janus", vggt={**TINY_VGGT, "img_size": width})
        kw["vggt_width"] = width
    dual = JanusAgent.from_pretrained(model_dir, memory=MemoryConfig(8, 48), **kw)
    res = {"model": args.model or "tiny", "device": args.device, "dtype": args.dtype, "frame": list(hw)}
    res["dual"] = run_dual(dual, args.steps, hw, args.device)
    kv = dual.memory.semantic.kv
    res["visual_tokens_per_frame"] = kv.frame_tokens - 2
    res["vggt_tokens_per_frame"] = dual.memory.spatial.frame_tokens
    # the baselines, each followed by 20 more dual-memory steps (the same episode, memory full): every
    # speedup compares step times measured next to each other, so a change in machine load between
    # the two does not show up as a speedup
    dual_near = res["dual"].pop("_last_ms")
    more = _frames(40, hw, seed=2)
    for n in (8, 32):
        agent = JanusAgent.from_pretrained(model_dir, reencode=n, **kw)
        ms = run_reencode(agent, args.reencode_steps, hw, args.device)
        del agent
        after = [1e3 * _timed_step(dual, next(more), args.device) for _ in range(20)]
        ref = statistics.median(dual_near + after)
        res[f"reencode_{n}_step_ms"] = ms
        res[f"dual_step_ms_next_to_reencode_{n}"] = ref
        res[f"speedup_vs_reencode_{n}"] = ms / ref
        dual_near = after
    res["memory_bytes_after_extra_steps"] = dual.memory_bytes()
    res["speedup_vs_reencode_32"] = res.pop("speedup_vs_reencode_32")
    res["step_time_ratio_500_vs_60"] = res["dual"]["step_time_ratio_500_vs_60"]
    res["memory_bytes_max"] = max(res["dual"]["memory_bytes_max"], res["memory_bytes_after_extra_steps"])
    return res


if __name__ == "__main__":
    main()
