"""Sin-cos embeddings of the tracker: of its feature-map grid and of per-frame track displacements.

Both follow the reference implementation (vggt/heads/track_modules/utils.py, after CoTracker/VGGSfM),
including its conventions: the grid embedding encodes x (column) in its first half and y (row) in
its second; the displacement embedding interleaves sin/cos with frequencies k * 1000 / C.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .head_act import make_sincos_pos_embed


def grid_sincos_embedding(embed_dim: int, height: int, width: int, device: torch.device | None = None) -> Tensor:
    """(1, embed_dim, height, width) embedding of integer cell positions, base frequency 10000."""
    if embed_dim % 4:
        raise ValueError(f"grid embedding width must be a multiple of 4 (x and y halves of sin/cos), got {embed_dim}")
    rows = torch.arange(height, dtype=torch.float32, device=device)
    cols = torch.arange(width, dtype=torch.float32, device=device)
    xx, yy = torch.meshgrid(cols, rows, indexing="xy")  # both (height, width)
    emb_x = make_sincos_pos_embed(embed_dim // 2, xx.reshape(-1), omega_0=10000)
    emb_y = make_sincos_pos_embed(embed_dim // 2, yy.reshape(-1), omega_0=10000)
    return torch.cat([emb_x, emb_y], dim=-1).reshape(1, height, width, embed_dim).permute(0, 3, 1, 2)


def displacement_embedding(xy: Tensor, channels: int) -> Tensor:
    """(..., 2) displacements -> (..., 2 * channels): [x part, y part], each sin/cos interleaved."""
    if channels % 2:
        raise ValueError(f"displacement embedding needs an even channel count, got {channels}")
    xy = xy.float()
    freqs = torch.arange(0, channels, 2, device=xy.device, dtype=torch.float32) * (1000.0 / channels)
    parts = []
    for coord in (xy[..., 0:1], xy[..., 1:2]):
        angles = coord * freqs
        parts.append(torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)
