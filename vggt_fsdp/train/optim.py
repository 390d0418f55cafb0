"""Optimizer, learning-rate schedule and per-group gradient clipping.

AdamW with decoupled weight decay on matrices only, a linear-warmup-then-cosine schedule and
upstream's clipping of each module group (aggregator, heads) on its own gradient norm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from vggt_fsdp.train.config import OptimConfig, ScheduleConfig


def fused_supported(device_type: str) -> bool:
    """Whether torch has a fused AdamW kernel for this device type."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return device_type in _get_fused_kernels_supported_devices()


def resolve_fused(cfg: OptimConfig, device_type: str) -> bool:
    """The fused decision. Fused AdamW also lets a non-finite step be skipped on the device (found_inf)
    without a host sync, so "auto" takes it wherever torch has the kernel."""
    supported = fused_supported(device_type)
    if cfg.fused == "auto":
        return supported
    if cfg.fused and not supported:
        raise ValueError(f"optim.fused=true but torch has no fused AdamW for device {device_type!r}; "
                         "use optim.fused=auto or false")
    return bool(cfg.fused)


def is_no_decay(name: str, param: torch.Tensor, cfg: OptimConfig) -> bool:
    # DTensor parameters report their global shape, so ndim is the same sharded or not.
    if cfg.no_decay_1d and param.ndim <= 1:
        return True
    return any(pattern in name for pattern in cfg.no_decay)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split into a weight-decay group and a no-decay group (empty ones dropped)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if is_no_decay(name, param, cfg) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: model.freeze froze everything")
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    fused = resolve_fused(cfg, device_type)
    return torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        fused=fused,
        # foreach is the fast unfused path; torch refuses both flags at once.
        foreach=None if fused else True,
    )


def lr_at(step: int, base_lr: float, cfg: ScheduleConfig, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup from warmup_start_lr to
    base_lr over the warmup steps, then cosine from base_lr down to min_lr at max_steps."""
    warmup = cfg.warmup_for(max_steps)
    if step < warmup:
        return cfg.warmup_start_lr + (base_lr - cfg.warmup_start_lr) * step / warmup
    decay_steps = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, base_lr: float,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (so its state_dict is just the step count) following `lr_at`."""
    factor: Callable[[int], float] = lambda step: lr_at(step, base_lr, cfg, max_steps) / base_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class ClipGroup:
    name: str
    max_norm: float
    params: list[nn.Parameter]


def clip_groups(model: nn.Module, clip: dict[str, float]) -> list[ClipGroup]:
    """Trainable parameters assigned to the first clip group whose name occurs in the parameter name
    (upstream matches module names the same way). Groups that match nothing are dropped."""
    groups = {name: ClipGroup(name, max_norm, []) for name, max_norm in clip.items()}
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        for gname in clip:
            if gname in pname:
                groups[gname].params.append(param)
                break
    return [g for g in groups.values() if g.params]


def clip_grad_norms(groups: list[ClipGroup], clip_fn: Callable) -> dict[str, torch.Tensor]:
    """Clip each group on its own norm with `clip_fn(params, max_norm)` (the Accelerator's
    clip_grad_norm_, which is DTensor aware) and return the pre-clip norms as device tensors,
    so no host sync happens here."""
    norms = {}
    for group in groups:
        norm = clip_fn(group.params, group.max_norm)
        norms[group.name] = _as_local(norm)
    return norms


def _as_local(norm: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def total_norm(norms: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The L2 norm over all clipped groups (for logging and the non-finite check)."""
    if not norms:
        return None
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms.values()]))
