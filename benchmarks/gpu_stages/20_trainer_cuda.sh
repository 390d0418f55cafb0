#!/usr/bin/env bash
# Issue 14 on a lent GPU: the trainer's first CUDA run. `vggt-fsdp train` trains VGGT-1B on one GPU
# (all states on the card) for 10 steps, checkpoints and exports; vggt-mid in fp32 is stopped by
# SIGTERM and resumed, and compared with a straight run; fused AdamW's device-side skip of a
# non-finite step is checked. See benchmarks/trainer_cuda.py.
#   bash benchmarks/gpu_stages/20_trainer_cuda.sh DIR BUDGET_S      (GPU_SESSION_SMOKE=1: tiny model on the CPU)
set -euo pipefail
DIR=$1
BUDGET=$2
if [ "${GPU_SESSION_SMOKE:-0}" = 1 ]; then
  python3 -m benchmarks.trainer_cuda "$DIR" --budget-s "$BUDGET" --smoke
else
  python3 -m benchmarks.trainer_cuda "$DIR" --budget-s "$((BUDGET - 5))"
fi
