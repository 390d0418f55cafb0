#!/usr/bin/env bash
# Every GPU check this project owes, in one call of a lent device (one H100/H200; 15 minutes of device
# time in all, at most 10 minutes a command). Each check is a *stage*: an executable script
# benchmarks/gpu_stages/NN_name.sh, run in name order as `bash STAGE STAGE_DIR BUDGET_S` from the repo
# root. A stage that fails or runs out of time is recorded and the next one still runs.
#
#   OUT=dir bash benchmarks/gpu_session.sh [TOTAL_BUDGET_S] [STAGE ...]
#
# TOTAL_BUDGET_S (default 560) is shared by the stages in proportion to their nominal budgets (below);
# naming stages (e.g. 20_trainer_cuda) runs only those. GPU_SESSION_SMOKE=1 runs every stage's CPU
# smoke mode (tiny model, tiny shapes): how the tests prove the session before a GPU is lent.
# GPU_STAGES_DIR overrides the stage directory (tests).
#
# $OUT receives at most 3 files, within the device tool's limit of 8: session.log (everything printed),
# summary.md (each stage's summary.md, with its status and time) and stages.tar.gz (every stage's
# directory: JSON results, logs). Commit what they show under benchmarks/results/ with their provenance.
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
TOTAL=${1:-560}
shift $(( $# > 0 ? 1 : 0 ))
STAGES_DIR=${GPU_STAGES_DIR:-benchmarks/gpu_stages}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
mkdir -p "$OUT"
LOG="$OUT/session.log"
SUMMARY="$OUT/summary.md"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Nominal seconds per stage (a stage not listed gets DEFAULT_BUDGET); scaled to TOTAL below.
declare -A NOMINAL=([10_throughput]=220 [20_trainer_cuda]=90 [30_track]=70 [40_single_gpu]=180)
DEFAULT_BUDGET=60
GRACE=${GPU_SESSION_GRACE:-15}  # seconds a stage gets past its budget before it is killed

stages=()
if [ $# -gt 0 ]; then
  for name in "$@"; do stages+=("$STAGES_DIR/${name%.sh}.sh"); done
else
  for file in "$STAGES_DIR"/[0-9]*.sh; do [ -e "$file" ] && stages+=("$file"); done
fi
nominal_sum=0
for file in "${stages[@]}"; do
  name=$(basename "$file" .sh)
  nominal_sum=$((nominal_sum + ${NOMINAL[$name]:-$DEFAULT_BUDGET}))
done

{
  echo "# GPU session $(date -u +%FT%TZ)"
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'accelerate', accelerate.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  echo "smoke: ${GPU_SESSION_SMOKE:-0}; total budget ${TOTAL} s; stages: ${stages[*]##*/}"
} 2>&1 | tee "$LOG"
cp "$LOG" "$SUMMARY"

for file in "${stages[@]}"; do
  name=$(basename "$file" .sh)
  budget=$(( TOTAL * ${NOMINAL[$name]:-$DEFAULT_BUDGET} / (nominal_sum > 0 ? nominal_sum : 1) - GRACE ))
  (( budget < 5 )) && budget=5
  dir="$WORK/$name"
  mkdir -p "$dir"
  echo "== stage $name (budget ${budget} s)" | tee -a "$LOG"
  started=$SECONDS
  if [ ! -f "$file" ]; then
    status="missing ($file)"
  else
    timeout -k 5 $((budget + GRACE)) bash "$file" "$dir" "$budget" 2>&1 | tee -a "$LOG" "$dir/stage.log"
    code=${PIPESTATUS[0]}
    case $code in
      0) status=ok ;;
      124|137) status="timed out after $((budget + GRACE)) s" ;;
      *) status="failed (exit $code)" ;;
    esac
  fi
  elapsed=$((SECONDS - started))
  echo "== stage $name: $status in ${elapsed} s" | tee -a "$LOG"
  {
    echo
    echo "## $name: $status in ${elapsed} s"
    echo
    if [ -f "$dir/summary.md" ]; then cat "$dir/summary.md"; else echo "(no summary.md; see stage.log in stages.tar.gz)"; fi
  } >> "$SUMMARY"
done

tar -czf "$OUT/stages.tar.gz" -C "$WORK" . 2>>"$LOG"
echo "== wrote $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
