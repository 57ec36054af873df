#!/usr/bin/env bash
# The ONE script a GPU session runs. Default: ONE device call of at most 540 s (GPU_CHECK_BUDGET_S), every step
# under its own `timeout`, a failing step never stopping the later ones, in priority order:
#   versions     python/torch/CUDA/Triton/nvcc/driver, device name and capability
#   install      editable install, the CUDA extension built for this device's arch only
#   precompile   record the session's Triton launches, compile them on all cores into TRITON_CACHE_DIR
#   smoke        correctness of every kernel family and op role on every distinct ResNet-50 conv (+ tails, model)
#   model        ResNet-50, batch 256, 224px, bf16, channels_last: train step + inference, every implementation
#   blocks_convs the block suite (train, eval) and the conv suite vs cuDNN, as far as the budget goes
#   tuning       the shipped tuning table exported from this run's autotuning (when the exporter exists)
# A step's limit is its planned seconds plus whatever earlier steps left unused, minus nothing that later steps
# were promised; the plan (and its sum <= budget) is printed first.
#
# Files back (<= 8, <= 2 folders deep): $OUT/gpu_check.log, $OUT/summary.txt, $OUT/results/<date>-<gpu>.{json,md,png}
# (one benchmark report: model, block and conv rows, the autotune table, compile counts), $OUT/results/smoke.json,
# $OUT/results/tuning_table_<arch>.json.
#
# Env: OUT (default ./gpu_out); GPU_CHECK_BUDGET_S (default 540); GPU_CHECK_STEPS (comma list; later sessions
# may split, and also pick the older steps gpu_tests, digits, all_tests), e.g. on a warm machine (the build,
# Triton's cache and the tuning cache carry over between calls):
#   GPU_CHECK_STEPS=versions,install,precompile,smoke,model,blocks_convs,tuning    (the default, one call)
#   GPU_CHECK_STEPS=gpu_tests,digits                                               (a second call)
#   GPU_CHECK_STEPS=all_tests                                                      (a third call)
# BENCH_ARGS (extra benchmark flags);
# GPU_CHECK_DRY_RUN=1 (no GPU: the same plumbing with the GPU work replaced by its CPU form, see below);
# GPU_CHECK_SKIP_INSTALL=1 (local runs).
#
# Dry run (GPU_CHECK_DRY_RUN=1, any machine): prints the plan, checks the step limits sum to <= the budget, then
# runs versions, the smoke in the Triton interpreter (--quick, tiny shapes), the CPU benchmark demo in place of
# the model/block/conv steps, the guarded export and the summary; install and precompile only print their
# commands. Exit status 0 unless the plan does not fit.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
OUT="${OUT:-$PWD/gpu_out}"
DRY=${GPU_CHECK_DRY_RUN:-0}
mkdir -p "$OUT/results"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: > "$LOG"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-540}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # never under $OUT: only 8 files come back
DEFAULT_STEPS=versions,install,precompile,smoke,model,blocks_convs,tuning
WANT=",${GPU_CHECK_STEPS:-$DEFAULT_STEPS},"
wants() { [[ "$WANT" == *",$1,"* ]]; }
log() { echo "$*" | tee -a "$LOG"; }

# Planned seconds per step (the older steps only when GPU_CHECK_STEPS names them).
declare -A PLAN=([versions]=20 [install]=120 [precompile]=90 [smoke]=90 [model]=120 [blocks_convs]=80
                 [tuning]=10 [gpu_tests]=240 [digits]=240 [all_tests]=300)
ORDER=(versions install precompile smoke model blocks_convs tuning gpu_tests digits all_tests)
RESERVE_END=10  # summary
declare -a RUN=()
for s in "${ORDER[@]}"; do wants "$s" && RUN+=("$s"); done
TOTAL=$RESERVE_END
log "== gpu_check plan (budget ${BUDGET}s$([[ $DRY == 1 ]] && echo ', DRY RUN: no GPU work')) =="
for s in "${RUN[@]}"; do TOTAL=$(( TOTAL + PLAN[$s] )); log "$(printf '  %-13s %4ss' "$s" "${PLAN[$s]}")"; done
log "$(printf '  %-13s %4ss' summary "$RESERVE_END")"
log "  total         ${TOTAL}s of ${BUDGET}s"
if (( TOTAL > BUDGET )); then
  log "plan does not fit: ${TOTAL}s > ${BUDGET}s (pick fewer steps with GPU_CHECK_STEPS)"
  exit 2
fi

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# Seconds promised to the steps after $1 (and the summary).
later() {
  local after=0 sum=$RESERVE_END s
  for s in "${RUN[@]}"; do
    (( after )) && sum=$(( sum + PLAN[$s] ))
    [[ $s == "$1" ]] && after=1
  done
  echo $sum
}
limit_for() { echo $(( $(left) - $(later "$1") )); }

declare -a STEPS=()
# step NAME LIMIT_S CMD...: run under timeout, tee to the log, record rc and seconds; never exits the script.
step() {
  local name=$1 limit=$2; shift 2
  if (( limit < 5 )); then
    STEPS+=("$(printf '%-13s %-9s %6s %6s' "$name" "skipped" "0" "$limit")"); log "### $name: skipped (no time left)"
    return
  fi
  log "### $name (timeout ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  STEPS+=("$(printf '%-13s %-9s %6s %6s' "$name" "rc=$rc" "$(( $(date +%s) - t0 ))" "$limit")")
  log "### $name: rc=$rc after $(( $(date +%s) - t0 ))s"
}
# dry NAME CMD...: in a dry run, say what would run.
dry() { local name=$1; shift; STEPS+=("$(printf '%-13s %-9s %6s %6s' "$name" "dry-run" "0" "${PLAN[$name]}")")
        log "### $name (dry run, not executed): $*"; }

if wants versions; then
  step versions "$(limit_for versions)" bash -c '
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    command -v nvcc >/dev/null && nvcc --version | tail -2
    python3 - <<PY
import platform, torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:
    tv = f"unavailable ({exc})"
cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
print(f"python {platform.python_version()} torch {torch.__version__} cuda {torch.version.cuda} triton {tv}")
print("device", torch.cuda.get_device_name() if cap else "none (CPU)", "capability", cap)
PY'
fi

ARCH=$(python3 -c 'import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f"{c[0]}{c[1]}" if c else "")' 2>/dev/null)
if wants install; then
  if [[ $DRY == 1 || ${GPU_CHECK_SKIP_INSTALL:-0} == 1 ]]; then
    dry install env RESNET_FAST_CUDA_ARCHS="${ARCH:-<device capability>}" python3 -m pip install --no-build-isolation --no-deps -e .
  else
    step install "$(limit_for install)" env RESNET_FAST_CUDA_ARCHS="${ARCH:-90}" MAX_JOBS=16 \
      python3 -m pip install --no-build-isolation --no-deps -e .
  fi
fi

if wants precompile; then
  if [[ $DRY == 1 ]]; then
    dry precompile python3 -m resnet_fast.bench.precompile --workers 16
  else
    L=$(limit_for precompile)
    step precompile "$L" python3 -m resnet_fast.bench.precompile --workers "$(nproc)" --budget-s $(( L - 15 < 100 ? L - 15 : 100 ))
  fi
fi

if wants smoke; then
  L=$(limit_for smoke)
  if [[ $DRY == 1 ]]; then  # the interpreter on tiny shapes: exercises the same code
    step smoke "$L" python3 -m resnet_fast.bench.smoke --quick --budget-s $(( L - 15 )) --json "$OUT/results/smoke.json"
  else
    step smoke "$L" python3 -m resnet_fast.bench.smoke --budget-s $(( L - 20 )) --json "$OUT/results/smoke.json"
  fi
fi

# The benchmark's rows: the model first (its own call and timeout), then blocks and convs into a scratch folder,
# merged into ONE report in $OUT/results (json/md/png). --budget-s makes each end before its timeout.
IMPLS=resnet_fast,resnet_fast_triton,resnet_fast_cudnn,eager,compile
if [[ $DRY == 1 ]]; then
  if wants model || wants blocks_convs; then
    step benchmark_demo 60 python3 -m resnet_fast.bench --quick --demo-budget-s 8 --suites op,conv \
      --output "$OUT/results"
  fi
else
  if wants model; then
    L=$(limit_for model)
    step model "$L" python3 -m resnet_fast.bench --suites model --impls "$IMPLS" --output "$OUT/results" \
      --budget-s $(( L - 30 )) ${BENCH_ARGS:-}
  fi
  if wants blocks_convs; then
    L=$(limit_for blocks_convs)
    step blocks_convs "$L" python3 -m resnet_fast.bench --suites block,conv --impls "$IMPLS" \
      --output "$SCRATCH/bench2" --budget-s $(( L - 25 )) ${BENCH_ARGS:-}
    timeout 30 python3 -m resnet_fast.bench.merge "$OUT/results" "$SCRATCH/bench2" 2>&1 | tee -a "$LOG"
  fi
fi

if wants tuning; then
  if python3 -c "import resnet_fast.kernels.tuning_table" 2>/dev/null; then
    if [[ -n "$ARCH" ]]; then
      step tuning "$(limit_for tuning)" python3 -m resnet_fast.kernels.tuning_table export --arch "sm_$ARCH" \
        -o "$OUT/results/tuning_table_sm_$ARCH.json"
    else
      dry tuning python3 -m resnet_fast.kernels.tuning_table export --arch "sm_<capability>" \
        -o "$OUT/results/tuning_table_sm_<capability>.json"
    fi
  else
    log "### tuning: resnet_fast.kernels.tuning_table not importable: no export"
  fi
fi

# The older steps, for sessions that split their work over several calls.
if [[ $DRY == 1 ]]; then
  for s in gpu_tests digits all_tests; do wants $s && dry $s "(the $s step)"; done
else
  wants gpu_tests && step gpu_tests "$(limit_for gpu_tests)" python3 -m pytest -q -m gpu tests -p no:cacheprovider \
    --durations=15
  if wants digits; then
    step digits "$(limit_for digits)" python3 scripts/train_digits.py --output "$SCRATCH/digits"
    for f in "$SCRATCH"/digits/curves.*; do
      [[ -f "$f" ]] && cp -f "$f" "$OUT/results/$(date +%F)-digits-${f##*/}"
    done
  fi
  wants all_tests && step all_tests "$(limit_for all_tests)" env -u TRITON_INTERPRET RESNET_FAST_BACKEND=auto \
    python3 -m pytest -q -p no:cacheprovider tests
fi

if [[ $DRY != 1 ]]; then
  for f in "$OUT"/results/*; do  # GPU reports only: a CPU demo's files never go to benchmarks/results
    [[ -f "$f" && "$f" != *cpu-demo* && "$f" != *smoke* ]] && cp -f "$f" benchmarks/results/ 2>/dev/null
  done
fi

{
  echo "== gpu_check summary ($(( $(date +%s) - START ))s of ${BUDGET}s$([[ $DRY == 1 ]] && echo ', dry run')) =="
  printf '%-13s %-9s %6s %6s\n' step status seconds limit
  printf '%s\n' "${STEPS[@]}"
  echo
  timeout 20 python3 -m resnet_fast.bench.merge --summary "$OUT/results" || echo "(no results to summarize)"
  echo "files in $OUT: $(find "$OUT" -type f | wc -l) (at most 8 come back)"
} 2>&1 | tee "$SUMMARY" | tee -a "$LOG"
rm -rf "$SCRATCH"
exit 0
