"""Ground-truth normalisation as upstream: re-express a scene in its first camera's frame and divide
lengths by the mean distance of valid points from that camera, so every scene has unit scale."""
from __future__ import annotations

import torch

from vggt_fsdp.geometry import compose_extrinsics, invert_extrinsics, transform_points


def normalize_scene(scene: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise one scene's (S, ...) tensors: extrinsics, world_points, cam_points, depths.

    Returns a new dict (tracks in pixels and images are unchanged). `scene_scale` records the divisor.
    """
    first = scene["extrinsics"][0]
    extrinsics = compose_extrinsics(scene["extrinsics"], invert_extrinsics(first).expand_as(scene["extrinsics"]))
    world = transform_points(first, scene["world_points"])
    mask = scene["point_masks"]
    dist = torch.where(mask, world.norm(dim=-1), torch.zeros_like(world[..., 0]))
    scale = (dist.sum() / (mask.sum() + 1e-3)).clamp(1e-6, 1e6)
    extrinsics = torch.cat([extrinsics[..., :3], extrinsics[..., 3:] / scale], -1)
    out = dict(scene)
    out.update(extrinsics=extrinsics, world_points=world / scale, cam_points=scene["cam_points"] / scale,
               depths=scene["depths"] / scale, scene_scale=scale)
    return out
