"""Transformer building blocks shared by the DINO backbone, the aggregator and the camera head.

`Block` and `Attention` are the two types the sharding and checkpointing code looks for, so every
transformer block of the model is a `Block` and every self-attention an `Attention`.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


class RotaryPositionEmbedding2D(nn.Module):
    """2-D RoPE: the first half of the head dim rotates with the row, the second with the column.

    Each half uses the rotate-half form with frequencies base^(-2i/d). It has no parameters and no
    buffers. cos/sin are computed in fp32, cast to the query dtype, and gathered once per positions
    tensor: every block of a forward pass receives the same positions object, so all of them share
    one set of gathered tables. That avoids a host sync per call (the table length needs
    positions.max()) and, in training, lets autograd save the tables once instead of once per block.
    """

    def __init__(self, frequency: float = 100.0):
        super().__init__()
        self.frequency = float(frequency)
        self._gathered: dict[tuple, tuple[weakref.ref, tuple[torch.Tensor, ...]]] = {}

    def _tables(self, positions: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(cos_row, sin_row, cos_col, sin_col), each (B or 1, 1, N, dim), for these positions."""
        key = (id(positions), dim, dtype)
        hit = self._gathered.get(key)
        if hit is not None and hit[0]() is positions:
            return hit[1]
        self._gathered = {k: v for k, v in self._gathered.items() if v[0]() is not None}
        inv_freq = 1.0 / (self.frequency ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
        length = int(positions.max()) + 1
        angles = torch.outer(torch.arange(length, device=positions.device, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos_t, sin_t = angles.cos().to(dtype), angles.sin().to(dtype)
        tables = tuple(F.embedding(positions[..., axis], t)[:, None] for axis in (0, 1) for t in (cos_t, sin_t))
        self._gathered[key] = (weakref.ref(positions), tables)
        return tables

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, heads, N, head_dim); positions: (B or 1, N, 2) integer (row, col)."""
        cos_r, sin_r, cos_c, sin_c = self._tables(positions, x.shape[-1] // 2, x.dtype)
        rows, cols = x.chunk(2, dim=-1)
        rows = rows * cos_r + self._rotate_half(rows) * sin_r
        cols = cols * cos_c + self._rotate_half(cols) * sin_c
        return torch.cat((rows, cols), dim=-1)


def patch_positions(grid_h: int, grid_w: int, num_special: int, device: torch.device) -> torch.Tensor:
    """RoPE positions of one frame's tokens, (1, num_special + grid_h*grid_w, 2).

    Patches get (row + 1, col + 1) so that the special tokens (camera, registers) alone sit at (0, 0).
    """
    rows = torch.arange(grid_h, device=device)
    cols = torch.arange(grid_w, device=device)
    grid = torch.cartesian_prod(rows, cols) + 1
    special = torch.zeros(num_special, 2, dtype=grid.dtype, device=device)
    return torch.cat((special, grid), dim=0)[None]


class Attention(nn.Module):
    """Multi-head self-attention: qkv -> optional per-head LayerNorm of q, k -> optional RoPE -> SDPA."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        rope: RotaryPositionEmbedding2D | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        # Shared, parameter-free; kept out of the module tree so it never appears in any state dict.
        self.__dict__["rope"] = rope

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if pos is None:
                raise ValueError("this attention uses RoPE and needs token positions (pos)")
            q, k = self.rope(q, pos), self.rope(k, pos)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-LN transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        qk_norm: bool = False,
        rope: RotaryPositionEmbedding2D | None = None,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm, rope=rope)
        # Upstream: LayerScale only when init_values is truthy.
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))
