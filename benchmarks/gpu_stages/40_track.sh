#!/usr/bin/env bash
# Stage (d), issue 13 on a lent GPU: VGGT's track head trained within the 40GB and 80GB budgets. Both track recipes
# at their frames per GPU under a 40 / 80 GiB cap (peak, frames/s, MFU, the planner's predicted peak and
# its error), and the 40GB recipe with an upstream-style track head (no recompute in it) at the same
# shape. See benchmarks/track_gpu.py.
#   bash benchmarks/gpu_stages/40_track.sh DIR BUDGET_S      (GPU_SESSION_SMOKE=1: tiny model on the CPU)
set -euo pipefail
DIR=$1
BUDGET=$2
if [ "${GPU_SESSION_SMOKE:-0}" = 1 ]; then
  python3 -m benchmarks.track_gpu "$DIR" --budget-s "$BUDGET" --smoke
else
  python3 -m benchmarks.track_gpu "$DIR" --budget-s "$((BUDGET - 5))"
fi
