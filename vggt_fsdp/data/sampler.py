"""Batch planning as upstream: every step draws a frame count S and an aspect ratio shared by all
ranks; each rank then gets floor(frames_per_gpu / S) scenes.

Everything a step needs is a pure function of (seed, step, position), where position counts the scenes
all ranks have consumed so far. Scenes are visited epoch by epoch in a seeded permutation, and
rank r takes the r-th contiguous slice of each step's scenes. `state_dict()` is (step, position).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from vggt_fsdp.data.base import SampleSpec
from vggt_fsdp.data.config import DataConfig

_SPLIT_TAG = {"train": 0, "val": 1}


def image_hw_for(aspect: float, width: int, patch_size: int) -> tuple[int, int]:
    """Height floor(width * aspect / patch) * patch (at least one patch), width fixed."""
    return max(patch_size, int(width * aspect / patch_size) * patch_size), width


@dataclass
class StepShape:
    num_frames: int
    aspect: float
    image_hw: tuple[int, int]
    scenes_per_rank: int


class DynamicBatchSampler:
    """Yields, per step, this rank's list of `SampleSpec`s (one per scene of its batch)."""

    def __init__(self, num_scenes: int, cfg: DataConfig, frames_per_gpu: int, rank: int, world_size: int,
                 split: str = "train"):
        if num_scenes < 1:
            raise ValueError(f"the {split} split has no scenes")
        if split not in _SPLIT_TAG:
            raise ValueError(f"split={split!r}; valid: {sorted(_SPLIT_TAG)}")
        if not isinstance(frames_per_gpu, int) or frames_per_gpu < cfg.frames_range[1]:
            raise ValueError(f"frames_per_gpu={frames_per_gpu!r} must be an int >= data.frames_range[1]="
                             f"{cfg.frames_range[1]} (resolve 'auto' with the memory planner first)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.num_scenes, self.cfg, self.frames_per_gpu = num_scenes, cfg, frames_per_gpu
        self.rank, self.world_size, self.split = rank, world_size, split
        self.step, self.position = 0, 0
        self._perm_cache: tuple[int, np.ndarray] | None = None

    # -- pure functions of the step -----------------------------------------------------------------
    def shape_at(self, step: int) -> StepShape:
        """The same on every rank: drawn from (seed, split, step) only."""
        rng = np.random.default_rng([self.cfg.seed, _SPLIT_TAG[self.split], step, 0x5A])
        lo, hi = self.cfg.frames_range
        num_frames = int(rng.integers(lo, hi + 1))
        aspect = float(rng.uniform(*self.cfg.aspect_range))
        return StepShape(num_frames, aspect, image_hw_for(aspect, self.cfg.image_width, self.cfg.patch_size),
                         self.frames_per_gpu // num_frames)

    def scene_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_scenes)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.cfg.seed, _SPLIT_TAG[self.split], epoch, 0x9E])
            self._perm_cache = (epoch, rng.permutation(self.num_scenes))
        return int(self._perm_cache[1][offset])

    def specs_at(self, step: int, position: int) -> list[SampleSpec]:
        shape = self.shape_at(step)
        per_rank = shape.scenes_per_rank
        next_position = position + self._consumed(shape)
        first = position + self.rank * per_rank
        return [
            SampleSpec(index=self.scene_at(first + b), num_frames=shape.num_frames, image_hw=shape.image_hw,
                       seed=(self.cfg.seed, _SPLIT_TAG[self.split], step, self.rank, b), step=step,
                       next_position=next_position)
            for b in range(per_rank)
        ]

    def _consumed(self, shape: StepShape) -> int:
        """Scenes all ranks together take in a step of this shape."""
        return shape.scenes_per_rank * self.world_size

    # -- iteration and resumption --------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[SampleSpec]]:
        """Infinite; advances this object's own state (the loader tracks what was consumed)."""
        while True:
            specs = self.specs_at(self.step, self.position)
            self.step, self.position = self.step + 1, specs[0].next_position
            yield specs

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "position": self.position}

    def state_at(self, step: int) -> dict[str, int]:
        """The state a run that started at step 0 has before `step` (to look at any step's batch)."""
        return {"step": step, "position": sum(self._consumed(self.shape_at(s)) for s in range(step))}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.position = int(state["step"]), int(state["position"])
