"""Ground-truth normalisation as upstream: re-express a scene in its first camera's frame and divide
lengths by the mean distance of valid points from that camera, so every scene has unit scale.

The pieces work on one scene (S, ...) or a batch of them (B, S, ...): a scene split over a context
group is normalised from sums its ranks add together (data/split_scenes.py).
"""
from __future__ import annotations

import torch

from vggt_fsdp.geometry import compose_extrinsics, invert_extrinsics, transform_points


def normalize_scene(scene: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise one scene's (S, ...) tensors: extrinsics, world_points, cam_points, depths.

    Returns a new dict (tracks in pixels and images are unchanged). `scene_scale` records the divisor.
    """
    moved = in_first_camera(scene, scene["extrinsics"][0])
    total, count = distance_sums(moved["world_points"], scene["point_masks"], lead=0)
    return rescaled(moved, unit_scale(total, count))


def in_first_camera(scene: dict[str, torch.Tensor], first: torch.Tensor) -> dict[str, torch.Tensor]:
    """Extrinsics and world points re-expressed in the camera `first` ((..., 3, 4), one per scene)."""
    extrinsics = scene["extrinsics"]
    to_first = invert_extrinsics(first).unsqueeze(first.dim() - 2).expand_as(extrinsics)
    out = dict(scene)
    out.update(extrinsics=compose_extrinsics(extrinsics, to_first),
               world_points=transform_points(first, scene["world_points"]))
    return out


def distance_sums(world: torch.Tensor, mask: torch.Tensor, lead: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scene (the first `lead` dims index scenes): the sum of valid points' distances from the
    origin, and how many valid points."""
    dist = torch.where(mask, world.norm(dim=-1), torch.zeros_like(world[..., 0]))
    if lead == 0:
        return dist.sum(), mask.sum()
    return dist.flatten(lead).sum(-1), mask.flatten(lead).sum(-1)


def unit_scale(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The divisor that gives valid points a mean distance of one (bounded for empty or odd scenes)."""
    return (total / (count + 1e-3)).clamp(1e-6, 1e6)


def rescaled(scene: dict[str, torch.Tensor], scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Lengths divided by `scale` (one per scene); `scene_scale` records it."""
    def per_scene(like: torch.Tensor) -> torch.Tensor:
        return scale.reshape(scale.shape + (1,) * (like.dim() - scale.dim()))

    extrinsics = scene["extrinsics"]
    out = dict(scene)
    out.update(extrinsics=torch.cat([extrinsics[..., :3], extrinsics[..., 3:] / per_scene(extrinsics)], -1),
               world_points=scene["world_points"] / per_scene(scene["world_points"]),
               cam_points=scene["cam_points"] / per_scene(scene["cam_points"]),
               depths=scene["depths"] / per_scene(scene["depths"]), scene_scale=scale)
    return out
