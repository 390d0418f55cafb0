#!/usr/bin/env bash
# Stage (c): the block policy and both recipes on a realistic mix, the first batches the recipe's sampler
# draws (scene lengths and aspect ratios varying as in training), each shape warmed up once before the
# timed pass (cuDNN and compile builds outside the timing).
#   bash benchmarks/gpu_stages/30_sampler_mix.sh DIR BUDGET_S      (GPU_SESSION_SMOKE=1: tiny model on the CPU)
set -euo pipefail
DIR=$1
BUDGET=$2
if [ "${GPU_SESSION_SMOKE:-0}" = 1 ]; then
  python3 -m benchmarks.compare_recipes --profile cpu --out "$DIR" --budget-s "$BUDGET" --no-charts \
    --roles block_40g --mix-only --no-baseline --no-sweep --warmup 0 --steps 1
else
  python3 -m benchmarks.compare_recipes --profile gpu --out "$DIR" --budget-s "$((BUDGET - 5))" --no-charts \
    --roles block_40g,recipe_40g,recipe_80g --mix-only --no-baseline --no-sweep --warmup 0
fi
report=$(ls -t "$DIR"/*.md | grep -v summary.md | head -n 1)
cp "$report" "$DIR/summary.md"
