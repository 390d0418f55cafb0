"""Memory planning: predict one GPU's peak before launching, and measure it on one device.

- `planner`: the analytical model (`plan`, `max_frames_that_fit`, `cheapest_policy_that_fits`,
  `resolve_frames_per_gpu` for `data.frames_per_gpu: auto`).
- `formulas`: the saved-tensor formulas per model part, checked against the model code.
- `accounting`: exact measurements (saved-tensor bytes, FSDPMemTracker model-state terms).
- `fake_pg`: FSDP2 over a fake process group of world size N on one device.
"""
from vggt_fsdp.memory.planner import (
    MemoryPlan,
    Term,
    cheapest_policy_that_fits,
    max_frames_that_fit,
    plan,
    resolve_frames_per_gpu,
)

__all__ = [
    "MemoryPlan",
    "Term",
    "cheapest_policy_that_fits",
    "max_frames_that_fit",
    "plan",
    "resolve_frames_per_gpu",
]
