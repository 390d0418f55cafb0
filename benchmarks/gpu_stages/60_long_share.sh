#!/usr/bin/env bash
# Stage 60, issue 19 on a lent GPU: one GPU's share of the long-scene recipes (a100_40g_long: 24 of 96 frames
# under 40 GiB; a100_80g_long: 48 of 192 under 80 GiB), the context exchange stood in for by local copies:
# peak and step time against the planner. See benchmarks/long_share_gpu.py.
#   bash benchmarks/gpu_stages/60_long_share.sh DIR BUDGET_S      (GPU_SESSION_SMOKE=1: tiny model on the CPU)
set -euo pipefail
DIR=$1
BUDGET=$2
if [ "${GPU_SESSION_SMOKE:-0}" = 1 ]; then
  python3 -m benchmarks.long_share_gpu "$DIR" --budget-s "$BUDGET" --smoke
else
  python3 -m benchmarks.long_share_gpu "$DIR" --budget-s "$((BUDGET - 5))"
fi
