"""Transformer building blocks shared by the DINO backbone, the aggregator and the camera head.

`Block` and `Attention` are the two types the sharding and checkpointing code looks for, so every
transformer block of the model is a `Block` and every self-attention an `Attention`.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class RopeTables:
    """cos/sin for the row and column halves of the head dim, each (B or 1, 1, N, half_dim), fp32.

    Deliberately not a tuple, NamedTuple or dataclass: FSDP2's `cast_forward_inputs` descends into those
    and would hand every bf16 block unit its own bf16-rounded copy of the tables (then saved per block
    for backward, and cast back to fp32 where q is fp32 after qk-norm under CUDA autocast). Position
    tables are not activations; `RotaryPositionEmbedding2D.prepare` casts them to the query's dtype.
    """

    def __init__(self, cos_row: torch.Tensor, sin_row: torch.Tensor, cos_col: torch.Tensor, sin_col: torch.Tensor):
        self.cos_row, self.sin_row, self.cos_col, self.sin_col = cos_row, sin_row, cos_col, sin_col

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.cos_row, self.sin_row, self.cos_col, self.sin_col))


class RotaryPositionEmbedding2D(nn.Module):
    """2-D RoPE: the first half of the head dim rotates with the row, the second with the column.

    Each half uses the rotate-half form with frequencies base^(-2i/d). It has no parameters and no
    buffers. The aggregator gathers the tables once per forward pass (`tables`) and hands the same
    `RopeTables` to every block, so sizing the table (positions.max(), a host sync unless the caller
    passes `length`) happens outside the blocks and a compiled block has no graph break.

    The tables are fp32. Where q is fp32 too (fp32 training; CUDA bf16 autocast with qk-norm, whose
    LayerNorm autocasts to fp32) autograd saves one set for all blocks. Where q is lower precision (CPU
    autocast, no qk-norm, bf16 parameters without autocast) `prepare` casts per block and each block
    saves its own copy. Given a positions tensor instead of tables, `forward` gathers the tables itself.
    """

    def __init__(self, frequency: float = 100.0):
        super().__init__()
        self.frequency = float(frequency)

    def tables(self, positions: torch.Tensor, half_dim: int, length: int | None = None) -> RopeTables:
        """The tables for integer (row, col) `positions` of shape (B or 1, N, 2).

        `length` (positions.max() + 1) sizes the table; a caller that knows it saves the host sync of
        reading it from the device.
        """
        inv_freq = 1.0 / (self.frequency ** (torch.arange(0, half_dim, 2, device=positions.device).float() / half_dim))
        if length is None:
            length = int(positions.max()) + 1
        angles = torch.outer(torch.arange(length, device=positions.device, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos_t, sin_t = angles.cos(), angles.sin()
        return RopeTables(*(F.embedding(positions[..., axis], t)[:, None] for axis in (0, 1) for t in (cos_t, sin_t)))

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def prepare(self, pos: RopeTables | torch.Tensor, like: torch.Tensor) -> RopeTables:
        """Tables for `pos` (tables, or positions to gather) in the dtype of `like` (no copy if it is fp32)."""
        tables = pos if isinstance(pos, RopeTables) else self.tables(pos, like.shape[-1] // 2)
        return RopeTables(*(t.to(like.dtype) for t in tables))

    def forward(self, x: torch.Tensor, pos: RopeTables | torch.Tensor) -> torch.Tensor:
        """x: (B, heads, N, head_dim); pos: `RopeTables`, or (B or 1, N, 2) integer (row, col) positions."""
        cos_r, sin_r, cos_c, sin_c = self.prepare(pos, x)
        rows, cols = x.chunk(2, dim=-1)
        rows = rows * cos_r + self._rotate_half(rows) * sin_r
        cols = cols * cos_c + self._rotate_half(cols) * sin_c
        return torch.cat((rows, cols), dim=-1)


def patch_positions(grid_h: int, grid_w: int, num_special: int, device: torch.device) -> torch.Tensor:
    """RoPE positions of one frame's tokens, (1, num_special + grid_h*grid_w, 2).

    Patches get (row + 1, col + 1) so that the special tokens (camera, registers) alone sit at (0, 0);
    the largest entry is therefore max(grid_h, grid_w).
    """
    rows = torch.arange(grid_h, device=device)
    cols = torch.arange(grid_w, device=device)
    grid = torch.cartesian_prod(rows, cols) + 1
    special = torch.zeros(num_special, 2, dtype=grid.dtype, device=device)
    return torch.cat((special, grid), dim=0)[None]


class ContextHooks(Protocol):
    """What a context-parallel runtime supplies when a scene's frames are split over a group of ranks
    (vggt_fsdp/parallel/context.py implements it; the model only calls it)."""

    size: int  # ranks sharing the scene

    @property
    def holds_first_frame(self) -> bool: ...

    def heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, n, d) this rank's tokens -> (B, H/size, size*n, d) the whole scene's tokens."""

    def sequence_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of heads_to_sequence."""

    def gather_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's frames of x along dim, in rank order (exact gradients to this rank's frames)."""


class Attention(nn.Module):
    """Multi-head self-attention: qkv -> optional per-head LayerNorm of q, k -> optional RoPE -> SDPA.

    With `context` set (a scene's tokens split over ranks, `ContextHooks`), q, k and v trade the token
    split for a head split around SDPA, so each rank attends over every token with its share of heads.
    RoPE is applied before the exchange: positions belong to the tokens this rank holds.
    """

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
        self.__dict__["context"] = None  # ContextHooks, set by the owner of a sequence-spanning attention

    def forward(self, x: torch.Tensor, pos: RopeTables | torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if pos is None:
                raise ValueError("this attention uses RoPE and needs token positions (pos)")
            tables = self.rope.prepare(pos, q)  # q and k share one cast of the tables
            q, k = self.rope(q, tables), self.rope(k, tables)
        context = self.context
        if context is not None:
            if self.num_heads % context.size:
                raise ValueError(f"context parallelism over {context.size} ranks needs heads ({self.num_heads}) "
                                 "divisible by it")
            q, k, v = (context.heads_to_sequence(t) for t in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v)
        if context is not None:
            x = context.sequence_to_heads(x)
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

    def forward(self, x: torch.Tensor, pos: RopeTables | torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))
