"""Sink + sliding-window decode attention: Triton kernel vs torch baselines, as one JSON object.

    python benchmarks/kernel_bench.py --json                       # CUDA if present, else CPU reference
    python benchmarks/kernel_bench.py --json --peak-bw 3.35e12     # e.g. H100 SXM peak bandwidth
    python benchmarks/kernel_bench.py --json --contexts 2048,8192  # subset
    python benchmarks/kernel_bench.py --json --dtypes bf16,fp16 --time-budget-s 90   # the GPU check

On CUDA, per context length N (cache slots = S sinks + W window), one decode step of one layer
(default Qwen2.5-Omni-7B Thinker: 28 q heads, 4 kv heads, D = 128, bf16) is timed for

* ``triton``: ``window_decode_attention`` (M-RoPE applied in-kernel to the un-rotated cache);
* ``sdpa_rope``: torch: rotate the whole cache at its slot positions, then SDPA (what a torch
  implementation of this cache layout has to do every step);
* ``sdpa_prerotated``: SDPA alone on an already-rotated cache (lower bound for a rotated cache);
* ``flex``: FlexAttention over a linear rotated history of length 2N with a sink + window block
  mask (the "keep everything, mask it" alternative), compiled.

Bandwidth counts the bytes each method must move at minimum: the un-rotated K and V of the valid
slots plus slot_pos/valid metadata for triton, K and V for the SDPA/flex variants (the rotation
pass of ``sdpa_rope`` additionally reads and writes K: counted in its own ``bytes``).
``frac_peak`` = achieved bytes/s divided by ``--peak-bw`` (default 4.8e12 B/s, H200 HBM3e).
On CPU only the torch reference (and SDPA) run, at small sizes, so the script is exercised.
Any failing method is recorded under ``errors`` instead of aborting the run; past
``--time-budget-s`` the remaining FlexAttention measurements (the slow ones: compilation) are
skipped and listed under ``skipped``. ``summary`` has one line per (dtype, context): Triton GB/s,
its fraction of peak, and its speedup over each baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnistream.kernels import (
    apply_rope,
    mrope_cos_sin,
    resolve_backend,
    triton_available,
    window_decode_attention,
    window_decode_attention_ref,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench_cuda(fn, warmup: int, reps: int) -> float:
    """Median milliseconds per call (CUDA events; L2 is not flushed: caches >> L2 at long N)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench_cpu(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def make_inputs(B, Hq, Hkv, N, D, S, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = N - S
    q = torch.randn(B, Hq, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(device, dtype)
    # a wrapped ring: sinks at 0..S-1, window slots hold positions S..S+W-1 in rotated order
    shift = W // 3
    win = (torch.arange(W) + shift) % W + S
    pos1 = torch.cat([torch.arange(S), win]).to(torch.int32)
    slot_pos = pos1.view(1, 1, N).expand(B, 3, N).contiguous().to(device)
    q_pos = torch.full((B, 3), S + W, dtype=torch.int32, device=device)
    valid = torch.ones(B, N, dtype=torch.bool, device=device)
    return q, q_pos, k, v, slot_pos, valid


def rec(ms: float, nbytes: int, peak: float, **extra) -> dict:
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {"ms": round(ms, 5), "bytes": int(nbytes), "gbps": round(gbps, 2),
            "frac_peak": round(gbps * 1e9 / peak, 4), **extra}


def bench_context(N: int, dtype, args, device, section, inv_freq, flex, out, deadline) -> dict:
    """Time every method at one cache size; returns the result row (errors go to ``out``)."""
    cuda = device.type == "cuda"
    B, Hq, Hkv, D, S = args.batch, args.heads, args.kv_heads, args.head_dim, args.sinks
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    reps = args.reps if args.reps is not None else (50 if cuda else 3)
    bench = bench_cuda if cuda else bench_cpu
    esz = torch.empty((), dtype=dtype).element_size()
    dname = str(dtype).replace("torch.", "")
    row: dict = {"ctx": N, "dtype": dname}
    q, q_pos, k, v, slot_pos, valid = make_inputs(B, Hq, Hkv, N, D, S, dtype, device)
    kv_bytes = 2 * B * Hkv * N * D * esz
    meta_bytes = B * N * (3 * 4 + 1) + 2 * B * Hq * D * esz
    ref = None
    try:
        ref = window_decode_attention_ref(q, q_pos, k, v, slot_pos, valid, inv_freq, section).float()
    except Exception as e:  # noqa: BLE001 -- recorded, the run goes on
        out["errors"].append({"method": "reference", "ctx": N, "dtype": dname, "error": repr(e)})

    methods = {}
    if cuda and triton_available():
        methods["triton"] = (
            lambda: window_decode_attention(q, q_pos, k, v, slot_pos, valid, inv_freq, section,
                                            backend="triton", num_splits=args.num_splits),
            kv_bytes + meta_bytes,
        )
    elif not cuda:
        methods["reference"] = (
            lambda: window_decode_attention_ref(q, q_pos, k, v, slot_pos, valid, inv_freq, section),
            kv_bytes + meta_bytes,
        )
    cos_q, sin_q = mrope_cos_sin(q_pos[:, :, None], inv_freq, section)

    def sdpa_rope():  # torch on the gathered cache: rotate every key at its slot position, then SDPA
        cos, sin = mrope_cos_sin(slot_pos, inv_freq, section)
        kr = apply_rope(k, cos[:, None], sin[:, None])
        qr = apply_rope(q[:, :, None], cos_q[:, None], sin_q[:, None])
        return F.scaled_dot_product_attention(qr, kr, v, attn_mask=valid[:, None, None, :], enable_gqa=True)[:, :, 0]

    methods["sdpa_rope"] = (sdpa_rope, kv_bytes + 2 * B * Hkv * N * D * esz + meta_bytes)
    cos, sin = mrope_cos_sin(slot_pos, inv_freq, section)
    k_rot = apply_rope(k, cos[:, None], sin[:, None])
    q_rot = apply_rope(q[:, :, None], cos_q[:, None], sin_q[:, None])
    del cos, sin
    methods["sdpa_prerotated"] = (
        lambda: F.scaled_dot_product_attention(q_rot, k_rot, v, enable_gqa=True)[:, :, 0],
        kv_bytes + 2 * B * Hq * D * esz,
    )
    if flex is not None and time.perf_counter() > deadline:
        out["skipped"].append({"method": "flex", "ctx": N, "dtype": dname, "why": "time budget"})
    elif flex is not None:
        try:
            flex_fn, create_block_mask = flex
            L, Wn = 2 * N, N - S  # linear history; the sink + window mask keeps S + W = N of it
            g = torch.Generator(device="cpu").manual_seed(1)
            k_lin = torch.randn(B, Hkv, L, D, generator=g).to(device, dtype)
            v_lin = torch.randn(B, Hkv, L, D, generator=g).to(device, dtype)
            qpos_lin = L - 1

            def sink_window(b, h, q_idx, kv_idx):
                return (kv_idx < S) | ((kv_idx > qpos_lin - Wn) & (kv_idx <= qpos_lin))

            bm = create_block_mask(sink_window, B=None, H=None, Q_LEN=1, KV_LEN=L, device=device)
            qf = q_rot.contiguous()
            methods["flex"] = (
                lambda: flex_fn(qf, k_lin, v_lin, block_mask=bm, enable_gqa=True)[:, :, 0],
                kv_bytes + 2 * B * Hq * D * esz,
            )
        except Exception as e:  # noqa: BLE001
            out["errors"].append({"method": "flex", "ctx": N, "dtype": dname, "error": repr(e)[:500]})

    for name, (fn, nbytes) in methods.items():
        try:
            o = fn()
            extra = {}
            if name in ("triton", "reference", "sdpa_rope") and ref is not None:
                extra["max_abs_diff_vs_ref"] = float((o.float() - ref).abs().max())
            row[name] = rec(bench(fn, warmup, reps), nbytes, args.peak_bw, **extra)
        except Exception as e:  # noqa: BLE001
            out["errors"].append({"method": name, "ctx": N, "dtype": dname, "error": repr(e)[:500],
                                  "where": traceback.format_exc(limit=2)[-500:]})
        finally:
            if cuda:
                torch.cuda.empty_cache()
    fast = row.get("triton") or row.get("reference")
    if fast:
        for base in ("sdpa_rope", "sdpa_prerotated", "flex"):
            if base in row:
                row[f"speedup_vs_{base}"] = round(row[base]["ms"] / fast["ms"], 3)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object (default: also JSON, indented)")
    ap.add_argument("--peak-bw", type=float, default=4.8e12, help="peak memory bandwidth in B/s (H200: 4.8e12)")
    ap.add_argument("--contexts", default=None, help="comma-separated cache sizes N (default 2k..128k on CUDA)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--mrope-section", default="16,24,24")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="one dtype (same as --dtypes X)")
    ap.add_argument("--dtypes", default="bf16", help="comma-separated, e.g. bf16,fp16 (CPU: fp32 only)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compile time)")
    ap.add_argument("--time-budget-s", type=float, default=None, help="skip remaining flex runs past this")
    ap.add_argument("--num-splits", type=int, default=None, help="force the Triton split-K factor")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.time_budget_s if args.time_budget_s else float("inf")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    names = [args.dtype] if args.dtype else [x.strip() for x in args.dtypes.split(",") if x.strip()]
    bad = [x for x in names if x not in DTYPES]
    if bad:
        ap.error(f"unknown dtype(s) {bad}; use {sorted(DTYPES)}")
    dtypes = [DTYPES[x] for x in names] if cuda else [torch.float32]
    D = args.head_dim
    section = [int(x) for x in args.mrope_section.split(",")]
    if sum(section) != D // 2:
        section = [D // 8, 3 * D // 16, D // 2 - D // 8 - 3 * D // 16]
    if args.contexts:
        contexts = [int(x) for x in args.contexts.split(",")]
    else:
        contexts = [2048 << i for i in range(7)] if cuda else [256, 1024]
    inv_freq = (1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))).to(device)

    backend = os.environ.get("OMNISTREAM_KERNELS") or resolve_backend(device)
    out: dict = {
        "benchmark": "window_decode_attention",
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton_available": triton_available(),
        "kernel_backend": backend,
        "config": {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": D,
                   "mrope_section": section, "sinks": args.sinks, "dtypes": [str(d).replace("torch.", "") for d in dtypes],
                   "contexts": contexts, "peak_bw": args.peak_bw},
        "results": [],
        "summary": [],
        "errors": [],
        "skipped": [],
    }
    if triton_available():
        import triton

        out["triton"] = triton.__version__

    flex = None
    if cuda and not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            flex = (torch.compile(flex_attention), create_block_mask)  # dynamic after the 1st shape change
        except Exception as e:  # noqa: BLE001
            out["errors"].append({"method": "flex", "ctx": None, "error": repr(e)})

    for dtype in dtypes:
        for N in contexts:
            try:
                row = bench_context(N, dtype, args, device, section, inv_freq, flex, out, deadline)
            except Exception as e:  # noqa: BLE001 (e.g. OOM while building inputs)
                out["errors"].append({"method": "inputs", "ctx": N, "dtype": str(dtype), "error": repr(e)[:500]})
                continue
            out["results"].append(row)
            fast = row.get("triton") or row.get("reference")
            if fast:
                out["summary"].append(
                    f"{row['dtype']:>8} ctx {N:>6}: {'triton' if 'triton' in row else 'reference'} "
                    f"{fast['ms'] * 1e3:8.1f} us {fast['gbps']:8.1f} GB/s ({100 * fast['frac_peak']:5.1f}% of peak)"
                    + "".join(f" x{row[f'speedup_vs_{b}']:.2f} vs {b}" for b in ("sdpa_rope", "sdpa_prerotated", "flex")
                              if f"speedup_vs_{b}" in row))
            if cuda:
                torch.cuda.empty_cache()
    # the headline: the decode kernel's (Triton on CUDA, else the torch reference) fraction of peak
    # bandwidth at the largest context measured, the best over dtypes (gpu_check.sh's summary key)
    biggest = [r for r in out["results"] if r["ctx"] == max(r2["ctx"] for r2 in out["results"])]
    fracs = [(r.get("triton") or r.get("reference") or {}).get("frac_peak") for r in biggest]
    out["kernel_fraction_of_peak"] = max((f for f in fracs if f is not None), default=None)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
