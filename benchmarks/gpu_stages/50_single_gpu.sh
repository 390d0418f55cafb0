#!/usr/bin/env bash
# Stage (d), issue 15 on a lent GPU: the single-GPU recipes (gpu24g_single, a100_40g_single: VGGT-1B fine-tuned on
# one card, parameters, gradients and AdamW state offloaded to the host) on an H200 capped at 24 and
# 40 GiB: device peak against the planner, step time, host memory, the host optimizer's share of a step.
# See benchmarks/single_gpu.py.
#   bash benchmarks/gpu_stages/50_single_gpu.sh DIR BUDGET_S      (GPU_SESSION_SMOKE=1: tiny model on the CPU)
set -euo pipefail
DIR=$1
BUDGET=$2
if [ "${GPU_SESSION_SMOKE:-0}" = 1 ]; then
  python3 -m benchmarks.single_gpu "$DIR" --budget-s "$BUDGET" --smoke
else
  python3 -m benchmarks.single_gpu "$DIR" --budget-s "$((BUDGET - 5))"
fi
