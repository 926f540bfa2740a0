"""Token2Wav batched across sessions: DiT window and BigVGAN span time at batch 1, 2, 4, 8.

    python benchmarks/token2wav_batch.py --json                              # tiny checkpoint, CPU
    python benchmarks/token2wav_batch.py --json --model DIR --device cuda    # a real checkpoint
    git show REV:omnistream/model/token2wav_jobs.py > /tmp/old_jobs.py       # before/after in one run:
    python benchmarks/token2wav_batch.py --json --baseline /tmp/old_jobs.py

Each of B sessions (its own voice row, seed and codes) has one steady-state job of the DEFAULT
scheme ready -- a DiT window of 108 codes (216 frames, 36 evaluations) and a vocoder span of 112
frames -- and :func:`run_jobs` runs them in one batched call, as a scheduler tick does. Figures per
variant ("exact": the default path; "block_sparse": the DiT option; "baseline": the runners of the
``--baseline`` file on the same jobs): best-of-``--repeat`` ms per call and per session, the
per-session cost ratio (batch-B time / B over batch-1 time; 1.0 = no gain from batching), and
``realtime_sessions_per_core`` (one steady chunk is 36 codes = 0.72 s of speech: 0.72 s over a
session's DiT + vocoder ms at that batch size). Also the largest difference of a batched result
from the same job run alone, of each variant from the exact path, and (CPU) the vocoder's time with
oneDNN convs, which are faster but not batch-invariant. Other work on the machine slows every
figure: the load average is printed; repeat and take the minimum.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

# benchmarks/kernels.py would shadow the `kernels` package transformers imports: drop this folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from omnistream.checkpoints import load_omni  # noqa: E402
from omnistream.model.token2wav import DEFAULT, StreamingToken2Wav  # noqa: E402
from omnistream.model.token2wav_graphs import DiTGraphs, disable_dit_graphs  # noqa: E402
from omnistream.model.token2wav_jobs import GRAPHS_ATTR, DiTJob, VocoderJob, run_jobs  # noqa: E402
from omnistream.random_checkpoints import make_tiny  # noqa: E402

BATCHES = (1, 2, 4, 8)


def steady_jobs(ck, n: int, device: str) -> tuple[list[DiTJob], list[VocoderJob]]:
    """n sessions' steady-state DiT window (chunk [60, 96), window [12, 120) codes) and vocoder span."""
    voices = list(ck.voices.values())
    dits, vocs = [], []
    for k in range(n):
        v = voices[k % len(voices)]
        st = StreamingToken2Wav.from_config(ck.token2wav, v["cond"] * (1 + 0.1 * k), v["ref_mel"], DEFAULT, seed=k)
        g = torch.Generator().manual_seed(100 + k)
        code = torch.randint(0, st.num_codes, (1, 108), generator=g).to(device)  # (1, 108)
        noise = torch.randn(1, 216, st.mel_dim, generator=g).to(device)  # (1, 216, 80)
        dits.append(DiTJob(st, 60, 96, 12, code, noise))
        span = DEFAULT.chunk_codes * 2 + 2 * DEFAULT.vocoder_context_frames  # 112 frames
        mel = (torch.randn(1, st.mel_dim, span, generator=g) - 4).to(device)  # (1, 80, 112)
        vocs.append(VocoderJob(st, 0, span, 0, span, mel))
    return dits, vocs


def timed(run, jobs, repeat: int, device: str) -> tuple[float, list]:
    """Best wall time of ``run(jobs)`` over ``repeat`` calls (after one warm-up) and its results."""
    out = run(jobs)
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = run(jobs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times), out


@torch.no_grad()
def onednn_vocoder_s(ck, jobs, repeat: int) -> float:
    """The same spans through BigVGAN with CPU oneDNN convs (not batch-invariant): what the
    batch-invariant conv backend of :func:`run_jobs` costs or saves."""
    mel = torch.cat([j.mel for j in jobs])  # (B, 80, F)
    voc = ck.token2wav.code2wav_bigvgan_model
    voc(mel)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        voc(mel)
        times.append(time.perf_counter() - t)
    return min(times)


def load_baseline(path: str):
    """Another version of token2wav_jobs.py (e.g. ``git show REV:...``) whose ``run_jobs`` runs today's
    job objects: its job classes are replaced by today's (the fields it reads are the same)."""
    spec = importlib.util.spec_from_file_location("token2wav_jobs_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    mod.DiTJob, mod.VocoderJob = DiTJob, VocoderJob
    return mod.run_jobs


def graphed(ck, max_rows: int):
    """``run_jobs`` with the DiT's windows through :class:`DiTGraphs` (captured at the first call of
    each batch bucket: the warm-up call of :func:`timed`)."""
    dit = ck.token2wav.code2wav_dit_model
    graphs = DiTGraphs(dit, max_rows=max_rows)

    def run(jobs):
        setattr(dit, GRAPHS_ATTR, graphs)
        try:
            return run_jobs(jobs)
        finally:
            delattr(dit, GRAPHS_ATTR)

    return run


def with_block_sparse(jobs: list, on: bool) -> list:
    for j in jobs:
        j.stream.block_sparse = on
    return jobs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--model", default=".cache/tiny-omni", help="checkpoint (the tiny one is written if missing)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per batch size (best of; default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    p.add_argument("--batches", default="1,2,4,8", help="comma list of batch sizes (default 1,2,4,8)")
    p.add_argument("--baseline", help="an older token2wav_jobs.py to time side by side (see above)")
    p.add_argument("--graphs", action="store_true", help="also time the DiT through model/token2wav_graphs.py "
                   "(always on CUDA, where a window is one graph replay; on CPU its static function runs eagerly)")
    args = p.parse_args()
    try:
        batches = sorted({int(b) for b in args.batches.split(",")})
    except ValueError:
        p.error(f"--batches must be a comma list of ints, got {args.batches!r}")
    if args.repeat < 1 or args.threads < 1 or batches[0] < 1:
        p.error("--repeat, --threads and --batches must be >= 1")
    if args.baseline and not Path(args.baseline).is_file():
        p.error(f"--baseline {args.baseline}: no such file")
    torch.set_flush_denormal(True)  # as the CLI does: denormals make CPU runs erratic
    torch.set_num_threads(args.threads)
    if args.model == ".cache/tiny-omni" and not Path(args.model, "config.json").exists():
        make_tiny(args.model)
    ck = load_omni(args.model, device=args.device)
    disable_dit_graphs(ck.token2wav)  # ("exact" is the eager path, whatever OMNISTREAM_CUDA_GRAPHS says)
    dits, vocs = steady_jobs(ck, max(batches), args.device)
    alone_dit = [run_jobs([j])[0] for j in dits]
    alone_voc = [run_jobs([j])[0] for j in vocs]
    variants = {"exact": (run_jobs, False), "block_sparse": (run_jobs, True)}
    if args.baseline:
        variants["baseline"] = (load_baseline(args.baseline), False)
    if args.graphs or args.device.startswith("cuda"):
        variants["graphs"] = (graphed(ck, max(batches)), False)

    chunk_s = DEFAULT.chunk_codes / 50  # a steady chunk's speech: 36 codes at 50 Hz
    out = {"model": args.model, "device": args.device, "threads": torch.get_num_threads(),
           "dit_window_frames": dits[0].noise.shape[1], "vocoder_span_frames": vocs[0].mel.shape[2],
           "loadavg_before": os.getloadavg()[0], "dit_ms": {}, "vocoder_ms": {}, "per_session_ms": {},
           "realtime_sessions_per_core": {}, "max_abs_diff_vs_alone": 0.0, "max_abs_diff_vs_exact": {}}
    for name, (run, sparse) in variants.items():
        with_block_sparse(dits, sparse)
        dit_ms, voc_ms, per, rt, diff_exact = {}, {}, {}, {}, 0.0
        for b in batches:
            t_dit, mel = timed(run, dits[:b], args.repeat, args.device)
            t_voc, wav = timed(run, vocs[:b], args.repeat, args.device)
            dit_ms[b], voc_ms[b] = round(1e3 * t_dit, 2), round(1e3 * t_voc, 2)
            per[b] = round(1e3 * (t_dit + t_voc) / b, 2)
            rt[b] = round(chunk_s / ((t_dit + t_voc) / b), 2)
            got = mel + wav
            if name == "exact":
                diffs = [(x - y).abs().max().item() for x, y in zip(got, alone_dit[:b] + alone_voc[:b])]
                out["max_abs_diff_vs_alone"] = max(out["max_abs_diff_vs_alone"], *diffs)
            else:
                with_block_sparse(dits, False)
                exact = run_jobs(dits[:b]) + run_jobs(vocs[:b])
                with_block_sparse(dits, sparse)
                diff_exact = max(diff_exact, *[(x - y).abs().max().item() for x, y in zip(got, exact)])
        out["dit_ms"][name], out["vocoder_ms"][name], out["per_session_ms"][name] = dit_ms, voc_ms, per
        out["realtime_sessions_per_core"][name] = rt
        if name != "exact":
            out["max_abs_diff_vs_exact"][name] = diff_exact
        last = batches[-1]
        for kind, t in (("dit", dit_ms), ("vocoder", voc_ms)):
            out.setdefault(f"{kind}_per_session_ratio_b{last}", {})[name] = round(t[last] / last / t[batches[0]], 3)
    with_block_sparse(dits, False)
    if args.device == "cpu":
        out["vocoder_onednn_ms"] = {b: round(1e3 * onednn_vocoder_s(ck, vocs[:b], args.repeat), 2) for b in batches}
    out["loadavg_after"] = os.getloadavg()[0]
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
