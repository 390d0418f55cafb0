"""The real formats' shared machinery: scenes of frames on disk, read, checked, cropped and stacked.

A format subclasses `FileSceneSource`, lists its scenes and implements `read_frame`. Every frame read
goes through `load_frame`: intrinsics converted to the toolkit's pixel convention, geometry checked
(vggt_fsdp.data.checks). A frame that fails raises a DataError naming its file, or with
data.skip_bad_frames is replaced by another frame of its scene and counted.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vggt_fsdp.data.augment import photometric_frames
from vggt_fsdp.data.base import DataError, RawFrame, SampleSpec, pick_frames, split_by_name
from vggt_fsdp.data.checks import check_frame
from vggt_fsdp.data.config import AugmentConfig, DataConfig, SourceConfig
from vggt_fsdp.data.crop import apply_plan, plan_crop, plan_intrinsics
from vggt_fsdp.geometry import depth_to_points, to_integer_centres

_log = logging.getLogger(__name__)


def assemble_frames(frames: list[RawFrame], image_hw: tuple[int, int], rng: np.random.Generator,
                    frame_rngs: list[np.random.Generator], augment: AugmentConfig | None,
                    margin: int) -> dict[str, torch.Tensor]:
    """Fit each frame to image_hw (vggt_fsdp.data.crop; intrinsics updated exactly), jitter colours,
    stack, and compute camera and world points from the resized depth. `rng`: the scene's generator;
    `frame_rngs`: each frame's own."""
    images, depths, masks, intrinsics = [], [], [], []
    for frame, frame_rng in zip(frames, frame_rngs):
        pp = (float(frame.intrinsics[0, 2]), float(frame.intrinsics[1, 2]))
        plan = plan_crop(frame_rng, tuple(frame.depth.shape), pp, image_hw, margin, augment)
        image, depth, mask = apply_plan(frame.image, frame.depth, frame.mask, plan)
        mask = mask & (depth > 0) & torch.isfinite(depth)
        images.append(image)
        depths.append(torch.where(mask, depth, torch.zeros_like(depth)))
        masks.append(mask)
        intrinsics.append(plan_intrinsics(frame.intrinsics, plan))
    out = {
        "images": photometric_frames(images, rng, augment, frame_rngs),
        "depths": torch.stack(depths),
        "point_masks": torch.stack(masks),
        "extrinsics": torch.stack([f.extrinsics for f in frames]).float(),
        "intrinsics": torch.stack(intrinsics).float(),
    }
    out["world_points"], out["cam_points"] = depth_to_points(out["depths"], out["extrinsics"], out["intrinsics"])
    return out


@dataclasses.dataclass
class FrameLoader:
    """Loads frames through `load(frame_id)`, replacing bad ones by other frames when allowed (drawn
    from the frame's own generator, so a replacement changes no other frame's draws)."""

    skip_bad_frames: bool
    skipped: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)

    def load(self, load: Callable[[int], RawFrame], frame_ids: list[int], available: int,
             frame_rngs: list[np.random.Generator]) -> list[RawFrame]:
        return [self._load_one(load, frame_id, available, rng) for frame_id, rng in zip(frame_ids, frame_rngs)]

    def _load_one(self, load, frame_id: int, available: int, rng: np.random.Generator) -> RawFrame:
        failed: list[int] = []
        while True:
            try:
                return load(frame_id)
            except DataError as err:
                if not self.skip_bad_frames:
                    raise
                self.skipped += 1
                self.errors.append(str(err))
                failed.append(frame_id)
                if len(failed) >= min(available, 8):
                    raise DataError(f"{len(failed)} frames in a row failed to load (data.skip_bad_frames=true); "
                                    f"last error: {err}") from err
                # another frame, never one that already failed here
                others = np.setdiff1d(np.arange(available), failed)
                frame_id = int(others[rng.integers(0, len(others))])


class FileSceneSource:
    """Base of the real formats: scenes are lists of frames on disk, read one frame at a time.

    Subclasses set the format's defaults (class attributes below), call `super().__init__`, fill
    `self.scene_names` and `self.frame_counts` (`load_scenes` helps) and implement `read_frame`
    (intrinsics as the files hold them). With strict=False (the `data check` command) a scene that
    cannot be listed is recorded in `scene_errors` and left out instead of raising.
    """

    DEFAULT_WINDOW = 8  # data.frame_window when the recipe leaves it null
    DEFAULT_REPLACEMENT = False  # data.frame_replacement when null
    DEFAULT_PIXEL_CENTRE = "integer"  # data.pixel_centre when null

    scene_names: list[str]
    frame_counts: list[int]

    def __init__(self, cfg: SourceConfig, data: DataConfig, expected: str, strict: bool = True):
        self.root = Path(cfg.root)
        self.label = cfg.label
        self.skip_bad_frames = data.skip_bad_frames
        self.margin = data.resize_margin
        self.frame_window = self.DEFAULT_WINDOW if cfg.frame_window is None else cfg.frame_window
        self.replace = self.DEFAULT_REPLACEMENT if cfg.frame_replacement is None else cfg.frame_replacement
        self.pixel_centre = cfg.pixel_centre or self.DEFAULT_PIXEL_CENTRE
        self.strict = strict
        self.scene_errors: list[str] = []
        if not self.root.is_dir():
            raise DataError(f"{self.root}: the root of data source {self.label!r} is not a directory; "
                            f"expected {expected}")

    def __len__(self) -> int:
        return len(self.scene_names)

    def load_scenes(self, names: list[str], load: Callable[[str], object]) -> list[tuple[str, object]]:
        """(name, load(name)) for each name; a DataError raises when strict, else it is recorded in
        `scene_errors` and the name left out."""
        loaded = []
        for name in names:
            try:
                loaded.append((name, load(name)))
            except DataError as err:
                if self.strict:
                    raise
                self.scene_errors.append(str(err))
        return loaded

    def load_split(self, names: list[str], split: str, val_fraction: float, load: Callable[[str], object]) -> list:
        """For formats without an official split: `load` each scene of `split` (by name hash, see
        split_by_name), set `scene_names` to those that loaded and return what `load` returned."""
        loaded = self.load_scenes(split_by_name(names, split, val_fraction), load)
        self.scene_names = [name for name, _ in loaded]
        return [value for _, value in loaded]

    def read_frame(self, scene: int, frame: int) -> RawFrame:
        raise NotImplementedError

    def load_frame(self, scene: int, frame: int) -> RawFrame:
        """`read_frame`, with intrinsics in the toolkit's pixel convention and geometry checked."""
        raw = self.read_frame(scene, frame)
        raw = dataclasses.replace(raw, intrinsics=to_integer_centres(raw.intrinsics, self.pixel_centre))
        check_frame(raw)
        return raw

    def scene(self, spec: SampleSpec, rng: np.random.Generator, augment: AugmentConfig | None) -> dict[str, torch.Tensor]:
        available = self.frame_counts[spec.index]
        ids = pick_frames(rng, available, spec.num_frames, self.frame_window, self.replace)
        positions = spec.positions()  # this rank's share of the scene: only these frames are read
        frame_rngs = [spec.frame_rng(j) for j in positions]
        loader = FrameLoader(self.skip_bad_frames)
        frames = loader.load(lambda f: self.load_frame(spec.index, f), [ids[j] for j in positions], available,
                             frame_rngs)
        for error in loader.errors:
            _log.warning("skipped a bad frame of source %s (data.skip_bad_frames): %s", self.label, error)
        out = assemble_frames(frames, spec.image_hw, rng, frame_rngs, augment, self.margin)
        # (a share of a scene may lack valid depth; the group checks the whole scene: data/split_scenes.py)
        if spec.frames is None and not out["point_masks"].any():
            raise DataError(f"{self.root / self.scene_names[spec.index]}: no valid depth left in any of the "
                            f"sample's {spec.num_frames} frames after cropping to {spec.image_hw}")
        out["skipped_frames"] = torch.tensor(loader.skipped)
        return out
