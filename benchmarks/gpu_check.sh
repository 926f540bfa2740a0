#!/usr/bin/env bash
# The one prepared script for a session lent a GPU (one H200: step limits sum to 750 s), resumable.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh            # on the GPU machine
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh --smoke    # every step on CPU, tiny shapes (< 10 min)
#
# Python: $PYTHON if set, else the project's own .venv/bin/python (made by `make test` / `make demo`;
# on a CUDA machine with TORCH_SPEC set to a CUDA build of torch), else python3. The script refuses
# to start, in one line, when that interpreter has no torch (or, without --smoke, no CUDA).
# Each step writes one JSON file to $OUT (default ./gpu_check_out) and is SKIPPED when that file
# already holds valid JSON, so a rerun after a timeout or a lost machine resumes where it stopped
# (delete a file to redo its step). Checkpoints are config-only (`make-tiny --shape 7b`: no download;
# random weights created on the GPU in bf16) and written to $WORK (default /tmp/omnistream-gpu-check),
# outside $OUT. Steps (time limits on the GPU; a failing step does not stop the others):
#   pytest       120 s  tests/test_talker_graphs.py (CUDA graph replay == eager static step), tests/test_kernels.py,
#                       tests/test_wire.py (device tensors leave a process through to_cpu),
#                       tests/test_batched_decode.py (the kernel over ragged rows, compiled)
#                       + the kernel-path tests of tests/test_window_cache.py (Triton compiled for the GPU)
#                                                                                     -> pytest.json
#   kernels       80 s  benchmarks/kernel_bench.py: Triton decode attention vs SDPA / FlexAttention, bf16+fp16,
#                       2k..128k contexts, fraction of the H200's 4.8 TB/s            -> kernels.json
#   first_packet 100 s  benchmarks/first_packet.py on the published 7B shape in bf16, replies forced to
#                       their configured length (random weights must not end them early), after one untimed
#                       reply (--warm-up: first-use costs, which a server pays once; 2026-12-04's figures
#                       were cold)                                                    -> first_packet.json
#   capacity     120 s  benchmarks/capacity.py (the lead's): concurrent real-time sessions on the 7B shape,
#                       in-process layout, with CUDA graphs (--cuda-graphs) when the pytest step passed,
#                       after one untimed session, no ramp step started that would end past 90 s
#                       (null with the reason when the script is not there)          -> capacity.json
#   nav_step      90 s  benchmarks/nav_step.py on the JanusVLN-7B shape in bf16 (`nav make-tiny --shape 7b`:
#                       config only, random weights made on the GPU)                  -> nav_step.json
#   long_session  60 s  benchmarks/long_session.py --device cuda (window cache, kernel mode)
#                                                                                     -> long_session.json
#   decode_steps  60 s  benchmarks/decode_steps.py on the 7B shape: batched Thinker / Talker step wall time vs
#                       kernel time by batch size, the Talker eager and on static rows + CUDA graphs side by side
#                       (launch-bound or not; sessions the Talker holds at 50 codes/s)
#                                                                                     -> decode_steps.json
#   token2wav    120 s  benchmarks/token2wav_batch.py on the 7B shape: DiT window + vocoder span per session at
#                       batch 1 and 8, the DiT eager / block-sparse / CUDA graphs (model/token2wav_graphs.py)
#                                                                                     -> token2wav.json
# Then a summary table (summary.txt, summary.json) with the keys kernel_fraction_of_peak,
# first_audio_s_7b_bf16, max_realtime_sessions_7b, nav_step_ms_7b (null where a step could not measure
# it, with the reason). Exit status: the number of failed steps.
set -uo pipefail

cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
OUTDIR=${OUT:-gpu_check_out}
WORK=${WORK:-/tmp/omnistream-gpu-check}
mkdir -p "$OUTDIR" "$WORK"
# PYTHONSAFEPATH: a script's own folder is not put first on sys.path, so a benchmark script cannot
# hide the optional `kernels` package transformers imports (each script adds the project root itself)
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
unset OMNISTREAM_KERNELS

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch; run \`make test\` first (TORCH_SPEC=<a CUDA torch> on a GPU box) or set PYTHON" >&2
  exit 2
fi
if [[ $SMOKE == 0 ]]; then
  unset TRITON_INTERPRET  # compile the kernels for the GPU
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY (use --smoke to exercise this script on CPU)" >&2
    exit 2
  fi
  DEV=cuda; DT=bf16; SHAPE=7b
else
  export TRITON_INTERPRET=1
  DEV=cpu; DT=bf16; SHAPE=tiny
fi

failed=0
# step NAME FILE LIMIT_S COMMAND... : skipped when $OUTDIR/FILE already holds valid JSON; the command's
# stdout goes to FILE (one JSON object), its stderr to NAME.err.
step() {
  local name=$1 file=$OUTDIR/$2 limit=$3
  shift 3
  if [[ -s $file ]] && "$PY" -c "import json, sys; json.load(open(sys.argv[1]))" "$file" 2>/dev/null; then
    echo "step $name: done before, skipped ($file)" | tee -a "$OUTDIR/steps.txt" >&2
    return
  fi
  local t0=$SECONDS
  timeout "$limit" "$@" > "$file.tmp" 2> "$OUTDIR/$name.err"
  local rc=$?
  if [[ $rc == 0 ]] && "$PY" -c "import json, sys; json.load(open(sys.argv[1]))" "$file.tmp" 2>/dev/null; then
    mv "$file.tmp" "$file"
  else
    [[ $rc == 0 ]] && rc=1  # no valid JSON
    mv -f "$file.tmp" "$file.failed"  # kept for reading; the next run redoes the step
    failed=$((failed + 1))
  fi
  echo "step $name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUTDIR/steps.txt" >&2
}
{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  "$PY" -c "import torch, transformers; print('python', __import__('sys').executable); print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'transformers', transformers.__version__); print(torch.cuda.get_device_name() if \
torch.cuda.is_available() else 'cpu')"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>/dev/null || true
} > "$OUTDIR/env.txt" 2>&1
echo "--- $(date -u +%T) $([[ $SMOKE == 1 ]] && echo smoke) run" >> "$OUTDIR/steps.txt"

# the checkpoints: config-only 7B shape on the GPU (no weights on disk), the tiny one for the smoke run
TINY=$WORK/tiny-omni
"$PY" -m omnistream make-tiny "$TINY" --if-missing > /dev/null
if [[ $SHAPE == 7b ]]; then
  MODEL=$WORK/omni-7b
  "$PY" -m omnistream make-tiny --shape 7b "$MODEL" --if-missing > /dev/null
else
  MODEL=$TINY
fi

# 1. tests (CUDA: compiled Triton; smoke: the interpreter, as in CI; the kernel-path window tests only).
# pytest runs in this one process (a timeout leaves no orphan); the JSON holds its exit status and tail.
step pytest pytest.json $([[ $SMOKE == 1 ]] && echo 300 || echo 120) "$PY" -c '
import contextlib, io, json, sys
import pytest
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = int(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_talker_graphs.py",
                          "tests/test_thinker_graphs.py", "tests/test_token2wav_graphs.py", "tests/test_kernels.py",
                          "tests/test_window_cache.py", "tests/test_wire.py", "tests/test_batched_decode.py",
                          "-k", "not test_window_cache or kernel", "-rs"]))
print(json.dumps({"rc": rc, "tail": buf.getvalue().splitlines()[-15:]}))
sys.exit(rc)'

# 2. kernel benchmark
if [[ $SMOKE == 0 ]]; then
  step kernels kernels.json 80 "$PY" benchmarks/kernel_bench.py --json --dtypes bf16,fp16 --time-budget-s 50
else
  step kernels kernels.json 120 "$PY" benchmarks/kernel_bench.py --json --contexts 256 --reps 1 --warmup 0
fi

# 3. first audio packet, 7B shape in bf16, forced lengths
if [[ $SMOKE == 0 ]]; then
  step first_packet first_packet.json 100 "$PY" benchmarks/first_packet.py --json --model "$MODEL" --device $DEV \
    --dtype $DT --force-length --no-offline --seconds 4 --text-tokens 24 --warm-up
else
  step first_packet first_packet.json 180 "$PY" benchmarks/first_packet.py --json --model "$MODEL" --device $DEV \
    --dtype $DT --force-length --no-offline --seconds 1 --text-tokens 4
fi

# 4. capacity: how many real-time sessions one GPU holds (benchmarks/capacity.py is written by the lead)
# With CUDA graphs where step 1's graph-replay tests passed (the eager figure is on record: 0 sessions on
# 2026-12-04); the decode_steps and token2wav steps time eager and graphs side by side.
GRAPHS=()
"$PY" -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['rc'])" "$OUTDIR/pytest.json" 2>/dev/null \
  && GRAPHS=(--cuda-graphs)
if [[ -f benchmarks/capacity.py ]]; then
  step capacity capacity.json $([[ $SMOKE == 1 ]] && echo 180 || echo 120) "$PY" benchmarks/capacity.py --json \
    --model "$MODEL" --device $DEV --dtype $DT --layouts inproc "${GRAPHS[@]}" \
    --max-sessions $([[ $SMOKE == 1 ]] && echo 2 || echo 8) --time-budget-s $([[ $SMOKE == 1 ]] && echo 150 || echo 90)
else  # no JSON written: a rerun once the script exists measures it
  echo "step capacity: benchmarks/capacity.py does not exist yet, skipped" | tee -a "$OUTDIR/steps.txt" >&2
fi

# 5. navigation step latency (GPU: the JanusVLN-7B shape, config only; smoke: the tiny JanusVLN)
if [[ $SMOKE == 0 ]]; then
  JANUS=$WORK/janus-7b
  [[ -f $JANUS/config.json ]] || "$PY" -m omnistream nav make-tiny --shape 7b "$JANUS" > /dev/null
  step nav_step nav_step.json 90 "$PY" benchmarks/nav_step.py --json --model "$JANUS" --device $DEV --dtype $DT \
    --steps 95 --reencode-steps 2
else
  step nav_step nav_step.json 180 "$PY" benchmarks/nav_step.py --json --device $DEV --dtype fp32 --steps 100 \
    --reencode-steps 2
fi

# 6. long session on the window cache (GPU: kernel mode)
if [[ $SMOKE == 0 ]]; then
  step long_session long_session.json 60 "$PY" benchmarks/long_session.py --json --device cuda --session-minutes 5
else
  step long_session long_session.json 120 "$PY" benchmarks/long_session.py --json --device cpu --kernel on \
    --contexts 512,1024 --window 256 --steps 4 --session-minutes 1 --segment-s 20
fi

# 7. per-token step costs by batch size (wall vs kernel time)
if [[ $SMOKE == 0 ]]; then
  step decode_steps decode_steps.json 60 "$PY" benchmarks/decode_steps.py --json --model "$MODEL" --device $DEV \
    --dtype $DT --batches 1,8,32 --steps 10
else
  step decode_steps decode_steps.json 120 "$PY" benchmarks/decode_steps.py --json --model "$MODEL" --device $DEV \
    --dtype $DT --batches 1,4 --steps 3 --prompt-tokens 32
fi

# 8. Token2Wav windows by batch size: the DiT eager, block-sparse and as CUDA graphs (one replay per window)
if [[ $SMOKE == 0 ]]; then
  step token2wav token2wav.json 120 "$PY" benchmarks/token2wav_batch.py --json --model "$MODEL" --device $DEV \
    --batches 1,8 --repeat 1
else
  step token2wav token2wav.json 120 "$PY" benchmarks/token2wav_batch.py --json --model "$MODEL" --device $DEV \
    --batches 1,2 --repeat 1 --graphs
fi

# summary: the four headline keys (null with a reason where not measured), then what each step said
"$PY" - "$OUTDIR" "$SMOKE" > "$OUTDIR/summary.txt" 2>&1 <<'EOF'
import json, pathlib, sys

d, smoke = pathlib.Path(sys.argv[1]), sys.argv[2] == "1"


def load(name):
    try:
        return json.loads((d / name).read_text()), None
    except Exception as e:  # noqa: BLE001 - a missing or broken step is reported, not fatal
        return None, f"{name}: {type(e).__name__}: {e}"[:200]


keys, why = {}, {}
k, err = load("kernels.json")
if k:
    keys["kernel_fraction_of_peak"] = k.get("kernel_fraction_of_peak")
    why["kernel_fraction_of_peak"] = f"decode kernel at ctx {max(k['config']['contexts'])} on {k.get('device')}" \
        f" ({k.get('kernel_backend')} backend), of {k['config']['peak_bw'] / 1e12:.1f} TB/s"
else:
    keys["kernel_fraction_of_peak"], why["kernel_fraction_of_peak"] = None, err
fp, err = load("first_packet.json")
is7b = bool(fp) and not smoke
keys["first_audio_s_7b_bf16"] = fp["first_audio_s"] if is7b else None
why["first_audio_s_7b_bf16"] = (f"7B shape, {fp['dtype']}, {fp['device']}, forced lengths" if is7b else
                                "the 7B shape does not run on CPU (smoke: tiny shape, below)" if fp else err)
cap, err = load("capacity.json")
if cap is None and not pathlib.Path("benchmarks/capacity.py").exists():
    err = "benchmarks/capacity.py does not exist yet"
n = cap.get("max_realtime_sessions", cap.get("max_sessions")) if cap else None
keys["max_realtime_sessions_7b"] = None if smoke else n
why["max_realtime_sessions_7b"] = (cap.get("reason") if cap and n is None else
                                   "smoke: tiny shape, below" if smoke and cap else err or
                                   "7B shape, " + ("CUDA graphs" if cap.get("cuda_graphs") else "eager"))
if cap and (cap.get("inproc") or {}).get("stopped"):
    why["max_realtime_sessions_7b"] += f" (ramp stopped: {cap['inproc']['stopped']})"
nav, err = load("nav_step.json")
keys["nav_step_ms_7b"] = None if smoke or not nav else (nav.get("dual") or {}).get("step_ms_at_60")
why["nav_step_ms_7b"] = err if not nav else "smoke: tiny JanusVLN, below" if smoke else \
    f"JanusVLN-7B shape ({nav.get('dtype')}, {nav.get('device')}), dual memory, step 56-75"

print(f"{'key':28} {'value':>10}  note")
for key, v in keys.items():
    print(f"{key:28} {('%.4g' % v) if isinstance(v, (int, float)) else 'null':>10}  {why[key]}")
extra = {}
if fp:
    extra["first_audio_s_" + ("tiny" if smoke else "7b")] = fp.get("first_audio_s")
    extra["load_s"] = fp.get("load_s")
    extra["max_memory_allocated_gb"] = fp.get("max_memory_allocated_gb")
if nav and smoke:
    extra["nav_step_ms_tiny_at_60"] = (nav.get("dual") or {}).get("step_ms_at_60")
if cap and smoke:
    extra["max_realtime_sessions_tiny"] = n
ls, err = load("long_session.json")
if ls:
    extra["long_session_decode_flatness"] = ls.get("decode_flatness")
ds, err = load("decode_steps.json")
if ds:
    extra["max_sessions_talker_realtime_" + ("tiny" if smoke else "7b")] = ds.get("max_sessions_talker_realtime")
    for r in ds["results"]:
        extra[f"talker_step_ms_{r['talker']}_b{r['batch']}"] = f"{r['talker_step_ms']} (kernels {r['talker_gpu_ms']} ms)"
        extra[f"thinker_window_step_ms_{r['talker']}_b{r['batch']}"] = (
            f"{r['thinker_window_step_ms']} (kernels {r['thinker_window_gpu_ms']} ms)")
    extra["thinker_static_speedup"] = ds.get("thinker_static_speedup")
tw, err = load("token2wav.json")
if tw:  # DiT window ms per call by variant and batch, and the speech a session gets per second of it
    extra["token2wav_dit_ms"] = tw.get("dit_ms")
    extra["token2wav_realtime_sessions"] = tw.get("realtime_sessions_per_core")
    extra["token2wav_graphs_diff_vs_exact"] = (tw.get("max_abs_diff_vs_exact") or {}).get("graphs")
pt, err = load("pytest.json")
if pt:
    extra["pytest"] = (pt["tail"] or ["?"])[-1]
for key, v in extra.items():
    print(f"  {key:26} {v}")
print((d / "steps.txt").read_text().strip())
print((d / "env.txt").read_text().strip())
(d / "summary.json").write_text(json.dumps({**keys, "notes": why, "extra": extra}, indent=1) + "\n")
EOF
cat "$OUTDIR/summary.txt"
exit $failed
