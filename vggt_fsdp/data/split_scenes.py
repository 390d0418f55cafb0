"""Scenes split over a context group (parallel.context_parallel = N): completing a rank's batch.

Each rank of a group builds only its share of every scene's frames (data/sampler.py, `SampleSpec.frames`),
in world coordinates, since normalising a scene needs its first camera (held by the group's first rank)
and the mean distance of all its frames' valid points. `complete_split_batch` finishes the job in the
training process, where the group can talk:

- the first camera comes from the rank holding frame 0; each rank adds up its frames' distances and
  valid points and the group sums them, so the scale is the whole scene's (as one process computes it,
  up to the order of the sums);
- the ground truth of every frame is then gathered, so the loss and the validation metrics (which
  cross frames: camera pairs, the scene-wide means) read the whole scene on every rank, as they read
  the gathered predictions. `images` stays this rank's share: it is what the model reads.

A scene with no valid depth in any frame has no scale. One process refuses it as it loads it; a group
knows only once its sums are on the device, and reading them on the host each step would stall the
step. So such a scene is scaled by 1 and reported in the returned flags, which the task reads where
the trainer syncs anyway (tasks/vggt.py: at log steps).
"""
from __future__ import annotations

from typing import Protocol

import torch

from vggt_fsdp.data.base import DataError
from vggt_fsdp.data.normalize import distance_sums, in_first_camera, rescaled, unit_scale

# Ground truth with a frame dimension (dim 1 of a batch): gathered over the group.
FRAME_KEYS = ("depths", "extrinsics", "intrinsics", "world_points", "cam_points", "point_masks")


class FrameGroup(Protocol):
    """What a context group offers (parallel.context.ContextGroup)."""

    def first_frame(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as the rank holding the scenes' frame 0 has it."""
        ...

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over the group."""
        ...

    def gather_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's frames of `x` along `dim`, in frame order."""
        ...


def complete_split_batch(batch: dict[str, torch.Tensor], group: FrameGroup
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """This rank's batch (its share of the frames, world coordinates) -> normalised, with the whole scenes'
    ground truth and this rank's images; and per scene whether it has any valid depth (on the device, not
    read here). Every rank of the group calls it with the same scenes."""
    first = group.first_frame(batch["extrinsics"][:, 0].contiguous())
    moved = in_first_camera(batch, first)
    total, count = distance_sums(moved["world_points"], batch["point_masks"], lead=1)
    sums = group.sum(torch.stack([total.double(), count.double()]))
    has_depth = sums[1] > 0
    scale = torch.where(has_depth, unit_scale(sums[0], sums[1]), torch.ones_like(sums[0]))
    out = rescaled(moved, scale.to(total.dtype))
    for key in FRAME_KEYS:
        out[key] = group.gather_frames(out[key], 1)
    return out, has_depth


def no_depth_error(scenes: int) -> DataError:
    """What a group says of scenes without valid depth (counted by the task since its last report)."""
    return DataError(f"{scenes} scene(s) of the batches since the last log step had no valid depth in any frame "
                     "after cropping, so no scale (one process refuses such a scene as it loads it; a context "
                     "group finds out once its ranks' sums are added): check the source's depth maps")
