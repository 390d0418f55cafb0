"""Batch planning as upstream: every step draws a frame count S and an aspect ratio shared by all
ranks; each rank then gets floor(frames_per_gpu / S) scenes.

Everything a step needs is a pure function of (seed, step, position), where position counts the scenes
all ranks have consumed so far, so every rank agrees and a resume needs only (step, position).
A `Mixture` turns a position into (source, scene): an epoch holds `epoch_length` slots of each source
in a seeded shuffle (upstream's ComposedDataset draws from the concatenation of its datasets'
len_train), and each source visits its own scenes epoch by epoch in a seeded permutation. Rank r takes
the r-th contiguous slice of each step's scenes.

Context parallelism (`context_parallel` N > 1): a group of N ranks shares each scene, so the sampler's
`rank` and `world_size` count groups (every rank of a group draws the same scenes and seeds), the frame
budget is the group's (N x frames_per_gpu) and S is drawn among the multiples of N in frames_range (N = 1
draws exactly as before). Rank i of a group builds frames [i S/N, (i+1) S/N) of each scene only
(`SampleSpec.frames`, `context_rank`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from vggt_fsdp.data.base import DataError, SampleSpec
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


class Mixture:
    """Positions -> (source, scene) for sources of `scene_counts` scenes taking `epoch_lengths` slots
    of each epoch; a pure function of (seed, split, position)."""

    def __init__(self, scene_counts: list[int], epoch_lengths: list[int], seed: int, split: str = "train",
                 labels: list[str] | None = None):
        if len(scene_counts) != len(epoch_lengths) or not scene_counts:
            raise ValueError("a mixture needs one epoch length per source, and at least one source")
        if any(length and count < 1 for count, length in zip(scene_counts, epoch_lengths)):
            raise ValueError(f"a source with no scenes cannot fill its epoch length: scenes {scene_counts}, "
                             f"epoch lengths {epoch_lengths}")
        if sum(epoch_lengths) < 1:
            raise DataError(f"the {split} split has no scenes")
        self.scene_counts, self.epoch_lengths = list(scene_counts), list(epoch_lengths)
        self.labels = labels or [str(i) for i in range(len(scene_counts))]
        self.seed, self.tag, self.total = seed, _SPLIT_TAG[split], sum(epoch_lengths)
        self._slots: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, source per slot, its rank)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (its epoch, permutation)

    def describe(self) -> list[list]:
        """[label, epoch length, scenes] per source: what a resume checks it continues."""
        return [[label, length, count] for label, length, count in
                zip(self.labels, self.epoch_lengths, self.scene_counts)]

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Source of each slot of a mixture epoch, and how many slots of that source precede it."""
        if self._slots is None or self._slots[0] != epoch:
            if len(self.epoch_lengths) == 1:
                slots = np.zeros(self.total, np.int64)
            else:
                slots = np.repeat(np.arange(len(self.epoch_lengths)), self.epoch_lengths)
                np.random.default_rng([self.seed, self.tag, epoch, 0x3C]).shuffle(slots)
            ranks = np.empty(self.total, np.int64)
            for source in range(len(self.epoch_lengths)):
                where = np.flatnonzero(slots == source)
                ranks[where] = np.arange(len(where))
            self._slots = (epoch, slots, ranks)
        return self._slots[1], self._slots[2]

    def _scene(self, source: int, draw: int) -> int:
        """The source's `draw`-th scene: its scenes in a fresh seeded permutation every pass."""
        count = self.scene_counts[source]
        epoch, offset = divmod(draw, count)
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            # source 0 keeps the single-source sampler's seeds, so older single-source runs resume the same
            entropy = [self.seed, self.tag, epoch, 0x9E] + ([source] if source else [])
            cached = (epoch, np.random.default_rng(entropy).permutation(count))
            self._perms[source] = cached
        return int(cached[1][offset])

    def at(self, position: int) -> tuple[int, int]:
        """(source, scene) taken at `position`."""
        epoch, offset = divmod(position, self.total)
        slots, ranks = self._epoch(epoch)
        source = int(slots[offset])
        return source, self._scene(source, epoch * self.epoch_lengths[source] + int(ranks[offset]))

    def consumed(self, position: int) -> dict[str, int]:
        """Per source, how many scenes positions [0, position) took."""
        epoch, offset = divmod(position, self.total)
        slots, _ = self._epoch(epoch)
        before = np.bincount(slots[:offset], minlength=len(self.epoch_lengths))
        return {label: epoch * length + int(n) for label, length, n in zip(self.labels, self.epoch_lengths, before)}


class DynamicBatchSampler:
    """Yields, per step, this rank's list of `SampleSpec`s (one per scene of its batch).

    `scenes` is a Mixture, or a scene count: one source whose scenes are each visited once an epoch.
    """

    def __init__(self, scenes: Mixture | int, cfg: DataConfig, frames_per_gpu: int, rank: int, world_size: int,
                 split: str = "train", context_parallel: int = 1, context_rank: int = 0):
        if split not in _SPLIT_TAG:
            raise ValueError(f"split={split!r}; valid: {sorted(_SPLIT_TAG)}")
        if isinstance(scenes, int):
            if scenes < 1:
                raise DataError(f"the {split} split has no scenes")
            scenes = Mixture([scenes], [scenes], cfg.seed, split)
        if not isinstance(frames_per_gpu, int):
            raise ValueError(f"frames_per_gpu={frames_per_gpu!r} must be an int (resolve 'auto' with the memory "
                             "planner first)")
        cfg.check_frame_budget(context_parallel)
        if frames_per_gpu * context_parallel < cfg.frames_range[1]:
            raise ValueError(f"frames_per_gpu={frames_per_gpu} x context_parallel={context_parallel} must be >= "
                             f"data.frames_range[1]={cfg.frames_range[1]}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if not 0 <= context_rank < context_parallel:
            raise ValueError(f"context_rank={context_rank} must be in [0, context_parallel={context_parallel})")
        self.mixture, self.cfg, self.context_parallel, self.context_rank = scenes, cfg, context_parallel, context_rank
        self.frames_per_gpu = frames_per_gpu * context_parallel  # the frames of the GPUs holding a scene
        self.rank, self.world_size, self.split = rank, world_size, split
        self.step, self.position = 0, 0

    # -- pure functions of the step -----------------------------------------------------------------
    def shape_at(self, step: int) -> StepShape:
        """The same on every rank: drawn from (seed, split, step) only."""
        rng = np.random.default_rng([self.cfg.seed, _SPLIT_TAG[self.split], step, 0x5A])
        lo, hi = self.cfg.frames_range
        group = self.context_parallel
        num_frames = group * int(rng.integers(-(-lo // group), hi // group + 1))
        aspect = float(rng.uniform(*self.cfg.aspect_range))
        return StepShape(num_frames, aspect, image_hw_for(aspect, self.cfg.image_width, self.cfg.patch_size),
                         self.frames_per_gpu // num_frames)

    def specs_at(self, step: int, position: int) -> list[SampleSpec]:
        shape = self.shape_at(step)
        per_rank = shape.scenes_per_rank
        next_position = position + self._consumed(shape)
        first = position + self.rank * per_rank
        share = shape.num_frames // self.context_parallel
        frames = None if self.context_parallel == 1 else (self.context_rank * share, (self.context_rank + 1) * share)
        specs = []
        for b in range(per_rank):
            source, scene = self.mixture.at(first + b)
            specs.append(SampleSpec(index=scene, num_frames=shape.num_frames, image_hw=shape.image_hw,
                                    seed=(self.cfg.seed, _SPLIT_TAG[self.split], step, self.rank, b), step=step,
                                    next_position=next_position, source=source, frames=frames))
        return specs

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
