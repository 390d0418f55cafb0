#!/usr/bin/env bash
# Everything this project measures on a GPU, in one call of a lent device (one H100/H200, 15 minutes of
# device time in all): the planner against measurement (issue 6), then the recipe comparison (issue 7).
# Usage: OUT=dir bash benchmarks/gpu_session.sh [PVM_BUDGET_S] [COMPARE_BUDGET_S]
# Writes at most 7 files to $OUT: session.log, plan_vs_measured.{json,md}, <date>-<device>.{json,md,png...}.
set -uo pipefail
: "${OUT:?set OUT to the output directory}"
PVM_BUDGET=${1:-150}
COMPARE_BUDGET=${2:-260}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
LOG="$OUT/session.log"

{
  date -u +%FT%TZ
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$LOG"

echo "== planner vs measured (VGGT-1B, world size 8 over a fake group, 40GB recipe)" | tee -a "$LOG"
timeout "$PVM_BUDGET" python3 benchmarks/plan_vs_measured.py --recipe recipes/a100_40g.yaml --world-size 8 \
  --frames 8,24:2,48 --policies block/chunks,block/none --out "$OUT" 2>&1 | tee -a "$LOG"

echo "== recipe comparison" | tee -a "$LOG"
timeout $((COMPARE_BUDGET + 40)) python3 -m benchmarks.compare_recipes --profile gpu --out "$OUT" \
  --budget-s "$COMPARE_BUDGET" 2>&1 | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
