"""Mixed precision: which dtype each FSDP unit computes and reduces in, and the forward's autocast.

FSDP2 keeps the sharded parameters (the optimizer's master weights) in fp32 and all-gathers them in
`param_dtype` for compute; gradients are reduce-scattered in `reduce_dtype`. Units named by
`precision.fp32_modules` (VGGT: the camera, depth and point heads, as upstream runs them with autocast
off) compute in fp32, and so does every block inside them.

With bf16 compute parameters the root forward also runs under bf16 autocast, as upstream trains: fp32
buffers and inputs (the image normalisation constants, RoPE tables) would otherwise promote activations
back to fp32 in front of bf16 weights, and autocast keeps norms and softmax in fp32 as upstream does.
The fp32 heads switch autocast off inside (the model's contract).
"""
from __future__ import annotations

import functools
from fnmatch import fnmatchcase
from typing import Iterable

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

from vggt_fsdp.parallel.config import PrecisionConfig

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}


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


def mp_policy(param_dtype: str, reduce_dtype: str) -> MixedPrecisionPolicy:
    # fp32 units get their inputs as they come (bf16 from an autocast trunk) and cast what they read
    # themselves (VGGT's heads: the camera tokens, and each DPT chunk). FSDP2's input casting would give
    # every fp32 head its own fp32 copy of every kept layer, held until backward: for VGGT-1B at 24
    # frames, 4 layers x 24 x 1374 tokens x 2048 x 4 B per DPT head plus the camera head's last layer,
    # 2.3 GiB. A module listed in precision.fp32_modules must therefore accept bf16 inputs.
    return MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype],
                                cast_forward_inputs=param_dtype != "fp32")


def autocast_forward(model: nn.Module, param_dtype: str, device_type: str) -> None:
    """Run `model.forward` under autocast to `param_dtype` (nothing to do for fp32)."""
    if param_dtype == "fp32":
        return
    forward = model.forward

    @functools.wraps(forward)
    def forward_under_autocast(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=DTYPES[param_dtype]):
            return forward(*args, **kwargs)

    model.forward = forward_under_autocast
