"""CUDA autocast's fp32 rules, applied on the CPU: to count and to compare what CUDA autocast does.

CPU and CUDA bf16 autocast share the list of ops cast *down* to bf16 (linear, conv, matmul, SDPA), but
CUDA also runs a list of ops in fp32 (aten/src/ATen/autocast_mode.cpp, `KERNEL_CUDA(..., fp32)`:
layer_norm, group_norm, softmax, log_softmax among those a transformer uses) where CPU autocast leaves
them in bf16. Under `cuda_autocast_rules()`, while CPU autocast is enabled, those ops get fp32 inputs and
return fp32, as on CUDA; everything else is CPU autocast itself. So on the CPU one can:

- count the bytes a block saves for backward under CUDA autocast (the fp32 copies LayerNorm saves),
  exactly as the memory planner's `Kernels(kind="cuda", autocast=True)` predicts them;
- compare the numerics of training with and without autocast as they would differ on CUDA
  (benchmarks/precision_curves.py).

What it does not reproduce: kernel differences (e.g. the CPU LayerNorm kernel returns its statistics in
bf16 for bf16 inputs, CUDA's in fp32; under these rules LayerNorm runs in fp32 on both, so they agree).
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

# The functions of CUDA's autocast fp32 list that a VGGT-class model calls (through torch.nn.functional).
CUDA_FP32_FUNCTIONS = ("layer_norm", "group_norm", "softmax", "log_softmax")


def _to_fp32(value: object) -> object:
    if torch.is_tensor(value) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    return value


def _fp32_under_autocast(func: Callable) -> Callable:
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        args, kwargs = tree_map(_to_fp32, (args, kwargs))
        with torch.autocast("cpu", enabled=False):
            return func(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def cuda_autocast_rules() -> Iterator[None]:
    """Within this context, CPU bf16 autocast behaves as CUDA bf16 autocast for the fp32-list ops above.

    The functions are replaced in `torch.nn.functional` for the duration (process-wide, not thread-safe:
    a measuring tool, not for training), so that a checkpointed region's recompute in backward, which
    restores the forward's autocast state, follows the same rules: keep the context open over backward.
    """
    originals = {name: getattr(F, name) for name in CUDA_FP32_FUNCTIONS}
    try:
        for name, func in originals.items():
            setattr(F, name, _fp32_under_autocast(func))
        yield
    finally:
        for name, func in originals.items():
            setattr(F, name, func)
