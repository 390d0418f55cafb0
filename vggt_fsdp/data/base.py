"""What every data source shares: the sample spec, the frame assembly and the error type.

A source (synthetic, co3d, vkitti, folder) is a list of scenes. Asked for scene `index` with S frames
at an image size, it returns one scene's tensors in world coordinates; `build_sample` then normalises
them as upstream. All randomness comes from the spec's seed, so a sample is reproducible anywhere.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from vggt_fsdp.data.augment import crop_intrinsics, crop_resize, draw_crop, photometric_frames, rounded_box
from vggt_fsdp.data.config import AugmentConfig, DataConfig
from vggt_fsdp.data.normalize import normalize_scene
from vggt_fsdp.geometry import depth_to_points


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the path and what was expected."""


@dataclass(frozen=True)
class SampleSpec:
    """Everything needed to build one scene of a batch, decided by the sampler in the main process."""

    index: int  # scene index within the split
    num_frames: int
    image_hw: tuple[int, int]
    seed: tuple[int, ...]  # numpy SeedSequence entropy for every random draw of this sample
    step: int  # the batch this sample belongs to
    next_position: int  # sampler position after this batch (for resuming)


@dataclass
class RawFrame:
    """One frame as a real source reads it, before cropping: image (3, H, W) in [0, 1], depth (H, W)
    (0 where unknown), mask (H, W) bool, OpenCV extrinsics (3, 4), pixel intrinsics (3, 3)."""

    image: torch.Tensor
    depth: torch.Tensor
    mask: torch.Tensor
    extrinsics: torch.Tensor
    intrinsics: torch.Tensor


class SceneSource(Protocol):
    def __len__(self) -> int: ...

    def scene(self, spec: SampleSpec, rng: np.random.Generator, augment: AugmentConfig | None) -> dict[str, torch.Tensor]:
        """(S, ...) tensors: images, depths, extrinsics, intrinsics, world_points, cam_points,
        point_masks, optionally tracks/track_vis_mask, and skipped_frames (a 0-d count)."""
        ...


def assemble_frames(frames: list[RawFrame], image_hw: tuple[int, int], rng: np.random.Generator,
                    augment: AugmentConfig | None) -> dict[str, torch.Tensor]:
    """Crop/resize each frame to image_hw (intrinsics updated to match), jitter colours, stack, and
    compute camera and world points from the resized depth."""
    images, depths, masks, intrinsics = [], [], [], []
    for frame in frames:
        pp = (float(frame.intrinsics[0, 2]), float(frame.intrinsics[1, 2]))
        box = rounded_box(draw_crop(rng, tuple(frame.depth.shape), image_hw, pp, augment))
        image, depth, mask = crop_resize(frame.image, frame.depth, frame.mask, box, image_hw)
        images.append(image)
        mask = mask & (depth > 0) & torch.isfinite(depth)
        depths.append(torch.where(mask, depth, torch.zeros_like(depth)))
        masks.append(mask)
        intrinsics.append(crop_intrinsics(frame.intrinsics, box, image_hw))
    out = {
        "images": photometric_frames(images, rng, augment),
        "depths": torch.stack(depths),
        "point_masks": torch.stack(masks),
        "extrinsics": torch.stack([f.extrinsics for f in frames]).float(),
        "intrinsics": torch.stack(intrinsics).float(),
    }
    out["world_points"], out["cam_points"] = depth_to_points(out["depths"], out["extrinsics"], out["intrinsics"])
    return out


def pick_frames(rng: np.random.Generator, available: int, num_frames: int, window: int = 0) -> list[int]:
    """Frame indices of one sample: a random anchor first, then the others.

    With window > 0 the others come from within +-(window * num_frames) of the anchor (upstream's
    "nearby" sampling, so frames of a long video still overlap); 0 draws from the whole sequence.
    Frames are distinct when the range holds enough of them, else repeated (as upstream allows).
    """
    if available <= 0:
        raise DataError("a scene with no frames cannot be sampled")
    anchor = int(rng.integers(available))
    if window > 0:
        lo, hi = max(0, anchor - window * num_frames), min(available, anchor + window * num_frames + 1)
    else:
        lo, hi = 0, available
    others = [i for i in range(lo, hi) if i != anchor]
    if not others:
        return [anchor] * num_frames
    replace = len(others) < num_frames - 1
    return [anchor] + [int(i) for i in rng.choice(others, num_frames - 1, replace=replace)]


@dataclass
class FrameLoader:
    """Loads frames through `read(frame_id)`, replacing bad ones by other frames when allowed."""

    skip_bad_frames: bool
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def load(self, read, frame_ids: list[int], available: int, rng: np.random.Generator) -> list[RawFrame]:
        return [self._load_one(read, frame_id, available, rng) for frame_id in frame_ids]

    def _load_one(self, read, frame_id: int, available: int, rng: np.random.Generator) -> RawFrame:
        tries = 0
        while True:
            try:
                return read(frame_id)
            except DataError as err:
                if not self.skip_bad_frames:
                    raise
                self.skipped += 1
                self.errors.append(str(err))
                tries += 1
                if tries >= min(available, 8):
                    raise DataError(f"{tries} frames in a row failed to load (data.skip_bad_frames=true); "
                                    f"last error: {err}") from err
                frame_id = int(rng.integers(0, available))


def build_sample(source: SceneSource, spec: SampleSpec, augment: AugmentConfig | None) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(list(spec.seed))
    scene = source.scene(spec, rng, augment)
    scene = normalize_scene(scene)
    scene.setdefault("skipped_frames", torch.tensor(0))
    return scene


class FileSceneSource:
    """Base of the real formats: scenes are lists of frames on disk, read one frame at a time.

    Subclasses call `super().__init__(cfg, expected)` (expected: what data.root should hold, for
    the error when it is not a directory), fill `self.scene_names` and `self.frame_counts` and
    implement `read_frame`. A frame that fails to load raises DataError, or with
    data.skip_bad_frames is replaced by another frame of its scene; the batch's `skipped_frames`
    counts those, and each one is logged.
    """

    scene_names: list[str]
    frame_counts: list[int]

    def __init__(self, cfg: DataConfig, expected: str):
        self.root = Path(cfg.root)
        self.skip_bad_frames = cfg.skip_bad_frames
        self.frame_window = cfg.frame_window
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data.root is not a directory; expected {expected}")

    def __len__(self) -> int:
        return len(self.scene_names)

    def read_frame(self, scene: int, frame: int) -> RawFrame:
        raise NotImplementedError

    def scene(self, spec: SampleSpec, rng: np.random.Generator, augment: AugmentConfig | None) -> dict[str, torch.Tensor]:
        available = self.frame_counts[spec.index]
        ids = pick_frames(rng, available, spec.num_frames, self.frame_window)
        loader = FrameLoader(self.skip_bad_frames)
        frames = loader.load(lambda f: self.read_frame(spec.index, f), ids, available, rng)
        for error in loader.errors:
            logging.getLogger(__name__).warning("skipped a bad frame (data.skip_bad_frames): %s", error)
        out = assemble_frames(frames, spec.image_hw, rng, augment)
        out["skipped_frames"] = torch.tensor(loader.skipped)
        return out


def split_by_name(names: list[str], split: str, val_fraction: float) -> list[str]:
    """Hold out scenes whose name hashes below val_fraction: stable under added or removed scenes."""
    held_out = [(zlib.crc32(n.encode()) % 10_000) / 10_000 < val_fraction for n in names]
    return [n for n, h in zip(names, held_out) if h == (split == "val")]
