"""Per-frame augmentation: crop-scale (with matching intrinsics), colour jitter and grayscale.

Random draws come from a numpy Generator the caller seeds from (seed, step, rank, scene slot), so an
augmented batch is a pure function of those numbers whichever worker builds it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vggt_fsdp.data.config import AugmentConfig


@dataclass(frozen=True)
class CropBox:
    """A window of a source image in pixels: columns [x0, x0 + width), rows [y0, y0 + height)."""

    x0: float
    y0: float
    width: float
    height: float


def draw_crop(rng: np.random.Generator, src_hw: tuple[int, int], out_hw: tuple[int, int],
              principal_point: tuple[float, float], cfg: AugmentConfig | None) -> CropBox:
    """A window of the output's aspect ratio centred on the principal point, as upstream crops, so
    the principal point stays at the image centre that the pose encoding assumes.

    The window is the largest that fits centred; crop-scale augmentation scales its sides by a random
    factor from crop_scale_range capped at 1 (a zoom in). Without augmentation (cfg None or disabled)
    it is the largest.
    """
    src_h, src_w = src_hw
    cx, cy = principal_point
    half_w_max, half_h_max = min(cx, src_w - cx), min(cy, src_h - cy)
    if half_w_max <= 0 or half_h_max <= 0:
        raise ValueError(f"principal point {principal_point} lies outside the {src_w}x{src_h} image")
    aspect = out_hw[0] / out_hw[1]
    width = min(2 * half_w_max, 2 * half_h_max / aspect)
    if cfg is not None and cfg.enabled:
        width *= min(1.0, rng.uniform(*cfg.crop_scale_range))
    height = width * aspect
    return CropBox(cx - width / 2, cy - height / 2, width, height)


def crop_intrinsics(intrinsics: torch.Tensor, box: CropBox, out_hw: tuple[int, int]) -> torch.Tensor:
    """Intrinsics of the image made by cropping `box` and resizing it to out_hw: image coordinates
    (continuous, see vggt_fsdp.geometry) map as x' = (x - x0) * s."""
    sx, sy = out_hw[1] / box.width, out_hw[0] / box.height
    k = intrinsics.clone()
    k[..., 0, 0] = intrinsics[..., 0, 0] * sx
    k[..., 1, 1] = intrinsics[..., 1, 1] * sy
    k[..., 0, 1] = intrinsics[..., 0, 1] * sx
    k[..., 0, 2] = (intrinsics[..., 0, 2] - box.x0) * sx
    k[..., 1, 2] = (intrinsics[..., 1, 2] - box.y0) * sy
    return k


def crop_resize(image: torch.Tensor, depth: torch.Tensor, mask: torch.Tensor, box: CropBox,
                out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop and resize one frame: image (3, H, W) bilinear with antialiasing; depth and mask nearest
    (interpolating depth across an occlusion edge would invent surfaces that do not exist)."""
    if box != rounded_box(box):
        raise ValueError(f"crop_resize needs a whole-pixel box (see rounded_box), got {box}")
    x0, y0, x1, y1 = int(box.x0), int(box.y0), int(box.x0 + box.width), int(box.y0 + box.height)
    image = image[:, y0:y1, x0:x1][None]
    image = F.interpolate(image, size=out_hw, mode="bilinear", align_corners=False, antialias=True)[0]
    both = torch.stack([depth[y0:y1, x0:x1], mask[y0:y1, x0:x1].to(depth.dtype)])[None]
    both = F.interpolate(both, size=out_hw, mode="nearest-exact")[0]
    return image.clamp(0, 1), both[0], both[1] > 0.5


def rounded_box(box: CropBox) -> CropBox:
    """The whole-pixel window `crop_resize` actually cuts (at least one pixel), for matching intrinsics."""
    x0, y0 = int(round(box.x0)), int(round(box.y0))
    x1, y1 = max(x0 + 1, int(round(box.x0 + box.width))), max(y0 + 1, int(round(box.y0 + box.height)))
    return CropBox(x0, y0, x1 - x0, y1 - y0)


_LUMA = torch.tensor([0.299, 0.587, 0.114])
_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)


def photometric_frames(images: list[torch.Tensor], rng: np.random.Generator,
                       cfg: AugmentConfig | None) -> torch.Tensor:
    """`photometric` on each frame of a scene, stacked; with probability cojitter_prob every frame
    repeats one draw (the same random numbers), so the scene keeps consistent colours."""
    if cfg is None or not cfg.enabled:
        return torch.stack(images)
    if rng.uniform() < cfg.cojitter_prob:
        seed = int(rng.integers(2**63))
        return torch.stack([photometric(image, np.random.default_rng(seed), cfg) for image in images])
    return torch.stack([photometric(image, rng, cfg) for image in images])


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
