"""Photometric augmentation: colour jitter and grayscale (crop and zoom: vggt_fsdp.data.crop).

Random draws come from a numpy Generator the caller seeds from (seed, step, rank, scene slot), so an
augmented batch is a pure function of those numbers whichever worker builds it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from vggt_fsdp.data.config import AugmentConfig


_LUMA = torch.tensor([0.299, 0.587, 0.114])
_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)


def photometric_frames(images: list[torch.Tensor], rng: np.random.Generator, cfg: AugmentConfig | None,
                       frame_rngs: list[np.random.Generator] | None = None) -> torch.Tensor:
    """`photometric` on each frame of a scene, stacked; with probability cojitter_prob (drawn from the
    scene's `rng`) every frame repeats one draw (the same random numbers), so the scene keeps consistent
    colours. Otherwise frame i draws from `frame_rngs[i]` (its own generator; default: `rng` for all)."""
    if cfg is None or not cfg.enabled:
        return torch.stack(images)
    if rng.uniform() < cfg.cojitter_prob:
        seed = int(rng.integers(2**63))
        return torch.stack([photometric(image, np.random.default_rng(seed), cfg) for image in images])
    frame_rngs = frame_rngs if frame_rngs is not None else [rng] * len(images)
    return torch.stack([photometric(image, frame_rng, cfg) for image, frame_rng in zip(images, frame_rngs)])


def photometric(image: torch.Tensor, rng: np.random.Generator, cfg: AugmentConfig | None) -> torch.Tensor:
    """Colour jitter (brightness, contrast, saturation, hue) then grayscale, on (3, H, W) in [0, 1]."""
    if cfg is None or not cfg.enabled:
        return image
    if rng.uniform() < cfg.color_jitter_prob:
        luma = _LUMA.to(image)
        image = image * rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
        mean = (image * luma[:, None, None]).sum(0).mean()
        image = (image - mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
        gray = (image * luma[:, None, None]).sum(0, keepdim=True)
        image = (image - gray) * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation) + gray
        image = _rotate_hue(image.clamp(0, 1), rng.uniform(-cfg.hue, cfg.hue))
    if rng.uniform() < cfg.grayscale_prob:
        image = (image * _LUMA.to(image)[:, None, None]).sum(0, keepdim=True).expand(3, -1, -1)
    return image.clamp(0, 1).contiguous()


def _rotate_hue(image: torch.Tensor, turns: float) -> torch.Tensor:
    """Hue shift by rotating chroma in YIQ space: a 3x3 colour matrix, cheap enough for every frame."""
    angle = 2 * math.pi * turns
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    matrix = (_FROM_YIQ @ rot @ _TO_YIQ).to(image)
    return torch.einsum("ij,jhw->ihw", matrix, image)
