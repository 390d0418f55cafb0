"""The tracker's transformer (EfficientUpdateFormer): attention over time per track, and over tracks
per frame through a small set of learned virtual tracks.

Follows the reference implementation (vggt/heads/track_modules/{blocks,modules}.py, after CoTracker),
parameter names included (`virual_tracks` is upstream's spelling). Its blocks normalise the input and
then add the residual to the *normalised* input (x = norm1(x); x = x + attn(x)); that is upstream's
computation and the published weights were trained with it, so it is kept.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..layers import Mlp


class AttnBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.attn = nn.MultiheadAttention(embed_dim=hidden_size, num_heads=num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x)
        # need_weights=False lets MultiheadAttention use the fused scaled-dot-product kernels.
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.cross_attn = nn.MultiheadAttention(embed_dim=hidden_size, num_heads=num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.norm1(x)
        context = self.norm_context(context)
        x = x + self.cross_attn(x, context, context, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class EfficientUpdateFormer(nn.Module):
    """(B, N tracks, T frames, input_dim) -> (B, N, T, output_dim) updates."""

    def __init__(self, space_depth: int = 6, time_depth: int = 6, input_dim: int = 320, hidden_size: int = 384,
                 num_heads: int = 8, output_dim: int = 130, mlp_ratio: float = 4.0, add_space_attn: bool = True,
                 num_virtual_tracks: int = 64) -> None:
        super().__init__()
        if add_space_attn and not 0 < space_depth <= time_depth:
            raise ValueError(f"space_depth={space_depth} must be in 1..time_depth={time_depth} with space attention")
        self.add_space_attn = add_space_attn
        self.num_virtual_tracks = num_virtual_tracks
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size, bias=True)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim, bias=True)
        self.virual_tracks = nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size)) if add_space_attn else None
        self.time_blocks = nn.ModuleList([AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(time_depth)])
        if add_space_attn:
            self.space_virtual_blocks = nn.ModuleList(
                [AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)])
            self.space_point2virtual_blocks = nn.ModuleList(
                [CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)])
            self.space_virtual2point_blocks = nn.ModuleList(
                [CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Upstream's init: Xavier-uniform linear weights, zero biases, a near-zero flow head."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.flow_head.weight, std=0.001)

    def forward(self, x: Tensor) -> Tensor:
        # The input mixes fp32 embeddings with features; it is computed in the parameters' dtype (under
        # CPU autocast a bf16 LayerNorm refuses an fp32 input; CUDA autocast casts both to fp32 anyway).
        tokens = self.input_transform(self.input_norm(x.to(self.input_norm.weight.dtype)))
        init_tokens = tokens
        batch, num_tracks, frames, _ = tokens.shape
        if self.add_space_attn:
            tokens = torch.cat([tokens, self.virual_tracks.repeat(batch, 1, frames, 1)], dim=1)
            space_every = len(self.time_blocks) // len(self.space_virtual_blocks)
        num_all = tokens.shape[1]

        space_idx = 0
        for i, time_block in enumerate(self.time_blocks):
            tokens = time_block(tokens.reshape(batch * num_all, frames, -1)).view(batch, num_all, frames, -1)
            if self.add_space_attn and i % space_every == 0:
                tokens = self._space_attention(tokens, space_idx)
                space_idx += 1

        tokens = tokens[:, :num_tracks] + init_tokens
        return self.flow_head(self.output_norm(tokens))

    def _space_attention(self, tokens: Tensor, j: int) -> Tensor:
        """Per frame: virtual tracks read the points, attend among themselves, and the points read them."""
        batch, num_all, frames, _ = tokens.shape
        space = tokens.permute(0, 2, 1, 3).reshape(batch * frames, num_all, -1)
        num_points = num_all - self.num_virtual_tracks
        points, virtual = space[:, :num_points], space[:, num_points:]
        virtual = self.space_virtual2point_blocks[j](virtual, points)
        virtual = self.space_virtual_blocks[j](virtual)
        points = self.space_point2virtual_blocks[j](points, virtual)
        space = torch.cat([points, virtual], dim=1)
        return space.view(batch, frames, num_all, -1).permute(0, 2, 1, 3)
