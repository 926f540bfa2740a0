"""Long sessions through the Thinker: sink + window cache vs growing cache vs window recomputation.

    python benchmarks/long_session.py --json              # the tiny checkpoint (written if missing)
    python benchmarks/long_session.py --json --quick      # contexts up to 8k, a 10-minute session

Measured on this machine in one run (one JSON object on stdout with --json; progress on stderr):

* ``decode[ctx]``: per-token decode time (median of timed steps; mean too for the window, which
  includes the amortized rebases) and KV bytes at contexts 2k, 8k, 32k, 128k for
  (a) ``window``: WindowCache (4 sinks + W=4096), the context prefilled through the model in
      2048-token chunks of random embeddings at TMRoPE audio+video positions (1-min clips of 25 audio
      + 64 video tokens per second), then text-like decode tokens;
  (b) ``dynamic``: the growing DynamicCache, "prefilled" directly with random K/V of the context
      length (decode time depends on the cache size, not on its contents);
  (c) ``recompute``: StreamingLLM's sliding window with re-computation: every new token re-runs the
      last min(ctx, W) tokens from scratch (cost depends only on that length; measured once per length).
* ``decode_flatness``: window time/token at 128k / at 2k (at 2k the window is not yet full);
  ``decode_flatness_full_window``: 128k / 8k (both full).
  ``speedup_vs_recompute``: recompute / window time per token, 4k window, at 8k context.
* ``cache_positions_us``: host-side re-positioning bookkeeping per decode step (full 4k window).
* ``session``: a simulated audio+video session (one hour by default) through the Thinker in 2-s chunks
  of random embeddings (50 audio + 128 video tokens each, TMRoPE audio-in-video positions, the
  media segment closed and reopened every ``--segment-s`` (60) seconds as ``OmniChat`` does with a
  window): ``kv_bytes_max`` (sampled after every chunk), ``kv_bytes_bound`` (the preallocated
  buffers), ``rss_growth_last_50min`` (RSS at the end minus RSS after 10 simulated minutes; it
  includes TMRoPE's own per-token position history, ``tmrope_history_bytes``, which the cache does
  not own), compute seconds per media second, and the largest rotated position
  (``max_rotated_position_with_cutting`` at the top level), plus positions-only replays of the
  same stream as ONE open segment (uniform and ``shift="per_axis"``), where positions grow.

``--device cuda`` runs everything on the GPU (``--kernel on``, the default there, stores pre-RoPE keys
and decodes through the Triton kernel; ``--kernel off`` the rotated-key path). ``--dtype bf16`` for a
GPU run in half precision.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tqdm import tqdm
from transformers import DynamicCache

from omnistream.checkpoints import load_omni
from omnistream.encoders.tmrope import TMRoPE
from omnistream.memory.window_cache import WindowCache, WindowConfig
from omnistream.random_checkpoints import make_tiny

AUDIO_PER_CHUNK = 50  # 25 audio tokens/s, 2-s chunks
PATCH_GRID = (16, 16)  # unmerged 16x16 -> 64 merged video tokens per 1-s temporal patch


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tmrope_bytes(rope: TMRoPE) -> int:
    """Approximate host bytes of TMRoPE's per-token history (positions int64 + the resume list)."""
    return sum(c.numel() for c in rope._chunks) * 8 + rope._pos.numel() * 8 + len(rope._resume) * 8


def av_chunks(rope: TMRoPE, clip_seconds: float | None):
    """Yield (3, n) positions of successive 2-s audio+video chunks: clips of ``clip_seconds``
    separated by one text token, or one open segment when ``clip_seconds`` is None."""
    t = 0.0
    rope.text([1])
    while True:
        pieces = rope.begin_audio_video(1.0) if rope.open_segment is None else []
        pieces += rope.audio_block(AUDIO_PER_CHUNK) + rope.video_patch(PATCH_GRID) + rope.video_patch(PATCH_GRID)
        t += 2.0
        if clip_seconds is not None and t >= clip_seconds:
            pieces += rope.end() + rope.text([1])
            t = 0.0
        yield torch.cat([p.pos for p in pieces], dim=1) if pieces else torch.empty(3, 0, dtype=torch.long)


class PosFeed:
    """Hands out positions of a position stream ``n`` at a time."""

    def __init__(self, gen):
        self.gen, self.buf, self.max = gen, torch.empty(3, 0, dtype=torch.long), -1

    def take(self, n):
        while self.buf.shape[1] < n:
            self.buf = torch.cat([self.buf, next(self.gen)], dim=1)
        out, self.buf = self.buf[:, :n], self.buf[:, n:]
        self.max = max(self.max, int(out.max()))
        return out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(step, n, warmup=2):
    for _ in range(warmup):
        step()
    ts = []
    for _ in range(n):
        _sync()
        t0 = time.perf_counter()
        step()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), statistics.fmean(ts)


def randn(*shape):
    return torch.randn(*shape, device=DEV["device"], dtype=DEV["dtype"])


DEV = {"device": "cpu", "dtype": torch.float32, "kernel": False}  # set by main()


def window_config(S, W, **kw):
    return WindowConfig(sink_tokens=S, window_tokens=W, kernel=DEV["kernel"], **kw)


@torch.inference_mode()
def bench_window(lm, rope, contexts, S, W, steps, chunk):
    D = lm.config.hidden_size
    cache = WindowCache(lm.config, window_config(S, W))
    feed = PosFeed(av_chunks(rope, clip_seconds=60))
    res, filled = {}, 0
    bar = tqdm(total=max(contexts), desc="window: prefill", unit="tok", file=sys.stderr)
    for ctx in contexts:
        while filled < ctx:
            n = min(chunk, ctx - filled)
            lm(inputs_embeds=randn(1, n, D), position_ids=cache.cache_positions(feed.take(n)).to(DEV["device"]),
               cache=cache, use_cache=True)
            filled += n
            bar.update(n)
        x, st = randn(1, 1, D), {"p": feed.max + 1}

        def step(x=x, st=st):
            q = cache.cache_positions(torch.full((3, 1), st["p"])).to(DEV["device"])
            lm(inputs_embeds=x, position_ids=q, cache=cache, use_cache=True)
            st["p"] += 1

        med, mean = median_time(step, steps)
        filled += steps + 2
        feed.max = st["p"]
        res[ctx] = {"s_per_token": med, "mean_s_per_token": mean, "kv_bytes": cache.memory_bytes(),
                    "tokens_held": cache.n_cached, "max_rotated_position": cache.max_rotated_position}
    bar.close()
    return res


@torch.inference_mode()
def bench_dynamic(lm, contexts, steps_for):
    D, H = lm.config.hidden_size, lm.config.num_key_value_heads
    hd = getattr(lm.config, "head_dim", None) or D // lm.config.num_attention_heads
    res = {}
    for ctx in tqdm(contexts, desc="dynamic", file=sys.stderr):
        dc = DynamicCache(config=lm.config)
        for li in range(lm.config.num_hidden_layers):
            dc.update(randn(1, H, ctx, hd), randn(1, H, ctx, hd), li)
        x, st = randn(1, 1, D), {"p": ctx}

        def step(x=x, st=st, dc=dc):
            lm(inputs_embeds=x, position_ids=torch.full((3, 1, 1), st["p"], device=x.device), cache=dc,
               use_cache=True)
            st["p"] += 1

        med, _ = median_time(step, steps_for(ctx), warmup=1)
        kv = sum(t.numel() * t.element_size() for layer in dc.layers for t in (layer.keys, layer.values))
        res[ctx] = {"s_per_token": med, "kv_bytes": kv}
        del dc
        gc.collect()
    return res


@torch.inference_mode()
def bench_recompute(lm, contexts, W, steps):
    D, H = lm.config.hidden_size, lm.config.num_key_value_heads
    hd = getattr(lm.config, "head_dim", None) or D // lm.config.num_attention_heads
    L_ = lm.config.num_hidden_layers
    by_len, res = {}, {}
    for ctx in tqdm(contexts, desc="recompute", file=sys.stderr):
        L = min(ctx, W)
        if L not in by_len:
            x, pos = randn(1, L, D), torch.arange(L, device=DEV["device"]).view(1, 1, -1).expand(3, 1, -1)

            def step(x=x, pos=pos):
                lm(inputs_embeds=x, position_ids=pos, use_cache=False)

            by_len[L] = median_time(step, steps, warmup=1)[0]
        res[ctx] = {"s_per_token": by_len[L], "tokens_recomputed": L,
                    "kv_bytes": 2 * L_ * L * H * hd * torch.finfo(DEV["dtype"]).bits // 8}  # transient K/V
    return res


def bench_cache_positions(lm, S, W, n=3000):
    """Host bookkeeping per decode step on a full window (positions only, no forward)."""
    cache = WindowCache(lm.config, window_config(S, W))
    p = 0
    for _ in range(S + W + 10):
        cache.cache_positions(torch.full((3, 1), p))
        cache._plan = None  # no forward follows (layers never initialized)
        p += 1
    t0 = time.perf_counter()
    for _ in range(n):
        cache.cache_positions(torch.full((3, 1), p))
        cache._plan = None
        p += 1
    return (time.perf_counter() - t0) / n * 1e6


def replay_positions(lm, rope, S, W, chunks, clip_seconds, shift):
    cache = WindowCache(lm.config, WindowConfig(sink_tokens=S, window_tokens=W, shift=shift))
    gen = av_chunks(rope, clip_seconds)
    for _ in range(chunks):
        pos = next(gen)
        if pos.shape[1]:
            cache.cache_positions(pos)
            cache._plan = None
    return {"max_rotated_position": cache.max_rotated_position, "min_rotated_position": cache.min_rotated_position,
            "max_original_position": int(rope.positions.max())}


@torch.inference_mode()
def bench_session(lm, rope, S, W, minutes, segment_s=60.0):
    D = lm.config.hidden_size
    cache = WindowCache(lm.config, window_config(S, W))
    gen = av_chunks(rope, clip_seconds=segment_s or None)
    chunks = round(minutes * 30)
    kv_max, rss, hist, tokens, t_compute = 0, {}, {}, 0, 0.0
    gc.collect()
    rss[0], hist[0] = rss_bytes(), tmrope_bytes(rope)
    for c in tqdm(range(chunks), desc="1-h session" if minutes == 60 else "session", unit="chunk", file=sys.stderr):
        pos = next(gen)
        n = pos.shape[1]
        if n:
            t0 = time.perf_counter()
            lm(inputs_embeds=randn(1, n, D), position_ids=cache.cache_positions(pos).to(DEV["device"]), cache=cache,
               use_cache=True)
            _sync()
            t_compute += time.perf_counter() - t0
            tokens += n
        kv_max = max(kv_max, cache.memory_bytes())
        if (c + 1) % 30 == 0:  # every simulated minute
            rope.positions  # noqa: B018 -- compacts TMRoPE's per-piece tensors into one (its own history)
            gc.collect()
            rss[(c + 1) // 30] = rss_bytes()
            hist[(c + 1) // 30] = tmrope_bytes(rope)
    last = max(rss)
    ref_min = 10 if minutes > 10 else 0
    return {
        "minutes": minutes, "segment_s": segment_s, "chunks": chunks, "tokens": tokens,
        "tokens_per_second_media": tokens / (minutes * 60),
        "kv_bytes_max": kv_max, "kv_bytes_bound": cache.memory_bytes(), "tokens_held": cache.n_cached,
        "rss_start_bytes": rss[0], "rss_end_bytes": rss[last],
        f"rss_growth_last_{last - ref_min}min": rss[last] - rss[ref_min],
        "rss_growth_last_50min": rss[last] - rss[ref_min] if last - ref_min == 50 else None,
        "rss_by_minute": {k: rss[k] for k in sorted(rss) if k % 10 == 0 or k == last},
        "tmrope_history_bytes": hist[last],
        "rss_growth_last_50min_minus_tmrope_growth": (
            rss[last] - rss[ref_min] - (hist[last] - hist[ref_min]) if last - ref_min == 50 else None),
        "compute_s_per_media_s": t_compute / (minutes * 60),
        "max_rotated_position": cache.max_rotated_position, "min_rotated_position": cache.min_rotated_position,
        "max_original_position": int(rope.positions.max()),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--model", default=".cache/tiny-omni", help="checkpoint (tiny one written if missing)")
    p.add_argument("--quick", action="store_true", help="contexts 2k/8k, a 10-minute session")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--steps", type=int, default=32, help="timed decode steps (fewer for big DynamicCaches)")
    p.add_argument("--session-minutes", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--segment-s", type=float, default=60.0, help="media segment length of the simulated session")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--kernel", default="auto", choices=["auto", "on", "off"],
                   help="kernel mode of the window cache (auto: on for cuda)")
    p.add_argument("--contexts", default=None, help="comma-separated contexts (default 2k,8k,32k,128k)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == ".cache/tiny-omni" and not Path(args.model, "config.json").exists():
        make_tiny(args.model)
    t_start = time.perf_counter()
    DEV["device"] = torch.device(args.device)
    DEV["dtype"] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    DEV["kernel"] = args.kernel == "on" or (args.kernel == "auto" and DEV["device"].type == "cuda")
    model = load_omni(args.model, talker=False, dtype=DEV["dtype"], device=args.device)
    thinker = model.thinker
    lm = thinker.model.language_model
    if DEV["kernel"]:
        from omnistream.kernels.window_attention import enable_window_attention

        enable_window_attention(lm)
    S, W = args.sinks, args.window
    contexts = [2048, 8192] if args.quick else [2048, 8192, 32768, 131072]
    if args.contexts:
        contexts = [int(c) for c in args.contexts.split(",")]
    minutes = args.session_minutes or (10.0 if args.quick else 60.0)

    def rope():
        return TMRoPE.from_config(thinker.config)

    # first: freed memory of the others would hide RSS growth
    session = bench_session(lm, rope(), S, W, minutes, args.segment_s)
    window = bench_window(lm, rope(), contexts, S, W, 4 * args.steps, chunk=2048)
    dynamic = bench_dynamic(lm, contexts, lambda c: max(6, args.steps * 2048 // c))
    recompute = bench_recompute(lm, contexts, W, steps=4)
    decode = {
        str(c): {"window": window[c], "dynamic": dynamic[c], "recompute": recompute[c]} for c in contexts
    }
    hi, lo = contexts[-1], contexts[0]
    ref_ctx = 8192 if 8192 in contexts else hi
    chunks = round(minutes * 30)
    session["replay_uniform_one_segment"] = replay_positions(lm, rope(), S, W, chunks, None, "uniform")
    session["replay_per_axis_one_segment"] = replay_positions(lm, rope(), S, W, chunks, None, "per_axis")
    out = {
        "device": str(DEV["device"]) + (f" ({torch.cuda.get_device_name()})" if DEV["device"].type == "cuda" else ""),
        "dtype": args.dtype,
        "kernel_mode": DEV["kernel"],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "model": args.model,
        "config": {"sink_tokens": S, "window_tokens": W,
                   "resolved": WindowCache(lm.config, WindowConfig(S, W)).window.__dict__},
        "decode": decode,
        "decode_flatness": window[hi]["s_per_token"] / window[lo]["s_per_token"],
        "decode_flatness_contexts": [lo, hi],
        "decode_flatness_full_window": window[hi]["s_per_token"] / window[ref_ctx]["s_per_token"],
        "dynamic_growth": dynamic[hi]["s_per_token"] / dynamic[lo]["s_per_token"],
        "speedup_vs_recompute": recompute[ref_ctx]["s_per_token"] / window[ref_ctx]["s_per_token"],
        "speedup_vs_recompute_context": ref_ctx,
        "cache_positions_us": bench_cache_positions(lm, S, W),
        "session": session,
        "max_rotated_position_with_cutting": session["max_rotated_position"],
        "max_rotated_position_one_open_segment": session["replay_uniform_one_segment"]["max_rotated_position"],
        "wall_s": time.perf_counter() - t_start,
        "load_average_end": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for c in contexts:
            d = decode[str(c)]
            print(f"ctx {c:>6}: window {d['window']['s_per_token'] * 1e3:7.2f} ms/tok {d['window']['kv_bytes']:>10} B | "
                  f"dynamic {d['dynamic']['s_per_token'] * 1e3:7.2f} ms/tok {d['dynamic']['kv_bytes']:>10} B | "
                  f"recompute {d['recompute']['s_per_token'] * 1e3:7.2f} ms/tok")
        print({k: v for k, v in out.items() if k not in ("decode", "config")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
