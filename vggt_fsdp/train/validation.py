"""Periodic validation on the held-out split: loss, camera AUC@30 and depth AbsRel.

Camera AUC@30 as upstream evaluates pose: for every ordered pair of frames (i < j) of a scene, the
relative pose error is max(rotation angle error, translation direction angle error) in degrees (the
direction error folded to [0, 90] because the sign of a direction from a scale-free pose is
ambiguous); the AUC is the mean, over thresholds t = 1..30 degrees, of the fraction of pairs with error
below t. Depth AbsRel is mean(|pred - gt| / gt) over valid pixels, in the normalised scene scale the
model is trained to predict (no per-frame alignment, so a scale error counts).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

AUC_MAX_DEG = 30


def rotation_angle_deg(rot_a: torch.Tensor, rot_b: torch.Tensor) -> torch.Tensor:
    """Angle of rot_a^T rot_b, (...,3,3) -> (...), in degrees."""
    rel = rot_a.transpose(-1, -2) @ rot_b
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


def direction_angle_deg(t_a: torch.Tensor, t_b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Angle between directions, folded to [0, 90] (sign ambiguity), (...,3) -> (...)."""
    cos = (t_a * t_b).sum(-1) / (t_a.norm(dim=-1) * t_b.norm(dim=-1)).clamp_min(eps)
    angle = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))
    return torch.minimum(angle, 180.0 - angle)


def relative_pose(extrinsics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs i < j of (S,3,4) camera-from-world poses: rotation and translation of cam_j from cam_i."""
    s = extrinsics.shape[0]
    i, j = torch.triu_indices(s, s, offset=1, device=extrinsics.device)
    rot, trans = extrinsics[:, :3, :3], extrinsics[:, :3, 3]
    rel_rot = rot[j] @ rot[i].transpose(-1, -2)
    rel_trans = trans[j] - (rel_rot @ trans[i][..., None])[..., 0]
    return rel_rot, rel_trans


def pair_errors_deg(pred_extrinsics: torch.Tensor, gt_extrinsics: torch.Tensor) -> torch.Tensor:
    """max(rotation, translation-direction) error of every frame pair of one scene, degrees."""
    pred_r, pred_t = relative_pose(pred_extrinsics.float())
    gt_r, gt_t = relative_pose(gt_extrinsics.float())
    return torch.maximum(rotation_angle_deg(pred_r, gt_r), direction_angle_deg(pred_t, gt_t))


def auc_from_errors(errors: torch.Tensor, max_deg: int = AUC_MAX_DEG) -> torch.Tensor:
    """Mean over t = 1..max_deg of the fraction of errors below t."""
    thresholds = torch.arange(1, max_deg + 1, device=errors.device, dtype=errors.dtype)
    return (errors[:, None] < thresholds[None, :]).float().mean(0).mean()


def abs_rel_sums(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of |pred-gt|/gt over valid pixels, number of valid pixels)."""
    valid = mask & (gt > 0)
    rel = (pred.float() - gt.float()).abs() / gt.float().clamp_min(1e-6)
    return torch.where(valid, rel, torch.zeros_like(rel)).sum(), valid.sum().float()


class Validator:
    """Callable(step) -> {"loss", "camera_auc30", "depth_absrel"} averaged over all ranks' batches.

    Under context parallelism the N ranks of a group validate the same scenes and each computes the
    metrics on the whole scene (the model's predictions come back gathered): the sums over ranks count
    each scene N times, in the numerators and the denominators alike, so the averages are exact."""

    def __init__(self, recipe, model: nn.Module, task, device: torch.device, rank: int, world: int,
                 frames_per_gpu: int):
        from vggt_fsdp.data import build_dataloader

        self.model, self.task, self.device = model, task, device
        self.batches = recipe.train.val_batches
        # A fresh loader per validation: the same held-out batches every time, comparable over steps.
        self.make_loader = lambda: build_dataloader(recipe.data, rank=rank, world_size=world, split="val",
                                                    frames_per_gpu=frames_per_gpu, num_workers=0,
                                                    context_parallel=recipe.parallel.context_parallel)

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float]:
        from vggt_fsdp.geometry import pose_encoding_to_extrinsics_intrinsics
        from vggt_fsdp.losses import compute_loss

        # sums: loss, batches, AUC sum, scenes with pose, AbsRel sum, valid pixels
        sums = torch.zeros(6, device=self.device, dtype=torch.float64)
        for _, batch in zip(range(self.batches), self.make_loader()):
            batch = self.task.to_device(batch, self.device)
            predictions = self.task.predict(self.model, batch)
            loss, _ = compute_loss(predictions, batch, self.task.loss_cfg)
            sums[0] += loss.double()
            sums[1] += 1
            if "pose_enc" in predictions:
                hw = tuple(batch["images"].shape[-2:])
                pred_ext, _ = pose_encoding_to_extrinsics_intrinsics(predictions["pose_enc"].float(), hw)
                for b in range(pred_ext.shape[0]):
                    sums[2] += auc_from_errors(pair_errors_deg(pred_ext[b], batch["extrinsics"][b])).double()
                    sums[3] += 1
            if "depth" in predictions:
                total, count = abs_rel_sums(predictions["depth"][..., 0], batch["depths"], batch["point_masks"])
                sums[4] += total.double()
                sums[5] += count.double()
        if dist.is_initialized():
            dist.all_reduce(sums)
        loss, n, auc, scenes, rel, pixels = sums.tolist()
        results = {"loss": loss / max(n, 1)}
        if scenes:
            results["camera_auc30"] = auc / scenes
        if pixels:
            results["depth_absrel"] = rel / pixels
        return results
