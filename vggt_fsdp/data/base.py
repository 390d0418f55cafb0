"""What every data source shares: the sample spec, the raw frame, frame picking and the error type.

A source (synthetic, co3d, vkitti, folder, colmap) is a list of scenes. Asked for scene `index` with S
frames at an image size, it returns one scene's tensors in world coordinates; `build_sample` then
normalises them as upstream. All randomness comes from the spec's seed, so a sample is reproducible
anywhere: draws about the whole scene (which frames, the cameras of a synthetic scene, one colour jitter
for all frames) from the scene's generator, draws about one frame (its crop and zoom, its colour jitter,
the replacement of a bad frame) from that frame's own generator (`SampleSpec.frame_rng`). So a rank
that builds only some of a scene's frames (`SampleSpec.frames`, context parallelism) builds them exactly
as a process building the whole scene does. The real formats' shared reading machinery is vggt_fsdp.data.files.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from vggt_fsdp.data.config import AugmentConfig
from vggt_fsdp.data.normalize import normalize_scene


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the path and what was expected."""


@dataclass(frozen=True)
class SampleSpec:
    """Everything needed to build one scene of a batch, decided by the sampler in the main process."""

    index: int  # scene index within its source's split
    num_frames: int
    image_hw: tuple[int, int]
    seed: tuple[int, ...]  # numpy SeedSequence entropy for every random draw of this sample
    step: int  # the batch this sample belongs to
    next_position: int  # sampler position after this batch (for resuming)
    source: int = 0  # which source of data.source_configs() the scene comes from
    # [start, stop) of the scene's frames this rank builds (a context group shares the scene); None: all.
    frames: tuple[int, int] | None = None

    def positions(self) -> range:
        """The frame positions this rank builds."""
        return range(self.num_frames) if self.frames is None else range(*self.frames)

    def frame_rng(self, position: int) -> np.random.Generator:
        """The generator of frame `position`'s own random draws (the same whichever frames a rank builds)."""
        return np.random.default_rng([*self.seed, 0xF5A3E, position])


@dataclass
class RawFrame:
    """One frame as a real source reads it, before cropping: image (3, H, W) in [0, 1], depth (H, W)
    (0 where unknown), mask (H, W) bool, OpenCV extrinsics (3, 4), pixel intrinsics (3, 3) (in the
    source's pixel convention until FileSceneSource.load_frame converts them), and for messages
    where the cameras came from and the depth file."""

    image: torch.Tensor
    depth: torch.Tensor
    mask: torch.Tensor
    extrinsics: torch.Tensor
    intrinsics: torch.Tensor
    where: str = "<frame>"
    depth_file: str = "<depth>"


class SceneSource(Protocol):
    def __len__(self) -> int: ...

    def scene(self, spec: SampleSpec, rng: np.random.Generator, augment: AugmentConfig | None) -> dict[str, torch.Tensor]:
        """(S, ...) tensors: images, depths, extrinsics, intrinsics, world_points, cam_points,
        point_masks, optionally tracks/track_vis_mask, and skipped_frames (a 0-d count)."""
        ...


def pick_frames(rng: np.random.Generator, available: int, num_frames: int, window: int = 0,
                replace: bool = True) -> list[int]:
    """Frame indices of one sample: a random anchor first, then the others.

    With window > 0 the others come from [anchor - window * S, anchor + window * S) (upstream's
    "nearby" sampling, so frames of a long video still overlap); 0 draws from the whole sequence.
    replace=True draws the others with replacement from the whole range, anchor included, as
    upstream (allow_duplicate_img); False draws distinct frames other than the anchor while the range
    holds enough, and repeats only when it does not.
    """
    if available <= 0:
        raise DataError("a scene with no frames cannot be sampled")
    anchor = int(rng.integers(available))
    lo, hi = 0, available
    if window > 0:
        lo, hi = max(0, anchor - window * num_frames), min(available, anchor + window * num_frames)
    if replace:
        return [anchor] + [int(i) for i in rng.integers(lo, hi, num_frames - 1)]
    others = [i for i in range(lo, hi) if i != anchor]
    if not others:
        return [anchor] * num_frames
    distinct = len(others) >= num_frames - 1
    return [anchor] + [int(i) for i in rng.choice(others, num_frames - 1, replace=not distinct)]


def build_sample(source: SceneSource, spec: SampleSpec, augment: AugmentConfig | None) -> dict[str, torch.Tensor]:
    """One scene, normalised; a share of a scene's frames (`spec.frames`) stays in world coordinates: its
    normalisation needs the whole scene, which the context group completes (data/split_scenes.py)."""
    rng = np.random.default_rng(list(spec.seed))
    scene = source.scene(spec, rng, augment)
    if spec.frames is None:
        scene = normalize_scene(scene)
    scene.setdefault("skipped_frames", torch.tensor(0))
    scene["source_index"] = torch.tensor(spec.source)
    return scene


def split_by_name(names: list[str], split: str, val_fraction: float) -> list[str]:
    """Hold out scenes whose name hashes below val_fraction: stable under added or removed scenes."""
    held_out = [(zlib.crc32(n.encode()) % 10_000) / 10_000 < val_fraction for n in names]
    return [n for n, h in zip(names, held_out) if h == (split == "val")]
