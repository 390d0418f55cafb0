"""Mixed precision: which dtype each FSDP unit computes and reduces in, who casts its inputs, and
whether the forward runs under autocast.

FSDP2 keeps the sharded parameters (the optimizer's master weights) in fp32 and all-gathers them in
`param_dtype` for compute; gradients are reduce-scattered in `reduce_dtype`. Units named by
`precision.fp32_modules` (VGGT: the camera, depth and point heads, as upstream runs them) compute in
fp32, and so does every block inside them. The modes (`parallel.precision`):

- `param_dtype: fp32`: everything in fp32 (`autocast` has nothing to cast to and is not applied).
- `param_dtype: bf16, autocast: false`: the MixedPrecisionPolicy alone. Each unit computes in its
  parameters' dtype because FSDP2 casts the unit's floating inputs to it (`cast_forward_inputs`); no op
  changes dtype behind the model's back. LayerNorm runs bf16 in and out with fp32 statistics inside the
  kernel (torch's CPU and CUDA kernels accumulate in fp32; tests/test_precision.py checks the CPU one).
  This is torchtitan's way; it skips autocast's per-op casts (on CUDA, an fp32 copy in and a bf16 copy
  out of each of VGGT-1B's 567 LayerNorm calls a step).
- `param_dtype: bf16, autocast: true`: the same parameters, and the forward under bf16 autocast as
  upstream trains: autocast casts each matmul's inputs to bf16 and runs the ops on its fp32 list (CUDA:
  LayerNorm, softmax, ...) in fp32.

fp32 units compute in fp32 in every mode: their parameters are fp32, FSDP2 casts their floating inputs to
fp32, and under autocast their forward runs with autocast disabled (a Linear under bf16 autocast returns
bf16 even with fp32 weights and inputs).

Modules state their precision contract with class attributes, read here and by the memory planner:

- `casts_own_inputs = True`: FSDP2 hands the unit its floating inputs as they come; the module casts
  what it reads to its parameters' dtype. VGGT's heads read a few of the aggregator's kept layers (the
  camera tokens; each DPT chunk): FSDP2's input casting would give every fp32 head its own fp32 copy of
  every kept layer, held until backward (VGGT-1B at 24 frames: 4 layers x 24 x 1374 tokens x 2048 x 4 B
  per DPT head, plus the camera head's last layer: 2.3 GiB). The VGGT root keeps its fp32 images and
  query points (the aggregator casts the normalised images itself).
- `needs_autocast = True`: the module mixes fp32 and bf16 tensors by design and relies on autocast to
  cast at its matmuls (VGGT's track head, written like upstream's for bf16 autocast): it runs under
  bf16 autocast in the `autocast: false` mode too.

A module without these attributes gets the safe behaviour: its inputs are cast to its unit's dtype.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import MixedPrecisionPolicy

from vggt_fsdp.parallel.config import PrecisionConfig

if TYPE_CHECKING:
    from vggt_fsdp.parallel.plan import ParallelPlan, UnitPlan

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
CASTS_OWN_INPUTS = "casts_own_inputs"
NEEDS_AUTOCAST = "needs_autocast"


def inside(path: str, patterns: Iterable[str]) -> bool:
    """True when the module at `path` matches a pattern or lies inside a module that does."""
    parts = path.split(".") if path else []
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns)


def unit_dtypes(path: str, cfg: PrecisionConfig) -> tuple[str, str]:
    """(param_dtype, reduce_dtype) names for the unit at `path`."""
    if inside(path, cfg.fp32_modules):
        return "fp32", "fp32"
    return cfg.param_dtype, cfg.reduce_dtype


def uses_autocast(cfg: PrecisionConfig) -> bool:
    """Whether the forward runs under autocast: bf16 compute with `autocast: true`."""
    return cfg.autocast and cfg.param_dtype != "fp32"


def _declares(module: nn.Module, attribute: str) -> bool:
    inner = module._checkpoint_wrapped_module if isinstance(module, CheckpointWrapper) else module
    return bool(getattr(inner, attribute, False))


def casts_inputs(module: nn.Module, unit_param_dtype: str, cfg: PrecisionConfig) -> bool:
    """Whether FSDP2 casts the unit's floating inputs to its parameter dtype: whenever the model computes
    in a lower precision than fp32 (a unit may receive another unit's dtype), unless the module casts
    its own inputs. An all-fp32 model casts nothing (inputs stay as given, e.g. fp64 in tests)."""
    if cfg.param_dtype == "fp32" and unit_param_dtype == "fp32":
        return False
    return not _declares(module, CASTS_OWN_INPUTS)


def mp_policy(module: nn.Module, unit: UnitPlan, cfg: PrecisionConfig) -> MixedPrecisionPolicy:
    """The MixedPrecisionPolicy of the unit `unit` (whose module is `module`)."""
    return MixedPrecisionPolicy(param_dtype=DTYPES[unit.param_dtype], reduce_dtype=DTYPES[unit.reduce_dtype],
                                cast_forward_inputs=casts_inputs(module, unit.param_dtype, cfg))


def apply_forward_precision(model: nn.Module, plan: ParallelPlan, cfg: PrecisionConfig, device_type: str) -> None:
    """After `fully_shard`: autocast around the root's forward (autocast mode), autocast off inside fp32
    units (autocast mode), autocast on inside units that declare `needs_autocast` (no-autocast mode)."""
    if cfg.param_dtype == "fp32":
        return
    lower = DTYPES[cfg.param_dtype]
    autocast = uses_autocast(cfg)
    for unit in plan.units:
        module = model.get_submodule(unit.path) if unit.path else model
        if unit.param_dtype == "fp32" and autocast:
            _wrap_forward(module, lambda: torch.autocast(device_type=device_type, enabled=False))
        elif unit.param_dtype != "fp32" and not autocast and _declares(module, NEEDS_AUTOCAST):
            _wrap_forward(module, lambda: torch.autocast(device_type=device_type, dtype=lower))
    if autocast:
        _wrap_forward(model, lambda: torch.autocast(device_type=device_type, dtype=lower))


def _wrap_forward(module: nn.Module, context: Callable[[], object]) -> None:
    """Run `module.forward` inside `context()`. The instance attribute shadows the class's forward; FSDP2's
    hooks (input casting, all-gather) still run around it, and a checkpoint wrapper inside records the
    autocast state for its recompute."""
    forward = module.forward

    @functools.wraps(forward)
    def forward_in_context(*args, **kwargs):
        with context():
            return forward(*args, **kwargs)

    module.forward = forward_in_context


def describe(cfg: PrecisionConfig) -> str:
    """One line for `recipe show`."""
    if cfg.param_dtype == "fp32":
        return "fp32 everywhere (no autocast)"
    mode = (f"{cfg.param_dtype} autocast around the forward" if uses_autocast(cfg) else
            f"no autocast: units compute in their parameters' dtype ({cfg.param_dtype}; fp32 norm statistics "
            "inside the kernels)")
    fp32 = ", ".join(cfg.fp32_modules) or "none"
    return f"{mode}; fp32 units ({fp32}) compute in fp32 with fp32 inputs"


def accelerate_mixed_precision(cfg: PrecisionConfig) -> str:
    """The recipe's `accelerate.mixed_precision`: Accelerate's word for autocast. "bf16" makes
    `accelerator.autocast()` a bf16 autocast (its FSDP2 `prepare` does not wrap an already sharded model's
    forward: checked with accelerate 1.15), so it must say "no" unless the forward runs under autocast."""
    return "bf16" if uses_autocast(cfg) else "no"
