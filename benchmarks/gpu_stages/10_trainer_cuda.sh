#!/usr/bin/env bash
# Stage (a), the trainer's first CUDA run: `vggt-fsdp train` trains VGGT-1B on one GPU (all states on
# the card) for a few steps, checkpoints (checksummed) and exports; vggt-mid with the 80GB recipe's
# selective checkpoint policies, in deterministic mode (SDPA's math kernel), is stopped by SIGTERM,
# resumed, and compared with a straight run; fused AdamW's device-side skip of a non-finite step.
# Run directories live in $GPU_SESSION_SCRATCH and are deleted by the check that made them.
# See benchmarks/trainer_cuda.py.
#   bash benchmarks/gpu_stages/10_trainer_cuda.sh DIR BUDGET_S      (GPU_SESSION_SMOKE=1: tiny model on the CPU)
set -euo pipefail
DIR=$1
BUDGET=$2
if [ "${GPU_SESSION_SMOKE:-0}" = 1 ]; then
  python3 -m benchmarks.trainer_cuda "$DIR" --budget-s "$BUDGET" --smoke
else
  python3 -m benchmarks.trainer_cuda "$DIR" --budget-s "$((BUDGET - 5))"
fi
