"""Output activations of the heads and the UV position embedding of the DPT head.

Formulas follow the reference implementation (vggt/heads/head_act.py and vggt/heads/utils.py):
names are accepted exactly as upstream spells them, and an unknown name fails at construction time
(`check_activation`) rather than deep inside a forward pass.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def inverse_log_transform(y: Tensor) -> Tensor:
    """sign(y) * (exp(|y|) - 1): the inverse of sign(x) * log(1 + |x|)."""
    return torch.sign(y) * torch.expm1(torch.abs(y))


def _norm_exp(xyz: Tensor) -> Tensor:
    # Direction from xyz, length expm1(|xyz|); the clamp keeps the direction finite at 0.
    length = xyz.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return xyz / length * torch.expm1(length)


def _xy_inv_log(xyz: Tensor) -> Tensor:
    xy, z = xyz.split([2, 1], dim=-1)
    z = inverse_log_transform(z)
    return torch.cat([xy * z, z], dim=-1)


# Activations of the value channels of a dense head, keyed by upstream's names.
VALUE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "norm_exp": _norm_exp,
    "norm": lambda xyz: xyz / xyz.norm(dim=-1, keepdim=True),
    "exp": torch.exp,
    "relu": F.relu,
    "inv_log": inverse_log_transform,
    "xy_inv_log": _xy_inv_log,
    "sigmoid": torch.sigmoid,
    "linear": lambda xyz: xyz,
}

# Activations of the confidence channel of a dense head.
CONF_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "expp1": lambda c: 1 + c.exp(),
    "expp0": torch.exp,
    "sigmoid": torch.sigmoid,
}

# Activations of the camera head's pose-encoding parts (translation, quaternion, focal/FoV).
POSE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "linear": lambda x: x,
    "inv_log": inverse_log_transform,
    "exp": torch.exp,
    "relu": F.relu,
}


def check_activation(kind: str, name: str, table: dict[str, Callable]) -> None:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid choices: {', '.join(table)}")


def activate_head(out: Tensor, activation: str = "norm_exp", conf_activation: str = "expp1") -> tuple[Tensor, Tensor]:
    """Split a dense head's raw output (N, C, H, W) into values (N, H, W, C-1) and confidence (N, H, W).

    The last channel is the confidence; the others are the values (depth, or a 3-D point).
    """
    check_activation("activation", activation, VALUE_ACTIVATIONS)
    check_activation("conf_activation", conf_activation, CONF_ACTIVATIONS)
    fmap = out.permute(0, 2, 3, 1)
    values = VALUE_ACTIVATIONS[activation](fmap[..., :-1])
    conf = CONF_ACTIVATIONS[conf_activation](fmap[..., -1])
    return values, conf


def base_pose_act(pose_enc: Tensor, act_type: str = "linear") -> Tensor:
    check_activation("pose activation", act_type, POSE_ACTIVATIONS)
    return POSE_ACTIVATIONS[act_type](pose_enc)


def activate_pose(pred_pose_enc: Tensor, trans_act: str = "linear", quat_act: str = "linear", fl_act: str = "linear") -> Tensor:
    """Activate a pose encoding [translation (3), quaternion (4), focal or FoV (rest)] part by part."""
    trans, quat, focal = pred_pose_enc[..., :3], pred_pose_enc[..., 3:7], pred_pose_enc[..., 7:]
    return torch.cat(
        [base_pose_act(trans, trans_act), base_pose_act(quat, quat_act), base_pose_act(focal, fl_act)], dim=-1)


# ------------------------------------------------------------------------ UV position embedding
def create_uv_grid(width: int, height: int, aspect_ratio: float | None = None,
                   dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
    """(height, width, 2) grid of (u, v) pixel-centre coordinates normalised by the image diagonal.

    The grid spans [-span_x, span_x] x [-span_y, span_y] shrunk by half a cell on each side, where
    (span_x, span_y) is the unit-diagonal rectangle of the given aspect ratio (width / height).
    """
    if aspect_ratio is None:
        aspect_ratio = float(width) / float(height)
    diagonal = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diagonal, 1.0 / diagonal
    edge_x = span_x * (width - 1) / width
    edge_y = span_y * (height - 1) / height
    u = torch.linspace(-edge_x, edge_x, steps=width, dtype=dtype, device=device)
    v = torch.linspace(-edge_y, edge_y, steps=height, dtype=dtype, device=device)
    uu, vv = torch.meshgrid(u, v, indexing="xy")
    return torch.stack((uu, vv), dim=-1)


def make_sincos_pos_embed(embed_dim: int, pos: Tensor, omega_0: float = 100) -> Tensor:
    """(M, embed_dim) fp32 embedding [sin(pos * w), cos(pos * w)] with w_i = omega_0 ** (-2i / embed_dim)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    # float64 as the reference implementation computes it (its published outputs depend on it bitwise).
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device) / (embed_dim / 2.0)
    omega = 1.0 / omega_0**omega
    angles = torch.outer(pos.reshape(-1).double(), omega)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def position_grid_to_embed(pos_grid: Tensor, embed_dim: int, omega_0: float = 100) -> Tensor:
    """(H, W, 2) coordinates -> (H, W, embed_dim): half the channels encode u, the other half v."""
    height, width, grid_dim = pos_grid.shape
    if grid_dim != 2:
        raise ValueError(f"position grid must end in 2 coordinates, got shape {tuple(pos_grid.shape)}")
    flat = pos_grid.reshape(-1, 2)
    emb_u = make_sincos_pos_embed(embed_dim // 2, flat[:, 0], omega_0=omega_0)
    emb_v = make_sincos_pos_embed(embed_dim // 2, flat[:, 1], omega_0=omega_0)
    return torch.cat([emb_u, emb_v], dim=-1).view(height, width, embed_dim)


def uv_position_embedding(height: int, width: int, channels: int, aspect_ratio: float,
                          dtype: torch.dtype, device: torch.device, ratio: float = 0.1) -> Tensor:
    """The DPT head's additive embedding for a (height, width) map of `channels`: (channels, H, W)."""
    grid = create_uv_grid(width, height, aspect_ratio=aspect_ratio, dtype=dtype, device=device)
    return (position_grid_to_embed(grid, channels) * ratio).permute(2, 0, 1).to(dtype)
