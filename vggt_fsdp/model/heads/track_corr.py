"""Bilinear sampling in pixel coordinates and the tracker's multi-scale correlation lookup.

As the reference implementation (vggt/heads/track_modules/{utils,blocks}.py, after CoTracker):
sampling positions are detached (no gradient flows into the coordinates through a lookup), and the
correlation of each track's feature with its frame's feature map is computed level by level and
sampled on a (2r+1) x (2r+1) window at once, so the full volume of all levels never coexists.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def bilinear_sampler(input: Tensor, coords: Tensor, padding_mode: str = "border") -> Tensor:
    """grid_sample of (B, C, H, W) at pixel coordinates (B, Ho, Wo, 2) = (x, y), align_corners=True."""
    coords = coords.detach().to(device=input.device, dtype=input.dtype)
    height, width = input.shape[2:]
    scale = torch.tensor([2 / max(width - 1, 1), 2 / max(height - 1, 1)], device=coords.device, dtype=coords.dtype)
    return F.grid_sample(input, coords * scale - 1, align_corners=True, padding_mode=padding_mode)


def sample_features4d(input: Tensor, coords: Tensor) -> Tensor:
    """Features of (B, C, H, W) at points (B, R, 2) in pixels -> (B, R, C)."""
    feats = bilinear_sampler(input, coords.unsqueeze(2))  # (B, C, R, 1)
    return feats.squeeze(3).transpose(1, 2)


class CorrBlock:
    """Average-pooled pyramid of feature maps (B, S, C, H, W) and windowed correlation lookups."""

    def __init__(self, fmaps: Tensor, num_levels: int, radius: int) -> None:
        self.num_levels = num_levels
        self.radius = radius
        self.pyramid = [fmaps]
        for _ in range(num_levels - 1):
            batch, frames = fmaps.shape[:2]
            fmaps = F.avg_pool2d(fmaps.flatten(0, 1), kernel_size=2, stride=2)
            fmaps = fmaps.unflatten(0, (batch, frames))
            self.pyramid.append(fmaps)
        # Window offsets (2r+1, 2r+1, 2). Upstream stacks meshgrid(dy, dx, indexing="ij"), so the offset
        # added to x varies along the window's first axis and the one added to y along its second.
        offsets = torch.linspace(-radius, radius, 2 * radius + 1, device=fmaps.device, dtype=fmaps.dtype)
        self.delta = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)

    def corr_sample(self, targets: Tensor, coords: Tensor) -> Tensor:
        """targets (B, S, N, C), coords (B, S, N, 2) at level-0 pixels -> (B, S, N, levels * (2r+1)^2)."""
        batch, frames, num_points, channels = targets.shape
        window = 2 * self.radius + 1
        delta = self.delta.to(device=coords.device, dtype=coords.dtype).view(1, window, window, 2)
        out = []
        for level, fmaps in enumerate(self.pyramid):
            height, width = fmaps.shape[-2:]
            corrs = torch.matmul(targets, fmaps.reshape(batch, frames, channels, height * width))
            corrs = corrs / math.sqrt(channels)
            centroids = coords.reshape(batch * frames * num_points, 1, 1, 2) / 2**level
            sampled = bilinear_sampler(corrs.reshape(-1, 1, height, width), centroids + delta, padding_mode="zeros")
            out.append(sampled.view(batch, frames, num_points, -1))
        return torch.cat(out, dim=-1)
