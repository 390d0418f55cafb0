"""Mixtures of sources (data.sources): the sampler shared by all ranks, resuming both sources' positions,
per-source counts, and the recipe checks; end to end, a two-source recipe trained on 2 CPU processes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_writers import render_world, write_folder
from processes import finish, start
from vggt_fsdp.data import DataConfig, SourceConfig, build_dataloader
from vggt_fsdp.data.sampler import DynamicBatchSampler, Mixture
from vggt_fsdp.recipe import RecipeError, load_recipe
from vggt_fsdp.train import checkpoint as ckpt
from vggt_fsdp.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def test_an_epoch_holds_each_sources_epoch_length_and_visits_its_scenes_evenly():
    mixture = Mixture([5, 40], [12, 30], seed=3, labels=["small", "big"])
    draws = [mixture.at(p) for p in range(3 * 42)]
    for epoch in range(3):
        sources = Counter(source for source, _ in draws[42 * epoch:42 * (epoch + 1)])
        assert sources == {0: 12, 1: 30}
    small = Counter(scene for source, scene in draws if source == 0)  # 36 draws of 5 scenes
    assert set(small) == set(range(5)) and max(small.values()) - min(small.values()) <= 1
    big = [scene for source, scene in draws if source == 1]
    assert sorted(big[:40]) == list(range(40))  # one pass over its scenes before any repeats
    assert draws[:42] != draws[42:84]  # reshuffled every epoch
    assert mixture.consumed(50) == {"small": 12 + sum(s == 0 for s, _ in draws[42:50]),
                                    "big": 30 + sum(s == 1 for s, _ in draws[42:50])}
    assert [Mixture([5, 40], [12, 30], seed=3).at(p) for p in range(42)] == draws[:42]  # pure function


def test_one_source_keeps_the_single_source_samplers_order():
    """A recipe with one `source` samples exactly as before mixtures existed (a resumed older run
    continues with the same scenes)."""
    mixture = Mixture([7], [7], seed=4)
    for epoch in range(3):
        perm = np.random.default_rng([4, 0, epoch, 0x9E]).permutation(7)
        assert [mixture.at(7 * epoch + i) for i in range(7)] == [(0, int(s)) for s in perm]


def test_every_rank_plans_the_same_steps_from_one_mixture():
    cfg = DataConfig(frames_range=[2, 4], frames_per_gpu=8)
    samplers = [DynamicBatchSampler(Mixture([5, 9], [5, 9], seed=0), cfg, 8, rank, 2) for rank in range(2)]
    for step in range(6):
        position = samplers[0].state_at(step)["position"]
        specs = [s.specs_at(step, position) for s in samplers]
        assert specs[0][0].num_frames == specs[1][0].num_frames and specs[0][0].image_hw == specs[1][0].image_hw
        taken = [(spec.source, spec.index) for rank in specs for spec in rank]
        expected = [samplers[0].mixture.at(position + i) for i in range(len(taken))]
        assert taken == expected  # rank r takes the r-th contiguous slice of the step's positions


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    for i in range(2):
        write_folder(root, render_world(20 + i, 4, (20, 28)), scene=f"scene_{i}", depth_kinds=("npy",))
    return root


def _mixture_cfg(folder_root: Path, **kw) -> DataConfig:
    cfg = DataConfig(sources=[SourceConfig(source="synthetic"),
                              SourceConfig(source="folder", root=str(folder_root), name="mine", val_fraction=0.0)],
                     frames_range=[2, 3], frames_per_gpu=6, image_width=28, aspect_range=[0.5, 1.0],
                     num_workers=0, **kw)
    cfg.sources[0].synthetic.num_scenes = 4
    cfg.sources[0].synthetic.num_track_queries = 0
    return cfg


def test_a_mixture_loader_serves_both_sources_counts_them_and_resumes_exactly(folder_root):
    cfg = _mixture_cfg(folder_root)
    loader = build_dataloader(cfg, rank=1, world_size=2)
    it = iter(loader)
    batches = [next(it)]
    state = loader.state_dict()
    batches += [next(it) for _ in range(5)]
    sources = torch.cat([b["source_index"] for b in batches])
    assert set(sources.tolist()) == {0, 1}
    frames = {"synthetic": 0, "mine": 0}
    for b in batches:
        for index in b["source_index"].tolist():
            frames[["synthetic", "mine"][index]] += b["images"].shape[1]
    assert loader.data_counts() == {"frames": frames, "skipped_frames": {"synthetic": 0, "mine": 0}}
    # the state names how far each source got; both ranks consumed those positions together
    assert sum(state["consumed"].values()) == state["position"] and set(state["consumed"]) == {"synthetic", "mine"}
    assert state["mixture"] == [["synthetic", 4, 4], ["mine", 2, 2]]
    resumed = build_dataloader(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    again = list(zip(range(5), resumed))
    for (_, a), b in zip(again, batches[1:]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed batches differ"
    assert resumed.data_counts() == loader.data_counts()  # counts continue from the checkpointed ones


def test_weights_split_the_epoch_and_changed_mixtures_are_reported_on_resume(folder_root, caplog):
    cfg = _mixture_cfg(folder_root)
    cfg.sources[0].weight, cfg.sources[1].weight = 3.0, 1.0
    loader = build_dataloader(cfg)
    assert loader.sampler.mixture.epoch_lengths == [round(0.75 * 6), round(0.25 * 6)]  # 6 scenes in all
    state = loader.state_dict()
    changed = _mixture_cfg(folder_root)
    changed.sources[1].epoch_length = 10
    with caplog.at_level("WARNING"):
        build_dataloader(changed).load_state_dict(state)
    assert "the data sources changed since this state was saved" in caplog.text


RECIPE = REPO / "recipes" / "cpu_tiny.yaml"


def _overrides(data: dict) -> list[str]:
    return [f"data.{key}={json.dumps(value)}" for key, value in data.items()]  # JSON is YAML flow


@pytest.mark.parametrize("data, message", [
    ({"sources": [{"source": "synthetic"}, {"source": "synthetic"}]},
     r"data.sources\[1\]: name 'synthetic' is already data.sources\[0\]'s"),
    ({"sources": [{"source": "synthetic", "weight": 1.0}, {"source": "folder", "root": "x"}]},
     r"data.sources\[1\] has no weight but data.sources\[0\] has one"),
    ({"sources": [{"source": "synthetic", "weight": 1.0, "epoch_length": 5}]}, r"sets both weight and epoch_length"),
    ({"source": "folder", "root": "x", "sources": [{"source": "synthetic"}]},
     r"data.source is set but data.sources lists the sources"),
    ({"co3d": {"min_frames": 3}, "sources": [{"source": "synthetic"}]}, r"data.co3d is set but data.sources"),
    ({"sources": [{"source": "folder"}]}, r"data.sources\[0\].root is required"),
    ({"sources": [{"source": "synthetic", "pixel_centre": "half"}]},
     r"data.sources\[0\].pixel_centre does not apply to data.sources\[0\].source='synthetic'"),
    ({"sources": [{"source": "colmap", "root": "x", "pixel_centre": "corner"}]},
     r"data.sources\[0\].pixel_centre: 'corner' is not one of"),
    ({"sources": [{"source": "folder", "root": "x", "name": "a b"}]}, r"data.sources\[0\].name='a b'"),
    ({"sources": [{"source": "folder", "root": "x", "epoch_length": 0}]}, r"data.sources\[0\].epoch_length=0"),
    ({"sources": [{"source": "co3d", "root": "x", "co3d": {"min_frames": 0}}]}, r"data.sources\[0\].co3d.min_frames=0"),
    ({"weight": 2.0}, r"data.weight only applies to entries of data.sources"),
    ({"image_width": 0}, r"data.image_width=0 must be a positive multiple of data.patch_size=14"),
])
def test_mixture_recipes_are_checked_at_load(data, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPE, _overrides(data))


def test_a_single_source_recipe_still_loads():
    data = load_recipe(RECIPE, _overrides({"source": "folder", "root": "x", "frame_window": 8})).data
    assert [c.label for c in data.source_configs()] == ["folder"] and data.source_configs()[0] is data


# ----------------------------------------------------------------------------------------------------
# End to end: a recipe mixing two sources on 2 CPU processes

TINY = ["data.image_width=28", "data.frames_range=[2,3]", "data.frames_per_gpu=3", "data.num_workers=0",
        "data.aspect_range=[1.0,1.0]", "parallel.precision.param_dtype=fp32", "accelerate.mixed_precision=no",
        "train.log_every=1", "train.progress_bar=false", "schedule.warmup_steps=1", "train.max_steps=4",
        "train.checkpoint_every=2", "train.keep_last=3"]


def _train(output: Path, sources: str, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "vggt_fsdp.train", str(RECIPE), *TINY, sources,
               f"train.output_dir={output}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = finish(start(command, env), timeout)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"
    return result


def test_a_two_source_recipe_trains_on_two_processes_and_resumes_exactly(tmp_path, folder_root):
    sources = ("data.sources=[{source: synthetic, synthetic: {num_scenes: 6, num_track_queries: 0}}, "
               f"{{source: folder, root: '{folder_root}', name: mine, val_fraction: 0.0}}]")
    straight = tmp_path / "straight"
    _train(straight, sources)
    # the same run stopped after its step-2 checkpoint, then resumed by a new launch
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / ckpt.step_dir_name(4))
    _train(resumed, sources)

    first, second = read_metrics(straight / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    steps = lambda records: {r["step"]: r for r in records if "loss" in r}  # noqa: E731
    a, b = steps(first), steps(second)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6)
        assert b[step]["data"] == a[step]["data"]
    # both sources trained, summed over both ranks, and the counts grow with the steps
    frames = a[4]["data"]["frames"]
    assert set(frames) == {"synthetic", "mine"} and all(n > 0 for n in frames.values())
    assert sum(frames.values()) > sum(a[2]["data"]["frames"].values())
    assert a[4]["data"]["skipped_frames"] == {"synthetic": 0, "mine": 0}
    # each rank's checkpoint holds where both sources stood
    rank_state = torch.load(straight / "checkpoints" / ckpt.step_dir_name(2) / "rank00001.pt", weights_only=False)
    consumed = rank_state["sampler"]["consumed"]
    assert set(consumed) == {"synthetic", "mine"} and sum(consumed.values()) == rank_state["sampler"]["position"]
