"""Data for VGGT training: sources, mixtures, batch planning and the loader the trainer iterates.

Entry point: `build_dataloader(cfg, rank=..., world_size=..., split="train", frames_per_gpu=...)`.
It returns a `SceneLoader`: an iterable of batch dicts (CPU tensors) with upstream's keys

    images (B,S,3,H,W) in [0,1], depths (B,S,H,W), extrinsics (B,S,3,4) OpenCV camera-from-world,
    intrinsics (B,S,3,3) in pixels (pixel (u, v) centred at image coordinate (u, v), as upstream's
    training code; see geometry.py), world_points / cam_points (B,S,H,W,3), point_masks (B,S,H,W) bool,
    tracks (B,S,N,2) in image coordinates (column, row), track_vis_mask (B,S,N) bool and
    query_points (B,N,2) = tracks[:, 0] when the source has tracks (synthetic),
    skipped_frames (B,) (bad frames replaced under data.skip_bad_frames), scene_scale (B,) (the
    normalisation divisor) and source_index (B,) (which of data.source_configs() each scene is from),

plus `state_dict()` / `load_state_dict()` for resuming mid-epoch, and `data_counts()`: frames served
and bad frames skipped per source on this rank since the run began (kept across resumes), for
metrics.jsonl. Shapes agree across ranks at every step (S and H are drawn from (seed, step)),
B = floor(frames_per_gpu / S). A mixture (data.sources) interleaves its sources' scenes by their
epoch lengths or weights, the same on every rank (vggt_fsdp.data.sampler).

Geometry is normalised as upstream: expressed in each scene's first camera frame and divided by the
mean distance of its valid points.
"""
from __future__ import annotations

import logging
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from vggt_fsdp.data.base import DataError, SampleSpec, SceneSource, build_sample
from vggt_fsdp.data.config import AugmentConfig, DataConfig, SourceConfig, SyntheticConfig
from vggt_fsdp.data.sampler import DynamicBatchSampler, Mixture, StepShape

__all__ = ["AugmentConfig", "DataConfig", "DataError", "SceneLoader", "SourceConfig", "SyntheticConfig",
           "build_dataloader", "build_source", "build_sources", "move_batch"]

_log = logging.getLogger(__name__)


def make_source(cfg: SourceConfig, data: DataConfig, split: str, strict: bool = True) -> SceneSource:
    """The scenes of one split of one source (real formats are imported only when used). strict=False
    (the `data check` command) records scenes that cannot be listed instead of raising."""
    if cfg.source == "synthetic":
        from vggt_fsdp.data.synthetic import SyntheticSource
        return SyntheticSource(cfg, data, split)
    if cfg.source == "co3d":
        from vggt_fsdp.data.co3d import Co3dSource
        return Co3dSource(cfg, data, split, strict)
    if cfg.source == "vkitti":
        from vggt_fsdp.data.vkitti import VKittiSource
        return VKittiSource(cfg, data, split, strict)
    if cfg.source == "folder":
        from vggt_fsdp.data.folder import FolderSource
        return FolderSource(cfg, data, split, strict)
    if cfg.source == "colmap":
        from vggt_fsdp.data.colmap import ColmapSource
        return ColmapSource(cfg, data, split, strict)
    raise ValueError(f"source={cfg.source!r}; valid: synthetic, co3d, vkitti, folder, colmap")


def build_sources(cfg: DataConfig, split: str) -> list[SceneSource]:
    """One source per entry of cfg.source_configs()."""
    return [make_source(source_cfg, cfg, split) for source_cfg in cfg.source_configs()]


def build_source(cfg: DataConfig, split: str) -> SceneSource:
    """The scenes of one split of a single-source data section."""
    if cfg.sources:
        raise ValueError("build_source reads one source; this data section lists data.sources: use build_sources")
    return make_source(cfg, cfg, split)


def build_mixture(cfg: DataConfig, sources: list[SceneSource], split: str) -> Mixture:
    """Epoch lengths of the sources: on the train split each entry's epoch_length (default: its scene
    count) or its weight's share of all sources' scenes; on the val split every scene once."""
    configs = cfg.source_configs()
    counts = [len(source) for source in sources]
    labels = [c.label for c in configs]
    if split == "train":
        for label, count in zip(labels, counts):
            if count == 0:
                raise DataError(f"data source {label!r} has no train scenes (check its root and val_fraction)")
        if configs[0].weight is not None:  # validated: all entries or none
            total_weight = sum(c.weight for c in configs)
            lengths = [max(1, round(c.weight / total_weight * sum(counts))) for c in configs]
        else:
            lengths = [c.epoch_length or count for c, count in zip(configs, counts)]
    else:
        lengths = counts
    return Mixture(counts, lengths, cfg.seed, split, labels)


class _SpecDataset(Dataset):
    """Map-style dataset indexed by `SampleSpec`s (the batch sampler yields lists of them)."""

    def __init__(self, sources: list[SceneSource], augment: AugmentConfig | None):
        self.sources, self.augment = sources, augment

    def __len__(self) -> int:
        return sum(len(source) for source in self.sources)

    def __getitem__(self, spec: SampleSpec) -> dict[str, torch.Tensor]:
        sample = build_sample(self.sources[spec.source], spec, self.augment)
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
    """Iterates batches forever; remembers the sampler state of the last batch handed out and counts
    frames and skipped frames per source."""

    def __init__(self, sources: list[SceneSource], sampler: DynamicBatchSampler, augment: AugmentConfig | None,
                 num_workers: int, pin_memory: bool = False):
        self.sources, self.sampler, self.augment = sources, sampler, augment
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.labels = sampler.mixture.labels
        self._state = sampler.state_dict()
        self._counts = {key: dict.fromkeys(self.labels, 0) for key in ("frames", "skipped_frames")}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.sampler.load_state_dict(self._state)  # restart where the consumer is, not the prefetcher
        loader = DataLoader(_SpecDataset(self.sources, self.augment), batch_sampler=self.sampler,
                            num_workers=self.num_workers, collate_fn=_collate, pin_memory=self.pin_memory,
                            worker_init_fn=_worker_init if self.num_workers else None,
                            persistent_workers=False)
        for batch in loader:
            step, position = batch.pop("_state")[0].tolist()
            self._state = {"step": int(step), "position": int(position)}
            self._count(batch)
            yield batch

    def _count(self, batch: dict[str, torch.Tensor]) -> None:
        frames = batch["images"].shape[1]
        for index, skipped in zip(batch["source_index"].tolist(), batch["skipped_frames"].tolist()):
            label = self.labels[index]
            self._counts["frames"][label] += frames
            self._counts["skipped_frames"][label] += int(skipped)

    def data_counts(self) -> dict[str, dict[str, int]]:
        """{"frames": {source: n}, "skipped_frames": {source: n}}: frames this rank's batches held and
        bad frames replaced in them (data.skip_bad_frames), per source label, since the run began
        (checkpointed with the loader's state). The trainer sums them over ranks at log steps."""
        return {key: dict(values) for key, values in self._counts.items()}

    def shape_at(self, step: int) -> StepShape:
        return self.sampler.shape_at(step)

    def state_dict(self) -> dict:
        """The position after the last batch this loader yielded (prefetched batches not counted),
        what each source has consumed by then, the mixture it refers to, and the counts."""
        mixture = self.sampler.mixture
        return {**self._state, "consumed": mixture.consumed(self._state["position"]),
                "mixture": mixture.describe(), "counts": self.data_counts()}

    def load_state_dict(self, state: dict) -> None:
        self._state = {"step": int(state["step"]), "position": int(state["position"])}
        saved = state.get("mixture")
        if saved is not None and [list(entry) for entry in saved] != self.sampler.mixture.describe():
            _log.warning("the data sources changed since this state was saved (was [label, epoch length, scenes] "
                         "%s, now %s): the sampler continues at position %d of the new mixture, not where each "
                         "source left off", saved, self.sampler.mixture.describe(), self._state["position"])
        for key, values in (state.get("counts") or {}).items():
            for label, count in values.items():
                if key in self._counts and label in self._counts[key]:
                    self._counts[key][label] = int(count)


def build_dataloader(cfg: DataConfig, *, rank: int = 0, world_size: int = 1, split: str = "train",
                     frames_per_gpu: int | None = None, num_workers: int | None = None,
                     pin_memory: bool = False, context_parallel: int = 1) -> SceneLoader:
    """The loader of one rank. `frames_per_gpu` overrides cfg.frames_per_gpu (pass the planner's value
    when the recipe says "auto"); augmentation applies to the train split only. With `context_parallel`
    N > 1 the N consecutive ranks of a group draw the same scenes and each builds only its share of their
    frames, in world coordinates: the group completes the batch (data/split_scenes.py)."""
    cfg.validate()
    budget = cfg.frames_per_gpu if frames_per_gpu is None else frames_per_gpu
    if budget == "auto":
        raise ValueError("data.frames_per_gpu is 'auto': pass frames_per_gpu= from the memory planner")
    sources = build_sources(cfg, split)
    if world_size % context_parallel:
        raise ValueError(f"context_parallel={context_parallel} does not divide the world size {world_size}")
    sampler = DynamicBatchSampler(build_mixture(cfg, sources, split), cfg, int(budget), rank // context_parallel,
                                  world_size // context_parallel, split, context_parallel, rank % context_parallel)
    augment = cfg.augment if split == "train" else None
    workers = cfg.num_workers if num_workers is None else num_workers
    return SceneLoader(sources, sampler, augment, workers, pin_memory)


def move_batch(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Every tensor of a batch to `device` (non-blocking when the batch is pinned)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
