"""Context parallelism's data: each rank of a group builds only its share of a scene's frames, and the
group completes the batch (data/split_scenes.py) into exactly what one process building the whole
scene gets.

- In process: for every source kind, a share of a scene (`SampleSpec.frames`) reads or renders only
  its frames, and they are the whole scene's frames, with augmentation on (each frame's random draws
  come from its own generator).
- Spawned gloo groups of 2 and 4: the loader's batches, completed over the group, equal the batches of
  one process holding whole scenes (normalisation's sums cross ranks; the ground truth is gathered).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from data_writers import render_world, write_co3d

from vggt_fsdp.data import DataConfig, build_dataloader, build_source
from vggt_fsdp.data.base import SampleSpec, build_sample
from vggt_fsdp.data.config import AugmentConfig
from vggt_fsdp.data.split_scenes import FRAME_KEYS

FRAMES = 4
AUGMENT = AugmentConfig(cojitter_prob=0.0)  # every frame jitters on its own draws
SHARES = [(2, [(0, 2), (2, 4)]), (4, [(0, 1), (1, 2), (2, 3), (3, 4)])]


def _spec(frames=None) -> SampleSpec:
    return SampleSpec(index=0, num_frames=FRAMES, image_hw=(42, 56), seed=(7, 0, 3, 0, 0), step=3,
                      next_position=1, frames=frames)


def _synthetic(tmp_path: Path):
    return build_source(DataConfig(frames_range=[2, FRAMES], frames_per_gpu=FRAMES, image_width=56), "train")


def _co3d(tmp_path: Path):
    anno = write_co3d(tmp_path, render_world(11, FRAMES, (48, 64)))
    cfg = DataConfig(source="co3d", root=str(tmp_path), frames_range=[2, FRAMES], frames_per_gpu=FRAMES,
                     image_width=56, num_workers=0)
    cfg.co3d.annotation_dir = str(anno)
    cfg.co3d.min_frames = 2
    source = build_source(cfg, "train")
    source.frame_window, source.replace = 0, True  # 4 picks from 4 frames: repeats, so order matters
    return source


class _Counted:
    """Counts the frames a source reads (real formats) or renders (synthetic)."""

    def __init__(self, monkeypatch, source):
        self.calls = 0
        if hasattr(source, "read_frame"):
            inner = source.read_frame
            monkeypatch.setattr(source, "read_frame", lambda *a: self._count(inner, *a))
        else:
            import vggt_fsdp.data.synthetic as synthetic

            inner = synthetic.render
            monkeypatch.setattr(synthetic, "render", lambda *a: self._count(inner, *a))

    def _count(self, inner, *args):
        self.calls += 1
        return inner(*args)


@pytest.mark.parametrize("make_source", [_synthetic, _co3d], ids=["synthetic", "co3d"])
@pytest.mark.parametrize("size, shares", SHARES, ids=["N=2", "N=4"])
def test_a_share_of_a_scene_builds_only_its_frames_and_they_are_the_whole_scenes(
        make_source, size, shares, tmp_path, monkeypatch):
    source = make_source(tmp_path)
    whole = build_sample(source, _spec(), AUGMENT)
    counted = _Counted(monkeypatch, source)
    for start, stop in shares:
        counted.calls = 0
        part = build_sample(source, _spec((start, stop)), AUGMENT)
        assert counted.calls == stop - start  # no frame of another rank is read or rendered
        assert torch.equal(part["images"], whole["images"][start:stop])
        assert torch.equal(part["intrinsics"], whole["intrinsics"][start:stop])
        assert torch.equal(part["point_masks"], whole["point_masks"][start:stop])
        # a share stays in world coordinates: the group normalises it (the spawned test below)
        assert "scene_scale" not in part
        torch.testing.assert_close(part["depths"] / whole["scene_scale"], whole["depths"][start:stop])
    # the frames differ from one another (augmentation and cameras), so the equalities above place them
    assert not torch.equal(whole["images"][0], whole["images"][1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data(frames_per_gpu: int) -> DataConfig:
    return DataConfig(frames_range=[FRAMES, FRAMES], frames_per_gpu=frames_per_gpu, image_width=56, num_workers=0,
                      aspect_range=[0.5, 1.0])


def _batches(loader, count: int = 2) -> list[dict]:
    return [batch for _, batch in zip(range(count), loader)]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from vggt_fsdp.data.split_scenes import complete_split_batch
    from vggt_fsdp.parallel.context import new_context_group

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = new_context_group(world)
    loader = build_dataloader(_data(FRAMES // world), rank=rank, world_size=world, context_parallel=world)
    raw = _batches(loader)
    done = [complete_split_batch(batch, group)[0] for batch in raw]
    torch.save({"raw_frames": [b["images"].shape[1] for b in raw], "batches": done},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("size", [2, 4])
def test_a_group_completes_its_shares_into_the_batches_one_process_builds(size, tmp_path):
    want = _batches(build_dataloader(_data(FRAMES), rank=0, world_size=1))
    mp.spawn(_worker, args=(size, _free_port(), str(tmp_path)), nprocs=size, join=True)
    for rank in range(size):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        share = slice(rank * FRAMES // size, (rank + 1) * FRAMES // size)
        assert got["raw_frames"] == [FRAMES // size] * len(want)  # the loader built this rank's frames only
        for batch, whole in zip(got["batches"], want):
            assert torch.equal(batch["images"], whole["images"][:, share])
            for key in (*FRAME_KEYS, "scene_scale"):
                torch.testing.assert_close(batch[key], whole[key], rtol=1e-6, atol=1e-6, msg=key)


class _Alone:
    """A group of one (FrameGroup): what the rank has is the group's."""

    def first_frame(self, x):
        return x

    def sum(self, x):
        return x

    def gather_frames(self, x, dim=1):
        return x


def test_a_scene_without_valid_depth_is_scaled_by_one_and_reported_at_the_next_log_step():
    """The group's sums stay on the device (no host read each step): an empty scene is scaled by 1 and
    flagged, and the task raises where the trainer reads counts anyway (data_counts, at log steps)."""
    from vggt_fsdp.data import DataError
    from vggt_fsdp.data.split_scenes import complete_split_batch
    from vggt_fsdp.tasks.vggt import VGGTTask

    raw = _batches(build_dataloader(_data(FRAMES), context_parallel=1), 1)[0]
    raw["point_masks"][:] = False  # no valid depth in any frame
    batch, has_depth = complete_split_batch(raw, _Alone())
    assert has_depth.tolist() == [False] * len(raw["images"])
    assert (batch["scene_scale"] == 1).all() and torch.isfinite(batch["extrinsics"]).all()

    class Loader:
        def data_counts(self):
            return {"frames": {}}

    task = VGGTTask(Loader(), None, 14, 5, tracks=False, context=_Alone())
    task.to_device(_batches(build_dataloader(_data(FRAMES)), 1)[0], torch.device("cpu"))
    assert task.data_counts() == {"frames": {}}  # scenes with depth: nothing to report
    task.to_device(raw, torch.device("cpu"))
    with pytest.raises(DataError, match="1 scene.* had no valid depth in any frame"):
        task.data_counts()
