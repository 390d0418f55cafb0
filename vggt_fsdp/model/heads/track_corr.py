"""Bilinear sampling in pixel coordinates and the tracker's multi-scale correlation lookup.

As the reference implementation (vggt/heads/track_modules/{utils,blocks}.py, after CoTracker):
sampling positions are detached (no gradient flows into the coordinates through a lookup), and the
correlation of each track's feature with its frame's feature map is computed level by level and
sampled on a (2r+1) x (2r+1) window.

Memory: the correlation volume of one level is (tracks x feature-map pixels) per frame, and the
window lookup (grid_sample) keeps it for backward. At VGGT-1B's training shape (24 frames, 512 tracks,
259 x 259 feature maps, 7 levels) that is about 2.2 GB in bf16 per refinement iteration, the largest
part of the track head (benchmarks/results/2026-11-29-cpu-track-memory.md). `CorrelationLookup` builds
the volumes per chunk of frames and, with `checkpoint` on, recomputes each chunk in backward: only the
chunk's inputs (views of the pyramid and of the track features) and the sampled windows are kept.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as checkpoint_fn


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


def feature_pyramid(fmaps: Tensor, levels: int) -> list[Tensor]:
    """(B, S, C, H, W) feature maps and `levels - 1` successive 2x average-pooled copies."""
    pyramid = [fmaps]
    for _ in range(levels - 1):
        batch, frames = fmaps.shape[:2]
        fmaps = F.avg_pool2d(fmaps.flatten(0, 1), kernel_size=2, stride=2).unflatten(0, (batch, frames))
        pyramid.append(fmaps)
    return pyramid


def window_offsets(radius: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(2r+1, 2r+1, 2) offsets. Upstream stacks meshgrid(dy, dx, indexing="ij"), so the offset added to x
    varies along the window's first axis and the one added to y along its second."""
    offsets = torch.linspace(-radius, radius, 2 * radius + 1, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)


class CorrelationLookup(nn.Module):
    """Windowed correlations of track features with their frame's feature pyramid (no parameters).

    forward(pyramid, targets (B, S, N, C), coords (B, S, N, 2) at level-0 pixels, checkpoint=False)
    -> (B, S, N, levels * (2r+1)^2). Frames are processed in chunks of `frames_chunk_size` over the
    frames of all scenes together (as the DPT heads chunk); `checkpoint` recomputes a chunk in backward.
    """

    def __init__(self, radius: int, frames_chunk_size: int | None = None) -> None:
        super().__init__()
        if frames_chunk_size is not None and frames_chunk_size <= 0:
            raise ValueError(f"frames_chunk_size={frames_chunk_size} must be positive or None (all frames at once)")
        self.radius = radius
        self.frames_chunk_size = frames_chunk_size

    def forward(self, pyramid: list[Tensor], targets: Tensor, coords: Tensor, checkpoint: bool = False) -> Tensor:
        batch, frames = targets.shape[:2]
        images = batch * frames
        flat_levels = [level.flatten(0, 1) for level in pyramid]
        flat_targets, flat_coords = targets.flatten(0, 1), coords.flatten(0, 1)
        chunk = self.frames_chunk_size or images
        outputs = []
        for start in range(0, images, chunk):
            # Slices taken here are views of tensors alive anyway: a checkpoint stores nothing new.
            args = [t[start:start + chunk] for t in (flat_targets, flat_coords, *flat_levels)]
            if checkpoint and torch.is_grad_enabled():
                outputs.append(checkpoint_fn(self._lookup, *args, use_reentrant=False))
            else:
                outputs.append(self._lookup(*args))
        out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return out.unflatten(0, (batch, frames))

    def _lookup(self, targets: Tensor, coords: Tensor, *levels: Tensor) -> Tensor:
        """n images: targets (n, N, C), coords (n, N, 2), levels (n, C, h, w) -> (n, N, levels * (2r+1)^2)."""
        n, num_points, channels = targets.shape
        window = 2 * self.radius + 1
        delta = window_offsets(self.radius, coords.device, coords.dtype).view(1, window, window, 2)
        out = []
        for level, fmaps in enumerate(levels):
            height, width = fmaps.shape[-2:]
            corrs = torch.matmul(targets, fmaps.reshape(n, channels, height * width)) / math.sqrt(channels)
            centroids = coords.reshape(n * num_points, 1, 1, 2) / 2**level
            sampled = bilinear_sampler(corrs.reshape(-1, 1, height, width), centroids + delta, padding_mode="zeros")
            out.append(sampled.view(n, num_points, -1))
        return torch.cat(out, dim=-1)
