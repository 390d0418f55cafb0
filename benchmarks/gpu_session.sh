#!/usr/bin/env bash
# Every GPU check this project owes, in one call of a lent device (one H100/H200; about 15 minutes of
# device time in all, machine start included; at most 10 minutes a command). Call it with the device
# tool's timeout_s about 540: the session itself ends within TOTAL_BUDGET_S (default 480) of wall time,
# setup included.
#
#   OUT=dir bash benchmarks/gpu_session.sh [TOTAL_BUDGET_S] [STAGE ...]
#   bash benchmarks/gpu_session.sh --budgets [TOTAL_BUDGET_S]     # the split, one "stage seconds" a line
#
# Stages, in priority order (benchmarks/gpu_stages/NN_name.sh, run as `bash STAGE STAGE_DIR BUDGET_S`):
#   10_trainer_cuda  the trainer's first CUDA run: VGGT-1B trained, checkpointed, exported; SIGTERM and exact
#                    resume with the 80GB recipe's selective policies in deterministic mode
#   20_throughput    the 40GB and 80GB recipes and the block policy at 24 frames, autocast on/off, eager/
#                    compiled, one process each
#   30_sampler_mix   the same on the sampler's mix of shapes, one warm-up step per shape
#   40_track, 50_single_gpu
#   60_long_share    one GPU's share of the long-scene recipes (context parallelism; the exchange stood in for)
# Each stage gets its share of what is left when it starts (a stage that ends early leaves its time to
# the next). A failing or hanging stage is recorded and the next one still runs.
#
# What comes back: $OUT/session.log, summary.md, ledger.json (measured / owed, benchmarks/session_ledger.py)
# and stages/NAME/ (each stage's JSON, reports, logs), written as they are measured, so a kill keeps them.
# Nothing large: run directories and checkpoints live in a scratch directory outside $OUT
# (GPU_SESSION_SCRATCH, given to each stage) that the stage deletes; logs over 256 KB are cut to their
# tail, any other file over 1 MB is dropped, and the session fails if $OUT exceeds 5 MB. A ledger from an
# earlier session at the same code (benchmarks/results/gpu-ledger.json, or GPU_SESSION_LEDGER) makes
# the stages skip what it lists as measured.
#
# GPU_SESSION_SMOKE=1: every stage's CPU smoke mode (tiny model, tiny shapes), the same order and the same
# split of a budget scaled by GPU_SESSION_SCALE (default 3: a CPU is slower); the setup step is skipped.
# GPU_STAGES_DIR overrides the stage directory (tests).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=${GPU_SESSION_SMOKE:-0}
SCALE=${GPU_SESSION_SCALE:-$([ "$SMOKE" = 1 ] && echo 3 || echo 1)}
PRINT_BUDGETS=0
if [ "${1:-}" = --budgets ]; then PRINT_BUDGETS=1; shift; fi
TOTAL=${1:-$((480 * SCALE))}
shift $(( $# > 0 ? 1 : 0 ))
STAGES_DIR=${GPU_STAGES_DIR:-benchmarks/gpu_stages}
GRACE=${GPU_SESSION_GRACE:-10}   # seconds a stage gets past its budget before it is killed
RESERVE=${GPU_SESSION_RESERVE:-10}  # kept for the ledger and the last report
MIN_STAGE=${GPU_SESSION_MIN_STAGE_S:-20}  # a stage is not started with less than this left
MAX_OUT_BYTES=$((5 * 1024 * 1024))

# Nominal seconds per stage on a GPU (a stage not listed gets DEFAULT_BUDGET): shares of what is left.
declare -A NOMINAL=([10_trainer_cuda]=150 [20_throughput]=170 [30_sampler_mix]=60 [40_track]=45 [50_single_gpu]=45
                   [60_long_share]=60)
# Stages that take only what the stages before them leave: no earlier stage's share counts them. (A first
# session then leaves them owed; a later one, whose earlier stages skip what the ledger lists, reaches them.)
LEFTOVER_ONLY=" 60_long_share "
DEFAULT_BUDGET=60
SETUP_S=$([ "$SMOKE" = 1 ] && echo 0 || echo 25)  # pip install -e . and the header, on a GPU machine

stages=()
if [ $# -gt 0 ]; then
  for name in "$@"; do stages+=("$STAGES_DIR/${name%.sh}.sh"); done
else
  for file in "$STAGES_DIR"/[0-9]*.sh; do [ -e "$file" ] && stages+=("$file"); done
fi

# share LEFT INDEX: stage INDEX's budget out of LEFT seconds, shared with the stages after it.
share() {
  local left=$1 index=$2 sum=0 i name own
  for ((i = index; i < ${#stages[@]}; i++)); do
    name=$(basename "${stages[$i]}" .sh)
    if (( i > index )) && [[ "$LEFTOVER_ONLY" == *" $name "* ]]; then continue; fi
    sum=$((sum + ${NOMINAL[$name]:-$DEFAULT_BUDGET}))
  done
  name=$(basename "${stages[$index]}" .sh)
  own=$(( left * ${NOMINAL[$name]:-$DEFAULT_BUDGET} / (sum > 0 ? sum : 1) - GRACE ))
  echo $(( own < 5 ? 5 : own ))
}

if [ "$PRINT_BUDGETS" = 1 ]; then  # the planned split, each stage taking its full share
  left=$((TOTAL - SETUP_S * SCALE - RESERVE))
  for ((i = 0; i < ${#stages[@]}; i++)); do
    budget=$(share "$left" "$i")
    echo "$(basename "${stages[$i]}" .sh) $budget"
    left=$((left - budget - GRACE))
  done
  exit 0
fi

: "${OUT:?set OUT to the output directory}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
mkdir -p "$OUT/stages"
LOG="$OUT/session.log"
SUMMARY="$OUT/summary.md"
SCRATCH_ROOT=$(mktemp -d)
trap 'rm -rf "$SCRATCH_ROOT"' EXIT
STARTED=$SECONDS

{
  echo "# GPU session $(date -u +%FT%TZ)"
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)'); code key $(python3 -m benchmarks.session_ledger key)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  if [ "$SMOKE" != 1 ] && [ "${GPU_SESSION_SETUP:-1}" = 1 ]; then
    echo "setup: pip install --no-deps --no-build-isolation -e ."
    timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 3
  fi
  python3 -c "import torch, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'accelerate', accelerate.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  echo "smoke: $SMOKE (budget scale $SCALE); total budget ${TOTAL} s; stages: ${stages[*]##*/}"
} 2>&1 | tee "$LOG"
cp "$LOG" "$SUMMARY"

# The items an earlier session at this code measured: the stages skip them.
LEDGER_IN=${GPU_SESSION_LEDGER:-benchmarks/results/gpu-ledger.json}
export GPU_SESSION_DONE="$SCRATCH_ROOT/done.json" GPU_SESSION_RECORD=1
python3 -m benchmarks.session_ledger done-file "$LEDGER_IN" "$GPU_SESSION_DONE" 2>&1 | tee -a "$LOG"
echo "ledger: $(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$GPU_SESSION_DONE") items already measured at this code ($LEDGER_IN)" | tee -a "$LOG"

# keep_small DIR: what a stage left in $OUT stays small (logs cut to their tail, anything else big dropped).
keep_small() {
  local file size
  while IFS= read -r -d '' file; do
    size=$(stat -c %s "$file")
    if [[ "$file" == *.log || "$file" == *.txt || "$file" == *.jsonl ]] && (( size > 262144 )); then
      tail -c 262144 "$file" > "$file.tail" && mv "$file.tail" "$file"
      echo "   (cut $file to its last 256 KB)" | tee -a "$LOG"
    elif (( size > 1048576 )); then
      rm -f "$file"
      echo "   (dropped $file: $size bytes; nothing large leaves the machine)" | tee -a "$LOG"
    fi
  done < <(find "$1" -type f -print0)
}

declare -A STATUS
status_json() {
  local first=1 name
  printf '{'
  for name in "${!STATUS[@]}"; do
    [ $first = 1 ] || printf ', '
    printf '"%s": "%s"' "$name" "${STATUS[$name]}"
    first=0
  done
  printf '}\n'
}

for ((i = 0; i < ${#stages[@]}; i++)); do
  file=${stages[$i]}
  name=$(basename "$file" .sh)
  left=$((TOTAL - (SECONDS - STARTED) - RESERVE))
  budget=$(share "$left" "$i")
  dir="$OUT/stages/$name"
  export GPU_SESSION_SCRATCH="$SCRATCH_ROOT/$name"
  mkdir -p "$dir" "$GPU_SESSION_SCRATCH"
  echo "== stage $name (budget ${budget} s; $((SECONDS - STARTED)) s into the session)" | tee -a "$LOG"
  started=$SECONDS
  if [ ! -f "$file" ]; then
    status="missing ($file)"
  elif (( left < MIN_STAGE )); then
    status="not started (${left} s left)"
  else
    timeout -k 5 $((budget + GRACE)) bash "$file" "$dir" "$budget" 2>&1 | tee -a "$LOG" "$dir/stage.log"
    code=${PIPESTATUS[0]}
    case $code in
      0) status=ok ;;
      124|137) status="timed out after $((budget + GRACE)) s" ;;
      *) status="failed (exit $code)" ;;
    esac
  fi
  rm -rf "$GPU_SESSION_SCRATCH"  # whatever the stage left behind (a killed stage cannot clean up)
  keep_small "$dir"
  elapsed=$((SECONDS - started))
  STATUS[$name]=$status
  status_json > "$OUT/stage-status.json"
  echo "== stage $name: $status in ${elapsed} s" | tee -a "$LOG"
  {
    echo
    echo "## $name: $status in ${elapsed} s"
    echo
    if [ -f "$dir/summary.md" ]; then cat "$dir/summary.md"; else echo "(no summary.md; see stages/$name/stage.log)"; fi
  } >> "$SUMMARY"
done

python3 -m benchmarks.session_ledger finish "$OUT" 2>&1 | tee -a "$LOG" "$SUMMARY"
size=$(du -sb "$OUT" | cut -f1)
echo "== $OUT: $size bytes in $(find "$OUT" -type f | wc -l) files (limit $MAX_OUT_BYTES); session wall $((SECONDS - STARTED)) s of ${TOTAL} s" | tee -a "$LOG"
if (( size > MAX_OUT_BYTES )); then
  echo "== $OUT is over 5 MB: the device tool may not bring it back" | tee -a "$LOG"
  exit 1
fi
