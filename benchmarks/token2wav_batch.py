"""Token2Wav batched across sessions: DiT window and BigVGAN span time at batch 1, 2, 4, 8.

    python benchmarks/token2wav_batch.py --json                              # tiny checkpoint, CPU
    python benchmarks/token2wav_batch.py --json --model DIR --device cuda    # a real checkpoint

Each of B sessions (its own voice row, seed and codes) has one steady-state job of the DEFAULT
scheme ready -- a DiT window of 108 codes (216 frames, 36 evaluations) and a vocoder span of 112
frames -- and :func:`run_jobs` runs them in one batched call, as a scheduler tick does. Figures:
median seconds per call, per-session cost ratio (batch-B time / B over batch-1 time; 1.0 = no
gain from batching), the largest difference of a batched result from the same job run alone,
and (CPU) the vocoder's time with oneDNN convs, which are faster or slower but not batch-invariant.
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

# benchmarks/kernels.py would shadow the `kernels` package transformers imports: drop this folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from omnistream.checkpoints import load_omni  # noqa: E402
from omnistream.model.token2wav import DEFAULT, StreamingToken2Wav  # noqa: E402
from omnistream.model.token2wav_jobs import DiTJob, VocoderJob, run_jobs  # noqa: E402
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


def timed(jobs, repeat: int, device: str) -> tuple[float, list]:
    """Median wall time of run_jobs(jobs) over ``repeat`` calls (after one warm-up) and its results."""
    out = run_jobs(jobs)
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = run_jobs(jobs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


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
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--model", default=".cache/tiny-omni", help="checkpoint (the tiny one is written if missing)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per batch size (median; default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    args = p.parse_args()
    if args.repeat < 1 or args.threads < 1:
        p.error("--repeat and --threads must be >= 1")
    torch.set_flush_denormal(True)  # as the CLI does: denormals make CPU runs erratic
    torch.set_num_threads(args.threads)
    if args.model == ".cache/tiny-omni" and not Path(args.model, "config.json").exists():
        make_tiny(args.model)
    ck = load_omni(args.model, device=args.device)
    dits, vocs = steady_jobs(ck, max(BATCHES), args.device)
    alone_dit = [run_jobs([j])[0] for j in dits]
    alone_voc = [run_jobs([j])[0] for j in vocs]

    out = {"model": args.model, "device": args.device, "threads": torch.get_num_threads(),
           "dit_window_frames": dits[0].noise.shape[1], "vocoder_span_frames": vocs[0].mel.shape[2],
           "dit_s": {}, "vocoder_s": {}, "vocoder_onednn_s": {}, "max_abs_diff_vs_alone": 0.0}
    for b in BATCHES:
        t_dit, mel = timed(dits[:b], args.repeat, args.device)
        t_voc, wav = timed(vocs[:b], args.repeat, args.device)
        out["dit_s"][b], out["vocoder_s"][b] = round(t_dit, 5), round(t_voc, 5)
        if args.device == "cpu":
            out["vocoder_onednn_s"][b] = round(onednn_vocoder_s(ck, vocs[:b], args.repeat), 5)
        diffs = [(x - y).abs().max().item() for x, y in zip(mel + wav, alone_dit[:b] + alone_voc[:b])]
        out["max_abs_diff_vs_alone"] = max(out["max_abs_diff_vs_alone"], *diffs)
    last = BATCHES[-1]
    for kind in ("dit", "vocoder"):
        t = out[f"{kind}_s"]
        out[f"{kind}_per_session_ratio_b{last}"] = round(t[last] / last / t[1], 3)
    out["loadavg"] = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
