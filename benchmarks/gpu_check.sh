#!/usr/bin/env bash
# Issue 4 GPU check: the sink + window KV-cache kernels on a CUDA GPU (sized for one H200), < 5 minutes.
#
# Assumptions (a fresh checkout, run from anywhere):
#   * Python >= 3.11 with the project's dependencies (pyproject.toml: transformers 5.x, pytest, tqdm, ...);
#   * a CUDA build of torch and triton:  pip install torch==<the CUDA build present there> triton
#     (keep the machine's own CUDA torch; never let pip swap it for a CPU wheel);
#   * PYTHON=/path/to/python if `python` is not that interpreter.
# What it runs (each step under its own timeout; a failing step does not stop the others):
#   1. pytest tests/test_kernels.py (Triton compiled for the GPU: TRITON_INTERPRET is unset) and the
#      kernel-path tests of tests/test_window_cache.py (-k kernel: the tiny Thinker on CUDA decoding
#      through the Triton kernel vs the growing cache and the rotated-key path, fp32 and bf16);
#   2. benchmarks/kernels.py --json: Triton decode attention vs torch SDPA on the gathered cache
#      (rotate + SDPA, and SDPA on a pre-rotated cache) vs FlexAttention with a sink + window block
#      mask; bf16 and fp16; contexts 2k..128k; GB/s and the fraction of the H200's 4.8 TB/s;
#   3. benchmarks/long_session.py --json --device cuda (window cache in kernel mode, tiny checkpoint,
#      contexts 2k..128k, a 5-minute simulated audio+video session).
# Output: $OUT if set, else ./gpu_check_out: env.txt, pytest.txt, kernels.json, long_session.json,
# summary.txt (also printed). Exit status: the number of failed steps.
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke    # the same steps on CPU with tiny sizes (checks the script)
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUTDIR=${OUT:-gpu_check_out}
mkdir -p "$OUTDIR"
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
unset OMNISTREAM_KERNELS
if [[ $SMOKE == 0 ]]; then
  unset TRITON_INTERPRET  # compile the kernels for the GPU
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to $PY (use --smoke to exercise this script on CPU)" >&2
    exit 2
  fi
fi

failed=0
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "step $name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUTDIR/steps.txt" >&2
  [[ $rc == 0 ]] || failed=$((failed + 1))
}

: > "$OUTDIR/steps.txt"
{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>/dev/null || true
} > "$OUTDIR/env.txt" 2>&1

# 1. tests (CUDA: compiled Triton; smoke: the interpreter, as in CI)
step pytest 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_window_cache.py \
  -k "not test_window_cache or kernel" -rs > "$OUTDIR/pytest.txt" 2>&1
tail -n 5 "$OUTDIR/pytest.txt" >&2

# 2. kernel benchmark
if [[ $SMOKE == 0 ]]; then
  step kernels 120 "$PY" benchmarks/kernels.py --json --dtypes bf16,fp16 --time-budget-s 70 \
    > "$OUTDIR/kernels.json" 2> "$OUTDIR/kernels.err"
else
  step kernels 120 "$PY" benchmarks/kernels.py --json --contexts 256 --reps 1 --warmup 0 \
    > "$OUTDIR/kernels.json" 2> "$OUTDIR/kernels.err"
fi

# 3. long session on the GPU (kernel mode)
if [[ $SMOKE == 0 ]]; then
  step long_session 80 "$PY" benchmarks/long_session.py --json --device cuda --session-minutes 5 \
    > "$OUTDIR/long_session.json" 2> "$OUTDIR/long_session.err"
else
  step long_session 120 "$PY" benchmarks/long_session.py --json --device cpu --kernel on --contexts 512,1024 \
    --window 256 --steps 4 --session-minutes 1 --segment-s 20 \
    > "$OUTDIR/long_session.json" 2> "$OUTDIR/long_session.err"
fi

# summary
"$PY" - "$OUTDIR" > "$OUTDIR/summary.txt" 2>&1 <<'EOF'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
print((d / "env.txt").read_text().strip())
print((d / "steps.txt").read_text().strip())
for line in (d / "pytest.txt").read_text().splitlines():
    if " passed" in line or " failed" in line or "error" in line.lower():
        print("pytest:", line)
try:
    k = json.loads((d / "kernels.json").read_text())
    print(f"kernels on {k['device']} (peak {k['config']['peak_bw'] / 1e12:.1f} TB/s), {k['wall_s']} s:")
    print("\n".join(k["summary"]))
    for e in k["errors"] + k["skipped"]:
        print("  ", e)
except Exception as e:  # noqa: BLE001
    print("kernels.json unreadable:", e)
try:
    s = json.loads((d / "long_session.json").read_text())
    print(f"long_session on {s['device']} kernel_mode={s['kernel_mode']}: decode_flatness "
          f"{s['decode_flatness']:.3f}, speedup_vs_recompute {s['speedup_vs_recompute']:.1f}, "
          f"max_rotated_position_with_cutting {s['max_rotated_position_with_cutting']}")
    for c, r in s["decode"].items():
        print(f"  ctx {c:>6}: window {r['window']['s_per_token'] * 1e3:.3f} ms/tok {r['window']['kv_bytes']} B | "
              f"dynamic {r['dynamic']['s_per_token'] * 1e3:.3f} ms/tok | recompute {r['recompute']['s_per_token'] * 1e3:.3f}")
    ss = s["session"]
    print(f"  session {ss['minutes']} min: kv_bytes_max {ss['kv_bytes_max']} (bound {ss['kv_bytes_bound']}), "
          f"compute {ss['compute_s_per_media_s']:.4f} s per media s")
except Exception as e:  # noqa: BLE001
    print("long_session.json unreadable:", e)
EOF
cat "$OUTDIR/summary.txt"
exit $failed
