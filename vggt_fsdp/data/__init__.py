"""Data for VGGT training: sources, batch planning and the loader the trainer iterates.

Entry point: `build_dataloader(cfg, rank=..., world_size=..., split="train", frames_per_gpu=...)`.
It returns a `SceneLoader`: an iterable of batch dicts (CPU tensors) with upstream's keys

    images (B,S,3,H,W) in [0,1], depths (B,S,H,W), extrinsics (B,S,3,4) OpenCV camera-from-world,
    intrinsics (B,S,3,3) in pixels (pixel (u, v) centred at (u + 0.5, v + 0.5), see geometry.py),
    world_points / cam_points (B,S,H,W,3), point_masks (B,S,H,W) bool,
    tracks (B,S,N,2) in pixel-index coordinates (column, row), track_vis_mask (B,S,N) bool and
    query_points (B,N,2) = tracks[:, 0] when the source has tracks (synthetic),
    skipped_frames (B,) (bad frames replaced under data.skip_bad_frames) and scene_scale (B,) (the
    normalisation divisor),

plus `state_dict()` / `load_state_dict()` for resuming mid-epoch. Shapes agree across ranks at every
step (S and H are drawn from (seed, step)), B = floor(frames_per_gpu / S).

Geometry is normalised as upstream: expressed in each scene's first camera frame and divided by the
mean distance of its valid points.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from vggt_fsdp.data.base import DataError, SampleSpec, SceneSource, build_sample
from vggt_fsdp.data.config import AugmentConfig, DataConfig, SyntheticConfig
from vggt_fsdp.data.sampler import DynamicBatchSampler, StepShape

__all__ = ["AugmentConfig", "DataConfig", "DataError", "SceneLoader", "SyntheticConfig",
           "build_dataloader", "build_source", "move_batch"]


def build_source(cfg: DataConfig, split: str) -> SceneSource:
    """The scenes of one split of cfg.source (real formats are imported only when used)."""
    if cfg.source == "synthetic":
        from vggt_fsdp.data.synthetic import SyntheticSource
        return SyntheticSource(cfg, split)
    if cfg.source == "co3d":
        from vggt_fsdp.data.co3d import Co3dSource
        return Co3dSource(cfg, split)
    if cfg.source == "vkitti":
        from vggt_fsdp.data.vkitti import VKittiSource
        return VKittiSource(cfg, split)
    if cfg.source == "folder":
        from vggt_fsdp.data.folder import FolderSource
        return FolderSource(cfg, split)
    raise ValueError(f"data.source={cfg.source!r}; valid: synthetic, co3d, vkitti, folder")


class _SpecDataset(Dataset):
    """Map-style dataset indexed by `SampleSpec`s (the batch sampler yields lists of them)."""

    def __init__(self, source: SceneSource, augment: AugmentConfig | None):
        self.source, self.augment = source, augment

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, spec: SampleSpec) -> dict[str, torch.Tensor]:
        sample = build_sample(self.source, spec, self.augment)
        sample["_state"] = torch.tensor([spec.step + 1, spec.next_position])
        return sample


def _collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    keys = samples[0].keys()
    batch = {key: torch.stack([s[key] for s in samples]) for key in keys}
    if "tracks" in batch:
        batch["query_points"] = batch["tracks"][:, 0]
    return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # each worker renders/decodes one scene; threads would only contend


class SceneLoader:
    """Iterates batches forever; remembers the sampler state of the last batch handed out."""

    def __init__(self, source: SceneSource, sampler: DynamicBatchSampler, augment: AugmentConfig | None,
                 num_workers: int, pin_memory: bool = False):
        self.source, self.sampler, self.augment = source, sampler, augment
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._state = sampler.state_dict()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.sampler.load_state_dict(self._state)  # restart where the consumer is, not the prefetcher
        loader = DataLoader(_SpecDataset(self.source, self.augment), batch_sampler=self.sampler,
                            num_workers=self.num_workers, collate_fn=_collate, pin_memory=self.pin_memory,
                            worker_init_fn=_worker_init if self.num_workers else None,
                            persistent_workers=False)
        for batch in loader:
            step, position = batch.pop("_state")[0].tolist()
            self._state = {"step": int(step), "position": int(position)}
            yield batch

    def shape_at(self, step: int) -> StepShape:
        return self.sampler.shape_at(step)

    def state_dict(self) -> dict[str, int]:
        """The position after the last batch this loader yielded (prefetched batches not counted)."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._state = {"step": int(state["step"]), "position": int(state["position"])}


def build_dataloader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, split: str = "train",
                     frames_per_gpu: int | None = None, num_workers: int | None = None,
                     pin_memory: bool = False) -> SceneLoader:
    """The loader of one rank. `frames_per_gpu` overrides cfg.frames_per_gpu (pass the planner's value
    when the recipe says "auto"); augmentation applies to the train split only."""
    cfg.validate()
    budget = cfg.frames_per_gpu if frames_per_gpu is None else frames_per_gpu
    if budget == "auto":
        raise ValueError("data.frames_per_gpu is 'auto': pass frames_per_gpu= from the memory planner")
    source = build_source(cfg, split)
    sampler = DynamicBatchSampler(len(source), cfg, int(budget), rank, world_size, split)
    augment = cfg.augment if split == "train" else None
    workers = cfg.num_workers if num_workers is None else num_workers
    return SceneLoader(source, sampler, augment, workers, pin_memory)


def move_batch(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Every tensor of a batch to `device` (non-blocking when the batch is pinned)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
