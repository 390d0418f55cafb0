"""VGGT's training losses: camera, depth, point and track.

Each loss returns a dict of named scalar terms; `compute_loss` weights and sums the enabled ones.
Nothing here calls `.item()` or branches on tensor values on the host, so a training step does not
synchronise with the device for the loss (empty masks are handled by masked means, not by `if`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class CameraLossConfig:
    enabled: bool = True
    weight: float = 5.0
    kind: Literal["l1", "l2"] = "l1"
    gamma: float = 0.6  # iteration i of n is weighted gamma ** (n - 1 - i)
    weight_trans: float = 1.0
    weight_rot: float = 1.0
    weight_focal: float = 0.5
    min_valid_points: int = 100  # a frame with fewer valid GT points gives no camera supervision
    trans_clamp: float = 100.0  # per-element translation error cap (upstream's outlier guard)


@dataclass
class DenseLossConfig:
    """Depth or point-map loss: confidence-weighted error, plain error and a gradient term."""

    enabled: bool = True
    weight: float = 1.0
    conf_alpha: float = 0.2  # conf * |err| - alpha * log(conf)
    conf_gamma: float = 1.0  # scale of the confidence-weighted error
    gradient: Literal["grad", "normal", "none"] = "grad"
    gradient_scales: int = 4
    gradient_weight: float = 1.0
    quantile: float = 0.98  # drop per-pixel errors above this quantile (<= 0 disables)
    quantile_min_elements: int = 1000  # fewer valid pixels than this: no quantile cut
    hard_max: float = 100.0  # per-pixel error cap before the quantile


def _point_default() -> DenseLossConfig:
    return DenseLossConfig(gradient="normal", gradient_scales=3)


@dataclass
class TrackLossConfig:
    enabled: bool = False  # upstream never trained the track head; it is opt-in here
    weight: float = 0.05
    gamma: float = 0.8  # per-iteration weighting of the tracker's refinement steps
    weight_vis: float = 1.0
    weight_conf: float = 1.0
    conf_radius_px: float = 3.0  # a track is "confident" when within this many pixels of GT


@dataclass
class LossConfig:
    camera: CameraLossConfig = field(default_factory=CameraLossConfig)
    depth: DenseLossConfig = field(default_factory=DenseLossConfig)
    point: DenseLossConfig = field(default_factory=_point_default)
    track: TrackLossConfig = field(default_factory=TrackLossConfig)

    def validate(self) -> None:
        for name in ("camera", "depth", "point", "track"):
            sub = getattr(self, name)
            if sub.weight < 0:
                raise ValueError(f"loss.{name}.weight={sub.weight} must be >= 0")
        for name in ("depth", "point"):
            sub = getattr(self, name)
            if sub.gradient_scales < 1:
                raise ValueError(f"loss.{name}.gradient_scales={sub.gradient_scales} must be >= 1")
            if sub.quantile > 1.0:
                raise ValueError(f"loss.{name}.quantile={sub.quantile} must be <= 1 (<= 0 disables)")
            if sub.conf_alpha < 0:
                raise ValueError(f"loss.{name}.conf_alpha={sub.conf_alpha} must be >= 0")
        for name in ("camera", "track"):
            gamma = getattr(self, name).gamma
            if not 0.0 < gamma <= 1.0:
                raise ValueError(f"loss.{name}.gamma={gamma} must be in (0, 1]")
