"""Per-token step cost of the batched Thinker and Talker decode, by batch size: where a GPU's time goes.

    python benchmarks/decode_steps.py --json                                   # tiny checkpoint, CPU
    python benchmarks/decode_steps.py --json --model DIR --device cuda --dtype bf16 --batches 1,4,8,16

For B = 1, 2, 4, ... sessions with the same prompt (shapes are what cost time), one tick runs the
engine's batched calls: ``step_tokens`` (one Thinker decode forward for B rows) and ``step_talkers``
(one Talker forward for B rows, each row sampled as the engine samples it). Replies are forced to
their length (benchmarks/first_packet.py's ``force_length``), so random weights cannot end them.

Keys per B: ``thinker_step_ms`` / ``talker_step_ms`` (wall time of one call, median over the timed
ticks, synchronised), and on CUDA ``thinker_gpu_ms`` / ``talker_gpu_ms`` (the kernels' device time
per call, from torch.profiler; ``*_kernels``: kernels launched per call): a wall time far above the
device time means the step is bound by kernel launches and Python, which CUDA graphs remove.
``--talker both`` (default) measures the Talker step twice in one run: ``eager`` (transformers'
forward over BatchCache) and ``static`` (omnistream.model.graphs: static rows, replayed as CUDA
graphs on CUDA); ``talker_static_speedup`` is the ratio per batch size.
The same two modes apply to the Thinker on window caches (``thinker_window_step_ms``: B
``window_thinker`` sessions, rotated layout, whose caches are rows of one RowPool): ``eager`` is
``step_tokens``' PoolBatch forward, ``static`` the static step of omnistream.model.thinker_graphs
(CUDA graphs on CUDA); ``thinker_static_speedup`` is the ratio per batch size. ``thinker_step_ms``
(growing caches, PoolBatch over a growable RowPool) has no static path: it is the same in both modes.
``talker_budget_ms`` is one codec token of speech (20 ms: 50 codes per second);
``max_sessions_talker_realtime`` is the largest B whose Talker step fits that budget (the Thinker,
Token2Wav and the encoders share the same GPU on top of it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path = [q for q in sys.path if Path(q or ".").resolve() != ROOT / "benchmarks"]  # would shadow `kernels`
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from first_packet import force_length  # noqa: E402

from omnistream.checkpoints import check_device, load_omni  # noqa: E402
from omnistream.engine.turns import SpeechRates  # noqa: E402
from omnistream.memory.window_cache import WindowConfig  # noqa: E402
from omnistream.model.graphs import disable_talker_graphs, enable_talker_graphs  # noqa: E402
from omnistream.model.talker import StreamingTalker, TalkerConfig, step_talkers  # noqa: E402
from omnistream.model.thinker import StreamingThinker, step_tokens, window_thinker  # noqa: E402
from omnistream.model.thinker_graphs import disable_thinker_graphs, enable_thinker_graphs  # noqa: E402
from omnistream.random_checkpoints import make_tiny  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, n: int, profile: bool, table: list | None = None) -> tuple[float, tuple | None]:
    """(median wall ms of ``fn()`` over n calls, (CUDA kernel ms, kernels) per call or None); with
    ``table``, appends the profiler's table of the ops that took the most host time."""
    walls = []
    for _ in range(n):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        walls.append((time.perf_counter() - t0) * 1e3)
    gpu = None
    if profile and dev.type == "cuda":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                fn()
            _sync(dev)
        kernels = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu = (sum(e.device_time_total for e in kernels) / 1e3 / 3, len(kernels) / 3)  # ms, kernels per call
        if table is not None:
            table.append(p.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    return statistics.median(walls), gpu


def measure(ck, batch: int, prompt: list[int], steps: int, profile: bool, table: list | None = None,
            window: WindowConfig | None = None) -> dict:
    dev = ck.thinker.device
    # the Thinker: B sessions that prefilled the same prompt, stepped together
    ths = [StreamingThinker(ck.thinker) for _ in range(batch)]
    for th in ths:
        th.append_text(prompt)
    nxt = [0]

    def thinker_tick():
        toks = [int(torch.argmax(th.next_token_logits())) for th in ths]  # the engine's per-row pick
        step_tokens(ths, toks)
        nxt[0] += 1

    thinker_tick()  # warm-up (first batched forward)
    th_ms, th_gpu = timed(thinker_tick, dev, steps, profile, table)

    # the Thinker on window caches (rows of one RowPool): PoolBatch, or the static step when enabled
    wths = [window_thinker(ck.thinker, window or WindowConfig(kernel=False)) for _ in range(batch)]
    for th in wths:
        th.append_text(prompt)

    def window_tick():
        step_tokens(wths, [int(torch.argmax(th.next_token_logits())) for th in wths])

    window_tick()  # warm-up (the static mode captures its bucket's graph here)
    tw_ms, tw_gpu = timed(window_tick, dev, steps, profile)
    for th in wths:
        th.cache.release_row()

    # the Talker: prompt rows + the reply's Thinker steps of one solo session, fed to B talkers
    st = StreamingThinker(ck.thinker, record=True)
    st.append_text(prompt)
    rows = (*st.records(0), st.rope.positions.clone(), st.rope.next_position)
    reply = list(st.decode(steps + 8, [], do_sample=False))
    tks = [StreamingTalker.from_checkpoint(ck, config=TalkerConfig(seed=b, max_new_tokens=10_000)) for b in range(batch)]
    for tk in tks:
        tk.feed_prompt(*rows)
    fed = [0]

    def talker_tick():
        for tk in tks:
            if not tk.ready() and fed[0] < len(reply):
                tk.feed(reply[fed[0]])
        fed[0] += 1
        step_talkers([tk for tk in tks if tk.ready()])

    for _ in range(2):  # reply prefill (per session) and the first batched step
        talker_tick()
    tk_ms, tk_gpu = timed(talker_tick, dev, min(steps, len(reply) - fed[0] - 3 - 1), profile, table)
    return {"batch": batch, "thinker_step_ms": round(th_ms, 3), "thinker_gpu_ms": th_gpu and round(th_gpu[0], 3),
            "thinker_kernels": th_gpu and th_gpu[1], "thinker_window_step_ms": round(tw_ms, 3),
            "thinker_window_gpu_ms": tw_gpu and round(tw_gpu[0], 3), "thinker_window_kernels": tw_gpu and tw_gpu[1],
            "talker_step_ms": round(tk_ms, 3),
            "talker_gpu_ms": tk_gpu and round(tk_gpu[0], 3), "talker_kernels": tk_gpu and tk_gpu[1],
            "thinker_ms_per_session": round(th_ms / batch, 3), "talker_ms_per_session": round(tk_ms / batch, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=".cache/tiny-omni", help="checkpoint (the tiny one is written if missing)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batches", default="1,2,4,8", help="comma list of batch sizes (default 1,2,4,8)")
    p.add_argument("--steps", type=int, default=12, help="timed ticks per batch size (default 12)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length per session (default 128)")
    p.add_argument("--no-profile", action="store_true", help="skip the CUDA kernel-time profile")
    p.add_argument("--talker", default="both", choices=["both", "eager", "static"],
                   help="Talker and window-Thinker steps: eager (BatchCache / PoolBatch), static (static rows; "
                        "CUDA graphs on CUDA), both side by side")
    p.add_argument("--window", type=int, default=1024, help="window tokens of the window-Thinker sessions (default 1024)")
    p.add_argument("--table", metavar="FILE", help="write the profiler's op tables (Thinker, Talker) at the first batch size")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    args = p.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",")]
        if min(batches) < 1 or args.steps < 2 or args.prompt_tokens < 1 or args.window < 1:
            raise ValueError
    except ValueError:
        p.error("--batches must be positive integers (1,2,4), --steps >= 2, --prompt-tokens >= 1, --window >= 1")
    window = WindowConfig(sink_tokens=4, window_tokens=args.window, kernel=False)  # rotated layout: static-capable
    device = check_device(args.device)
    if args.model == ".cache/tiny-omni" and not Path(args.model).exists():
        make_tiny(args.model)
    ck = load_omni(args.model, device=device, dtype=args.dtype)
    force_length(ck)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, min(ck.tokenizer.vocab_size, 30_000), (args.prompt_tokens,), generator=g).tolist()
    budget = 1e3 / SpeechRates.from_checkpoint(ck).codes_per_second
    results = []
    modes = ["eager", "static"] if args.talker == "both" else [args.talker]
    for i, (mode, b) in enumerate((m, b) for m in modes for b in batches):
        disable_talker_graphs(ck.talker)
        disable_thinker_graphs(ck.thinker)
        if mode == "static":
            enable_talker_graphs(ck.talker, rows=max(batches))
            enable_thinker_graphs(ck.thinker)
        tables = [] if args.table and i == 0 else None
        results.append({"talker": mode, **measure(ck, b, prompt, args.steps, not args.no_profile, tables, window)})
        if tables:
            named = zip(("Thinker", "Talker"), tables)
            Path(args.table).write_text("\n\n".join(f"{name} step, batch {b}\n{t}" for name, t in named))
        if not args.json:
            print(json.dumps(results[-1]), file=sys.stderr)
    fits = {m: max([r["batch"] for r in results if r["talker"] == m and r["talker_step_ms"] <= budget], default=0)
            for m in modes}
    ratio = {r["batch"]: r["talker_step_ms"] for r in results if r["talker"] == "eager"}
    th_ratio = {r["batch"]: r["thinker_window_step_ms"] for r in results if r["talker"] == "eager"}
    out = {"benchmark": "decode_steps", "model": args.model, "device": str(ck.thinker.device),
           "dtype": str(ck.thinker.dtype), "torch": torch.__version__, "prompt_tokens": args.prompt_tokens,
           "talker_budget_ms": budget, "max_sessions_talker_realtime": max(fits.values()),
           "max_sessions_talker_realtime_by_mode": fits,
           "talker_static_speedup": {r["batch"]: round(ratio[r["batch"]] / r["talker_step_ms"], 2) for r in results
                                     if r["talker"] == "static" and r["batch"] in ratio},
           "thinker_static_speedup": {r["batch"]: round(th_ratio[r["batch"]] / r["thinker_window_step_ms"], 2)
                                      for r in results if r["talker"] == "static" and r["batch"] in th_ratio},
           "window_tokens": args.window,
           "loadavg": os.getloadavg()[0], "results": results}
    print(json.dumps(out, indent=None if args.json else 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
