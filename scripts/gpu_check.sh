#!/usr/bin/env bash
# The ONE script a GPU session runs (each device call has a 10-minute limit):
#   versions -> editable install (builds the CUDA extension) -> GPU-marked tests -> digits training parity
#   -> benchmark report -> whole test suite without the interpreter -> summary.
# Every step runs under its own timeout and a failing step never stops the later ones (in particular the
# benchmark). Everything is tee'd to $OUT/gpu_check.log; results land in $OUT/results/ (JSON, Markdown, PNG)
# ready to be copied into benchmarks/results/ and committed. Few files on purpose: only 8 come back.
#
# All steps do not fit one 10-minute call: split a session into consecutive calls (the machine stays warm, so
# the build, Triton's cache and the autotuning cache carry over), e.g.
#   GPU_CHECK_STEPS=versions,install,gpu_tests          then
#   GPU_CHECK_STEPS=install,benchmark                     then   (the issue's one-command report, ~9 min)
#   GPU_CHECK_STEPS=install,digits,all_tests
# (install is a no-op rebuild once built). Without GPU_CHECK_STEPS every step runs, the benchmark squeezed.
#
# Env: OUT (default ./gpu_out), GPU_CHECK_STEPS (comma list, default all), GPU_CHECK_BUDGET_S (whole script,
# default 570), BENCH_ARGS (extra bench flags, e.g. "--max-autotune" or "--no-compile"),
# GPU_CHECK_SKIP_INSTALL=1 (local dry runs only).
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT/results"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: > "$LOG"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-570}
declare -a STEPS=()
WANT=",${GPU_CHECK_STEPS:-versions,install,gpu_tests,digits,benchmark,all_tests},"
wants() { [[ "$WANT" == *",$1,"* ]]; }

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME TIMEOUT_S CMD...: run under timeout, tee to the log, record rc and seconds; never exits the script.
step() {
  local name=$1 limit=$2; shift 2
  if (( limit < 5 )); then
    STEPS+=("$(printf '%-22s %-8s %6s' "$name" "skipped" "0")"); echo "### $name: skipped (no time left)" | tee -a "$LOG"
    return
  fi
  echo "### $name (timeout ${limit}s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  STEPS+=("$(printf '%-22s %-8s %6s' "$name" "rc=$rc" "$(( $(date +%s) - t0 ))")")
  echo "### $name: rc=$rc after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

wants versions && step versions 30 bash -c 'nvidia-smi; python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())"'
if wants install; then
  if [[ "${GPU_CHECK_SKIP_INSTALL:-0}" == 1 ]]; then  # local dry runs of this script only
    step install 0 true
  else
    step install 240 python3 -m pip install --no-build-isolation --no-deps -e .
  fi
fi
# First-call Triton compiles (every tuning candidate has a GPU test) dominate this step: give it room when the
# benchmark is not in the same call.
GPU_TESTS_S=150; wants benchmark || GPU_TESTS_S=330
wants gpu_tests && step gpu_tests $GPU_TESTS_S python3 -m pytest -q -m gpu tests -p no:cacheprovider --durations=15

# Real-training parity (issue: converted resnet20 vs eager, 30 epochs, bf16 autocast): curves.json/.png.
if wants digits; then
  step digits 240 python3 scripts/train_digits.py --output "$OUT/results/digits"
  for f in "$OUT"/results/digits/curves.*; do  # dated, beside the benchmark files it is committed with
    [[ -f "$f" ]] && mv -f "$f" "$OUT/results/$(date +%F)-digits-${f##*/}"
  done
  rmdir "$OUT/results/digits" 2>/dev/null
fi

# The benchmark gets what is left, minus a reserve when the whole suite still has to run; its own --budget-s
# skips rows (reported as skipped) so that it ends before the timeout.
if wants benchmark; then
  RESERVE=0; wants all_tests && RESERVE=150
  BENCH_BUDGET=$(( $(left) - RESERVE - 60 ))
  (( BENCH_BUDGET > 480 )) && BENCH_BUDGET=480
  step benchmark $(( BENCH_BUDGET + 50 )) python3 -m resnet_fast.bench --output "$OUT/results" \
    --budget-s "$BENCH_BUDGET" ${BENCH_ARGS:-}
fi
for f in "$OUT"/results/*; do  # GPU reports only: a CPU demo's files never go to benchmarks/results
  [[ -f "$f" && "$f" != *cpu-demo* ]] && cp -f "$f" benchmarks/results/
done

# Whole suite on the GPU, interpreter off (kernels compile for the device).
wants all_tests && step all_tests $(( $(left) - 15 )) env -u TRITON_INTERPRET RESNET_FAST_BACKEND=auto \
  python3 -m pytest -q -p no:cacheprovider tests

{
  echo "== gpu_check summary ($(( $(date +%s) - START ))s of ${BUDGET}s) =="
  printf '%-22s %-8s %6s\n' step status seconds
  printf '%s\n' "${STEPS[@]}"
  echo
  python3 - "$OUT/results" <<'PY' || echo "(no benchmark results to summarize)"
import collections, glob, json, sys
files = sorted(f for f in glob.glob(sys.argv[1] + "/*.json") if "-digits-" not in f)
if not files:
    raise SystemExit("no results JSON written")
doc = json.load(open(files[-1]))
print(f"results: {files[-1]}  device: {doc['device']}  peaks: {doc['peaks']}")
status = collections.Counter((r["suite"], r["impl"], r.get("status", "ok").split(":")[0]) for r in doc["results"])
for (suite, impl, st), n in sorted(status.items()):
    print(f"  {suite:6} {impl:22} {st:12} {n}")
for r in doc["results"]:
    if r["suite"] == "model" and r.get("ms"):
        print(f"  model {r['mode']:5} {r['impl']:22} {r['ms']:8.2f} ms  {r.get('images_per_s', 0):8.0f} img/s  "
              f"speedup {r.get('speedup', float('nan')):.2f}")
PY
  echo "to commit: copy $OUT/results/* into benchmarks/results/"
} 2>&1 | tee "$SUMMARY" | tee -a "$LOG"
