"""A model that is not VGGT, written the way a user's project would: its own attention, block and head
classes, a learned position table and a non-persistent buffer computed in `__init__`.

It follows the two conventions the toolkit relies on for a model built on the meta device
(`vggt_fsdp.parallel.materialize`): every module initialises its own parameters in `reset_parameters()`,
and every buffer `__init__` computes is computed by `reset_buffers()` (which `__init__` calls, so a CPU
build and a meta build + `materialize_module` give the same weights for the same seed).

The CLI reads this module through `--model examples/own_model.py:build`:
- `build()` returns the model (the CLI calls it under `with torch.device("meta")`);
- `example_inputs(size)` returns the positional inputs of one training forward, `size` sequences of
  `SEQ_LEN` tokens: `vggt-fsdp plan --model ... --size N` measures small sizes on the CPU and scales.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class OwnConfig:
    in_dim: int = 12  # features per input token
    dim: int = 64
    heads: int = 4
    depth: int = 4
    mlp_ratio: int = 4
    seq_len: int = 32
    out_dim: int = 3


SEQ_LEN = OwnConfig.seq_len


class SelfAttention(nn.Module):
    """Multi-head self-attention over the tokens (fused SDPA)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class TransformerLayer(nn.Module):
    """Pre-norm block: attention, then an MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SinusoidalPositions(nn.Module):
    """A fixed sinusoidal table added to the tokens: a non-persistent buffer (in no state dict), so on
    the meta device `reset_buffers()` is its only source."""

    def __init__(self, seq_len: int, dim: int):
        super().__init__()
        self.register_buffer("table", torch.empty(seq_len, dim), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        seq_len, dim = self.table.shape
        position = torch.arange(seq_len, dtype=torch.float32, device=self.table.device)[:, None]
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=self.table.device)
                         * (-math.log(10000.0) / dim))
        self.table[:, 0::2] = torch.sin(position * freq)
        self.table[:, 1::2] = torch.cos(position * freq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[: x.shape[1]].to(x.dtype)


class Head(nn.Module):
    """Per-token regression head (its own FSDP unit in the example recipe)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class OwnModel(nn.Module):
    def __init__(self, cfg: OwnConfig = OwnConfig()):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.in_dim, cfg.dim)
        self.positions = SinusoidalPositions(cfg.seq_len, cfg.dim)
        self.layers = nn.ModuleList(TransformerLayer(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.head = Head(cfg.dim, cfg.out_dim)
        # A learned per-position offset: a parameter of this module itself, so this module inits it.
        self.pos = nn.Parameter(torch.empty(cfg.seq_len, cfg.dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.positions(self.embed(x)) + self.pos[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build(cfg: OwnConfig = OwnConfig()) -> OwnModel:
    """The factory `--model examples/own_model.py:build` calls (under the meta device)."""
    return OwnModel(cfg)


def example_inputs(size: int) -> tuple[torch.Tensor]:
    """One forward's inputs at `size` sequences (the per-GPU batch the plan scales over)."""
    return (torch.randn(size, SEQ_LEN, OwnConfig.in_dim),)
