#!/usr/bin/env bash
# Issue 10 on a lent GPU: the block policy the recipes had before against the new 40GB and 80GB recipes,
# in one run (ratios within the run), at the worst case (scenes of 24 frames) and on a realistic mix of
# sampler-drawn batches; recompute fraction, MFU, peak and the planner's predicted step time for each;
# the 40GB recipe compiled; the upstream-style baseline where it fits (its speed is owed).
#   bash benchmarks/gpu_stages/10_throughput.sh DIR BUDGET_S      (GPU_SESSION_SMOKE=1: tiny model on the CPU)
set -euo pipefail
DIR=$1
BUDGET=$2
if [ "${GPU_SESSION_SMOKE:-0}" = 1 ]; then
  # The same code path with the tiny model: the block policy, worst case and sampler mix.
  python3 -m benchmarks.compare_recipes --profile cpu --out "$DIR" --budget-s "$BUDGET" --no-charts \
    --roles block_40g --warmup 0 --steps 1
else
  python3 -m benchmarks.compare_recipes --profile gpu --out "$DIR" --budget-s "$((BUDGET - 10))" --no-sweep
fi
# The report of the comparison is this stage's summary.
report=$(ls -t "$DIR"/*.md | head -n 1)
cp "$report" "$DIR/summary.md"
