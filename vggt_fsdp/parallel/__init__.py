"""Sharding engine: FSDP2 units, mixed precision and activation checkpointing applied from a recipe.

`apply_parallelism(model, parallel_cfg, mesh=None)` is the one place that wraps and shards a model;
`plan_parallelism` computes the same plan as data (meta-device model, no process group needed);
`build_accelerator` / `prepare_model` / `prepare_optimizer` connect it to Accelerate (see parallel/accelerate.py).
"""
from vggt_fsdp.parallel.accelerate import build_accelerator, prepare_model, prepare_optimizer
from vggt_fsdp.parallel.checkpointing import canonical_name
from vggt_fsdp.parallel.config import ParallelConfig
from vggt_fsdp.parallel.sharding import ParallelPlan, UnitPlan, apply_parallelism, build_mesh, plan_parallelism

__all__ = [
    "ParallelConfig",
    "ParallelPlan",
    "UnitPlan",
    "apply_parallelism",
    "build_accelerator",
    "build_mesh",
    "canonical_name",
    "plan_parallelism",
    "prepare_model",
    "prepare_optimizer",
]
