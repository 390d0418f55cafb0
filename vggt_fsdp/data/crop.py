"""Fitting a frame to the batch's image size as upstream does, with intrinsics kept exact.

Per frame (base_dataset.process_one_image at facebookresearch/vggt):
1. crop: a window centred on the principal point, as large as fits; in training its height and width
   are first scaled by factors drawn from augment.crop_scale_range (capped at 1), upstream's random crop;
2. resize by ONE factor for both axes, so that the window covers the target size plus
   data.resize_margin pixels, plus (training) a random zoom of up to augment.zoom_max times the
   target's longer side;
3. crop the target size, centred on the principal point.

Upstream rounds the resized size and then scales the intrinsics by the ratio of the rounded sizes
(slightly different per axis, fx/fy drift by ~0.03%). Here the resize samples the image at exactly
the planned factor (`F.interpolate(scale_factor=..., recompute_scale_factor=False)`), so a coordinate
maps exactly as the intrinsics say, fx/fy keep the source's ratio, and every crop is whole pixels.

Coordinates follow vggt_fsdp.geometry (pixel centres at integers): a window's edges are at
integer - 0.5, and resizing by s maps x to (x + 0.5) s - 0.5.
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
    """A whole-pixel window: columns [x0, x0 + width), rows [y0, y0 + height)."""

    x0: int
    y0: int
    width: int
    height: int


@dataclass(frozen=True)
class CropPlan:
    """crop `first` from the source, resize it by `scale`, crop `second` from the result."""

    first: CropBox
    scale: float
    second: CropBox

    def resized_hw(self) -> tuple[int, int]:
        """The size of the resized window (what F.interpolate makes of `first` at `scale`)."""
        return math.floor(self.first.height * self.scale), math.floor(self.first.width * self.scale)


def centred_window(centre: float, half: float, size: int) -> tuple[int, int]:
    """[start, stop) of whole pixels of a `size`-pixel axis around edge coordinate `centre` (edge
    coordinates: pixel i spans [i, i + 1]), at most `half` either side and inside the axis."""
    half = min(half, centre, size - centre)
    start = max(0, min(size - 1, round(centre - half)))
    return start, max(start + 1, min(size, round(centre + half)))


def plan_crop(rng: np.random.Generator, src_hw: tuple[int, int], principal_point: tuple[float, float],
              out_hw: tuple[int, int], margin: int, augment: AugmentConfig | None) -> CropPlan:
    """The crop-resize-crop of one frame (see the module docstring); random draws only when
    `augment` is given and enabled, in upstream's order (crop scales, then zoom)."""
    src_h, src_w = src_hw
    out_h, out_w = out_hw
    # in edge coordinates the principal point is half a pixel further than in pixel coordinates
    px, py = principal_point[0] + 0.5, principal_point[1] + 0.5
    if not (0 < px < src_w and 0 < py < src_h):
        raise ValueError(f"principal point {principal_point} lies outside the {src_w}x{src_h} image")
    keep_h, keep_w, zoom = 1.0, 1.0, 0.0
    if augment is not None and augment.enabled:
        lo, hi = augment.crop_scale_range
        keep_h, keep_w = rng.uniform(lo, hi, 2) if augment.crop_scale_per_axis else [rng.uniform(lo, hi)] * 2
        keep_h, keep_w = min(float(keep_h), 1.0), min(float(keep_w), 1.0)
        if augment.zoom_max > 0:
            zoom = float(rng.triangular(0.0, 0.0, augment.zoom_max))
    x0, x1 = centred_window(px, math.floor(src_w * keep_w) / 2, src_w)
    y0, y1 = centred_window(py, math.floor(src_h * keep_h) / 2, src_h)
    first = CropBox(x0, y0, x1 - x0, y1 - y0)
    extra = margin + zoom * max(out_h, out_w)
    scale = max((out_h + extra) / first.height, (out_w + extra) / first.width)
    # floor(size * scale) must reach the target: nudge the factor past float rounding
    while math.floor(first.height * scale) < out_h or math.floor(first.width * scale) < out_w:
        scale = math.nextafter(scale, math.inf)
    res_h, res_w = math.floor(first.height * scale), math.floor(first.width * scale)
    sx = min(max(round((px - x0) * scale - out_w / 2), 0), res_w - out_w)
    sy = min(max(round((py - y0) * scale - out_h / 2), 0), res_h - out_h)
    return CropPlan(first, scale, CropBox(sx, sy, out_w, out_h))


def plan_intrinsics(intrinsics: torch.Tensor, plan: CropPlan) -> torch.Tensor:
    """Intrinsics (..., 3, 3) of the frame `apply_plan` makes (exact: shift, scale about pixel
    edges, shift)."""
    k = intrinsics.clone()
    s = plan.scale
    k[..., 0, 0] = intrinsics[..., 0, 0] * s
    k[..., 1, 1] = intrinsics[..., 1, 1] * s
    k[..., 0, 1] = intrinsics[..., 0, 1] * s
    k[..., 0, 2] = (intrinsics[..., 0, 2] + 0.5 - plan.first.x0) * s - 0.5 - plan.second.x0
    k[..., 1, 2] = (intrinsics[..., 1, 2] + 0.5 - plan.first.y0) * s - 0.5 - plan.second.y0
    return k


def apply_plan(image: torch.Tensor, depth: torch.Tensor, mask: torch.Tensor, plan: CropPlan
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop, resize and crop one frame: image (3, H, W) bilinear (antialiased when shrinking); depth
    and mask nearest (interpolating depth across an occlusion edge would invent surfaces)."""
    a, b = plan.first, plan.second
    image = image[:, a.y0:a.y0 + a.height, a.x0:a.x0 + a.width]
    both = torch.stack([depth[a.y0:a.y0 + a.height, a.x0:a.x0 + a.width],
                        mask[a.y0:a.y0 + a.height, a.x0:a.x0 + a.width].to(depth.dtype)])
    if plan.scale != 1.0:
        factor = (plan.scale, plan.scale)
        image = F.interpolate(image[None], scale_factor=factor, mode="bilinear", align_corners=False,
                              antialias=plan.scale < 1, recompute_scale_factor=False)[0]
        both = F.interpolate(both[None], scale_factor=factor, mode="nearest-exact",
                             recompute_scale_factor=False)[0]
    rows, cols = slice(b.y0, b.y0 + b.height), slice(b.x0, b.x0 + b.width)
    return image[:, rows, cols].clamp(0, 1), both[0, rows, cols], both[1, rows, cols] > 0.5
