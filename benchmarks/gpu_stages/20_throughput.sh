#!/usr/bin/env bash
# Stage (b): the 40GB and 80GB recipes and the block policy the recipes had before, at the worst case
# (scenes of 24 frames) under their caps, each with autocast on and off, eager and compiled: one process
# per configuration, ratios within the run; MFU, peak and the planner's predicted step for each; then the
# fastest configuration of each recipe that fits its cap, as overrides (fastest.json).
#   bash benchmarks/gpu_stages/20_throughput.sh DIR BUDGET_S      (GPU_SESSION_SMOKE=1: tiny model on the CPU)
set -euo pipefail
DIR=$1
BUDGET=$2
if [ "${GPU_SESSION_SMOKE:-0}" = 1 ]; then
  # The same code path with the tiny model: the 40GB recipe with autocast on and off, eager (the block
  # policy's code path: stage 30's smoke run; compiled blocks on the CPU: tests/test_compile.py).
  python3 -m benchmarks.compare_recipes --profile cpu --out "$DIR" --budget-s "$BUDGET" --no-charts \
    --grid --no-compile-grid --roles recipe_40g --no-mix --no-baseline --no-sweep --warmup 1 --steps 1
else
  python3 -m benchmarks.compare_recipes --profile gpu --out "$DIR" --budget-s "$((BUDGET - 5))" --no-charts \
    --grid --no-mix --no-baseline --no-sweep
fi
report=$(ls -t "$DIR"/*.md | grep -v summary.md | head -n 1)
cp "$report" "$DIR/summary.md"
