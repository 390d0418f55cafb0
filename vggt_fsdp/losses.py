"""VGGT's training losses: camera, depth, point and track.

Each loss returns a dict of named scalar terms; `compute_loss` weights and sums the enabled ones.
Nothing here calls `.item()` or branches on tensor values on the host, so a training step does not
synchronise with the device for the loss (empty masks are handled by masked means, not by `if`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Union

import torch

from vggt_fsdp.geometry import extrinsics_intrinsics_to_pose_encoding


@dataclass
class CameraLossConfig:
    enabled: bool = True
    weight: float = 5.0
    kind: Literal["l1", "l2"] = "l1"
    gamma: float = 0.6  # iteration i of n is weighted gamma ** (n - 1 - i)
    weight_trans: float = 1.0
    weight_rot: float = 1.0
    weight_focal: float = 0.5
    min_valid_points: int = 100  # a scene whose first frame has at most this many valid GT points is skipped
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
    gradient_conf: bool = False  # confidence-weight the gradient term too (upstream's "+conf" variants)
    min_valid_points: int = 100  # fewer valid GT pixels in the batch: the loss is zero
    quantile: float = 0.98  # drop per-pixel errors above this quantile (<= 0 disables)
    quantile_min_elements: int = 1000  # at most this many valid pixels, before or after the cut: no cut
    hard_max: float = 100.0  # per-pixel error cap before the quantile


def _point_default() -> DenseLossConfig:
    return DenseLossConfig(gradient="normal", gradient_scales=3)


@dataclass
class TrackLossConfig:
    """Upstream's track loss (the paper's weight 0.05; the terms of its unreleased training code, see
    `track_loss`). Off unless the recipe enables the track head (`Recipe.validate` resolves "auto")."""

    enabled: Union[bool, Literal["auto"]] = "auto"  # auto: on exactly when model.heads.track is
    weight: float = 0.05
    gamma: float = 0.8  # iteration i of n is weighted gamma ** (n - 1 - i)
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
        names = ("camera", "depth", "point", "track")
        if not any(getattr(self, name).enabled for name in names):
            raise ValueError("every loss is disabled (loss.camera/depth/point/track.enabled): nothing to train")
        for name in names:
            sub = getattr(self, name)
            if sub.weight < 0:
                raise ValueError(f"loss.{name}.weight={sub.weight} must be >= 0")
        for field_name in ("camera.trans_clamp", "depth.hard_max", "point.hard_max", "track.conf_radius_px"):
            section, attr = field_name.split(".")
            if getattr(getattr(self, section), attr) <= 0:
                raise ValueError(f"loss.{field_name}={getattr(getattr(self, section), attr)} must be > 0")
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


# ----------------------------------------------------------------------------------------------------
# Total


def compute_loss(
    predictions: Mapping[str, object], batch: Mapping[str, torch.Tensor], cfg: LossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the enabled losses and a dict of detached terms for logging.

    An enabled loss whose prediction is missing raises: either the head is off (turn the loss off
    too) or the model is not returning what the loss needs; silently skipping would train nothing.
    """
    terms: dict[str, torch.Tensor] = {}
    parts: list[torch.Tensor] = []
    if cfg.camera.enabled:
        cam = camera_loss(_need(predictions, "pose_enc_list", "camera"), batch, cfg.camera)
        terms.update(cam)
        parts.append(cam["loss_camera"] * cfg.camera.weight)
    if cfg.depth.enabled:
        pred = _need(predictions, "depth", "depth")
        conf = _need(predictions, "depth_conf", "depth")
        dense = dense_loss(pred, conf, batch["depths"][..., None], batch["point_masks"], cfg.depth, "depth")
        terms.update(dense)
        parts.append(dense["loss_depth"] * cfg.depth.weight)
    if cfg.point.enabled:
        pred = _need(predictions, "world_points", "point")
        conf = _need(predictions, "world_points_conf", "point")
        dense = dense_loss(pred, conf, batch["world_points"], batch["point_masks"], cfg.point, "point")
        terms.update(dense)
        parts.append(dense["loss_point"] * cfg.point.weight)
    if track_enabled(cfg.track, predictions):
        tracks = predictions.get("track_list") or [_need(predictions, "track", "track")]
        trk = track_loss(tracks, _need(predictions, "vis_logits", "track"), predictions.get("conf_logits"), batch,
                         cfg.track)
        terms.update(trk)
        parts.append(trk["loss_track_total"] * cfg.track.weight)
    if not parts:
        raise ValueError("every loss is disabled (loss.camera/depth/point/track.enabled): nothing to train")
    total = torch.stack(parts).sum()
    terms["loss_objective"] = total
    return total, {name: value.detach() for name, value in terms.items()}


def track_enabled(cfg: TrackLossConfig, predictions: Mapping[str, object]) -> bool:
    """The track loss applies when enabled, or with "auto" (a loss config not resolved by a recipe) when the
    model tracked (its predictions hold tracks)."""
    return cfg.enabled is True or (cfg.enabled == "auto" and "track_list" in predictions)


def _need(predictions: Mapping[str, object], key: str, loss: str):
    if key not in predictions:
        raise KeyError(f"loss.{loss}.enabled is true but the model returned no {key!r} (keys: "
                       f"{sorted(predictions)}); enable the {loss} head or set loss.{loss}.enabled=false")
    return predictions[key]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is true; 0 (with a graph) when the mask is empty. No host sync."""
    values = torch.where(mask, values, torch.zeros_like(values))
    return values.sum() / mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------------
# Camera


def camera_loss(
    pose_enc_list: list[torch.Tensor], batch: Mapping[str, torch.Tensor], cfg: CameraLossConfig
) -> dict[str, torch.Tensor]:
    """L1 (or L2) on the pose encoding of every refinement iteration, later iterations weighted more.

    As upstream, a scene whose first frame has at most `min_valid_points` valid ground-truth pixels is
    left out entirely: its ground truth is expressed in that frame and scaled by its points, so too
    few of them make the whole scene's targets unreliable. Every frame of the other scenes counts.
    """
    image_hw = tuple(batch["images"].shape[-2:])
    gt = extrinsics_intrinsics_to_pose_encoding(batch["extrinsics"].float(), batch["intrinsics"].float(), image_hw)
    valid_scene = batch["point_masks"][:, 0].flatten(1).sum(-1) > cfg.min_valid_points  # (B,)
    valid = valid_scene[:, None].expand(gt.shape[:2])  # (B, S)
    n = len(pose_enc_list)
    sums = [gt.new_zeros(()) for _ in range(3)]
    for i, pred in enumerate(pose_enc_list):
        stage_weight = cfg.gamma ** (n - 1 - i)
        for k, err in enumerate(_pose_errors(pred.float(), gt, cfg)):
            sums[k] = sums[k] + stage_weight * _masked_mean(err, valid[..., None].expand_as(err))
    loss_t, loss_r, loss_fl = (s / n for s in sums)
    total = cfg.weight_trans * loss_t + cfg.weight_rot * loss_r + cfg.weight_focal * loss_fl
    return {"loss_camera": total, "loss_T": loss_t, "loss_R": loss_r, "loss_FL": loss_fl}


def _pose_errors(pred: torch.Tensor, gt: torch.Tensor, cfg: CameraLossConfig) -> list[torch.Tensor]:
    """Per-element (l1) or per-frame (l2) errors of translation, rotation and field of view."""
    slices = (slice(0, 3), slice(3, 7), slice(7, 9))
    if cfg.kind == "l1":
        errs = [(pred[..., s] - gt[..., s]).abs() for s in slices]
    else:
        errs = [(pred[..., s] - gt[..., s]).norm(dim=-1, keepdim=True) for s in slices]
    errs[0] = errs[0].clamp(max=cfg.trans_clamp)  # one wild translation must not dominate the batch
    return errs


# ----------------------------------------------------------------------------------------------------
# Depth and point maps


def dense_loss(
    pred: torch.Tensor,
    conf: torch.Tensor,
    gt: torch.Tensor,
    mask: torch.Tensor,
    cfg: DenseLossConfig,
    name: str,
) -> dict[str, torch.Tensor]:
    """Confidence-weighted, plain and gradient terms for a (B, S, H, W, C) prediction.

    loss_conf = conf_gamma * conf * |err| - alpha * log(conf), loss_reg = |err| (|.| the Euclidean norm
    over C), both averaged over valid pixels after dropping those above the `quantile` of the batch.
    """
    pred, conf, gt = pred.float(), conf.float(), gt.float()
    mask = mask & torch.isfinite(gt).all(-1)
    enough = mask.sum() >= cfg.min_valid_points
    mask = mask & enough  # too few valid pixels: every term becomes an empty (zero) mean
    # Outside the mask every input is replaced by a harmless constant: a NaN there (invalid GT, or a
    # prediction nobody supervises) would otherwise leak into the gradient through 0 * NaN.
    gt = torch.where(mask[..., None], gt, torch.zeros_like(gt))
    pred = torch.where(mask[..., None], pred, torch.zeros_like(pred))
    conf = torch.where(mask, conf, torch.ones_like(conf))
    err = (pred - gt).norm(dim=-1)
    loss_conf = _quantile_filtered_mean(_conf_weight(err, conf, cfg), mask, cfg)
    loss_reg = _quantile_filtered_mean(err, mask, cfg)
    grad_conf = conf if cfg.gradient_conf else None
    if cfg.gradient == "grad":
        loss_grad = _multi_scale(_gradient_loss, pred, gt, mask, grad_conf, cfg)
    elif cfg.gradient == "normal":
        loss_grad = _multi_scale(_normal_loss, pred, gt, mask, grad_conf, cfg)
    else:
        loss_grad = pred.new_zeros(())
    total = loss_conf + loss_reg + cfg.gradient_weight * loss_grad
    return {f"loss_{name}": total, f"loss_conf_{name}": loss_conf,
            f"loss_reg_{name}": loss_reg, f"loss_grad_{name}": loss_grad}


def _quantile_filtered_mean(values: torch.Tensor, mask: torch.Tensor, cfg: DenseLossConfig) -> torch.Tensor:
    """Mean over `mask` of values capped at hard_max, without those above the batch's quantile.

    Upstream cuts only when more than `quantile_min_elements` values exist before and after the cut.
    The threshold is found by sorting with invalid entries pushed to the end, so the count of valid
    entries never leaves the device.
    """
    values = values.clamp(max=cfg.hard_max)
    if cfg.quantile <= 0:
        return _masked_mean(values, mask)
    flat = torch.where(mask, values, torch.full_like(values, float("inf"))).flatten()
    count = mask.sum()
    sorted_vals = flat.detach().sort().values
    # "nearest" quantile of the valid entries: index round(q * (count - 1)).
    index = torch.round(cfg.quantile * (count - 1).clamp_min(0).float()).long()
    threshold = sorted_vals.gather(0, index.reshape(1)).squeeze(0)
    keep = mask & (values < threshold)
    use_cut = (count > cfg.quantile_min_elements) & (keep.sum() > cfg.quantile_min_elements)
    return _masked_mean(values, torch.where(use_cut, keep, mask))


def _multi_scale(fn, pred, gt, mask, conf, cfg: DenseLossConfig) -> torch.Tensor:
    """Average of `fn` over 2^k-subsampled maps, k < gradient_scales; maps flattened to (B*S, H, W, C)."""
    b, s, h, w, c = pred.shape
    pred, gt, mask = pred.reshape(b * s, h, w, c), gt.reshape(b * s, h, w, c), mask.reshape(b * s, h, w)
    conf = conf.reshape(b * s, h, w) if conf is not None else None
    total = pred.new_zeros(())
    for k in range(cfg.gradient_scales):
        step = 2 ** k
        sub_conf = conf[:, ::step, ::step] if conf is not None else None
        total = total + fn(pred[:, ::step, ::step], gt[:, ::step, ::step], mask[:, ::step, ::step],
                           sub_conf, cfg)
    return total / cfg.gradient_scales


def _conf_weight(loss: torch.Tensor, conf: torch.Tensor | None, cfg: DenseLossConfig) -> torch.Tensor:
    if conf is None:
        return loss
    return cfg.conf_gamma * loss * conf - cfg.conf_alpha * torch.log(conf)


def _gradient_loss(pred, gt, mask, conf, cfg: DenseLossConfig) -> torch.Tensor:
    """L1 of the spatial differences of the error map: penalises error that varies between neighbours,
    i.e. wrong local shape, regardless of a constant offset. Normalised by the valid pixel count."""
    m = mask[..., None].expand_as(pred)
    diff = pred - gt  # zero outside the mask: dense_loss already replaced both there
    grad_x = (diff[:, :, 1:] - diff[:, :, :-1]).abs().clamp(max=cfg.hard_max)
    grad_y = (diff[:, 1:] - diff[:, :-1]).abs().clamp(max=cfg.hard_max)
    mask_x = m[:, :, 1:] & m[:, :, :-1]
    mask_y = m[:, 1:] & m[:, :-1]
    if conf is not None:
        c = conf[..., None].expand_as(pred)
        grad_x = _conf_weight(grad_x, c[:, :, 1:], cfg)
        grad_y = _conf_weight(grad_y, c[:, 1:], cfg)
    zero = pred.new_zeros(())
    total = torch.where(mask_x, grad_x, zero).sum() + torch.where(mask_y, grad_y, zero).sum()
    return total / m.sum().clamp_min(1)


def _normal_loss(pred, gt, mask, conf, cfg: DenseLossConfig) -> torch.Tensor:
    """1 - cos between surface normals of predicted and GT point maps (4 neighbour cross products)."""
    pred_n, pred_valid = _point_map_normals(pred, mask)
    gt_n, gt_valid = _point_map_normals(gt, mask)
    valid = pred_valid & gt_valid  # (4, N, H, W)
    eps = 1e-8
    loss = 1 - (pred_n * gt_n).sum(-1).clamp(-1 + eps, 1 - eps)
    if conf is not None:
        loss = _conf_weight(loss, conf[None].expand_as(loss), cfg)
    # Upstream ignores the term when fewer than 10 normals are valid.
    return torch.where(valid.sum() >= 10, _masked_mean(loss, valid), loss.new_zeros(()))


def _point_map_normals(points: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W, 3) points -> normals (4, N, H, W, 3) from the 4 neighbour pairs, and their validity."""
    pts = torch.nn.functional.pad(points.permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)
    m = torch.nn.functional.pad(mask, (1, 1, 1, 1))
    centre = pts[:, 1:-1, 1:-1]
    up, left = pts[:, :-2, 1:-1] - centre, pts[:, 1:-1, :-2] - centre
    down, right = pts[:, 2:, 1:-1] - centre, pts[:, 1:-1, 2:] - centre
    mc = m[:, 1:-1, 1:-1]
    mu, ml, md, mr = m[:, :-2, 1:-1], m[:, 1:-1, :-2], m[:, 2:, 1:-1], m[:, 1:-1, 2:]
    normals = torch.stack([torch.cross(up, left, dim=-1), torch.cross(left, down, dim=-1),
                           torch.cross(down, right, dim=-1), torch.cross(right, up, dim=-1)])
    valid = torch.stack([mu & ml, ml & md, md & mr, mr & mu]) & mc
    return torch.nn.functional.normalize(normals, dim=-1, eps=1e-6), valid


# ----------------------------------------------------------------------------------------------------
# Tracks


def track_loss(
    track_list: list[torch.Tensor],
    vis_logits: torch.Tensor,
    conf_logits: torch.Tensor | None,
    batch: Mapping[str, torch.Tensor],
    cfg: TrackLossConfig,
) -> dict[str, torch.Tensor]:
    """Tracks (B, S, N, 2) in pixels over refinement iterations, visibility and confidence logits (B, S, N).

    As upstream's training code (its `sequence_loss` and track terms, unreleased but in the repository):
    only queries visible in the first frame (where they are defined) count; the track term is the L1
    (mean over x, y) of the frames where the point is visible, per iteration, weighted gamma ** (n - 1 - i)
    and averaged over the n iterations; visibility is binary cross-entropy against the ground-truth
    visibility over every frame of those queries, and confidence binary cross-entropy against "the final
    track is within conf_radius_px of the ground truth" (upstream: 3 px), both on logits as upstream
    (a bf16 probability saturates at 1 and would stop the gradient of a confidently wrong prediction).
    """
    if "tracks" not in batch:
        raise KeyError("loss.track.enabled is true but the batch has no ground-truth 'tracks' (only "
                       "data.source=synthetic provides them); set loss.track.enabled=false")
    gt = batch["tracks"].float()
    gt_vis = batch["track_vis_mask"].bool()
    valid = gt_vis[:, :1].expand_as(gt_vis)  # (B, S, N): query visible in frame 0
    supervised = valid & gt_vis
    n = len(track_list)
    loss_track = gt.new_zeros(())
    for i, pred in enumerate(track_list):
        err = (pred.float() - gt).abs().mean(-1)
        loss_track = loss_track + cfg.gamma ** (n - 1 - i) * _masked_mean(err, supervised)
    loss_track = loss_track / n
    loss_vis = _masked_mean(_bce_logits(vis_logits.float(), gt_vis.float()), valid)
    if conf_logits is not None:
        close = (track_list[-1].detach().float() - gt).norm(dim=-1) < cfg.conf_radius_px
        loss_conf = _masked_mean(_bce_logits(conf_logits.float(), close.float()), valid)
    else:
        loss_conf = gt.new_zeros(())
    total = loss_track + cfg.weight_vis * loss_vis + cfg.weight_conf * loss_conf
    return {"loss_track_total": total, "loss_track": loss_track, "loss_vis": loss_vis, "loss_track_conf": loss_conf}


def _bce_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Elementwise binary cross-entropy of logits (no reduction: the masked mean follows)."""
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
