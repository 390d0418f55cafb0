"""`vggt-fsdp train recipes/cpu_tiny.yaml parallel.context_parallel=2`: one scene's frames split over 2 CPU
processes train as 1 process holding the whole scene, step for step, and resume exactly.

Three launches, fp32, scenes of 4 frames (2 per rank), 5 steps, validation at step 5:
  CP   `vggt-fsdp train ... parallel.context_parallel=2 data.frames_per_gpu=2` (2 processes),
       checkpoint at step 3;
  ONE  `python -m vggt_fsdp.train ... data.frames_per_gpu=4` (1 process), side by side with CP;
  RES  CP resumed from its step-3 checkpoint to step 5.
At the recipe's learning rate (1e-3) AdamW amplifies the rounding of summing a gradient in two parts:
measured (2026-12-07), loss relative differences ~1e-7 at steps 1-4 and 2.5e-5 at step 5, the same as
one process run with 2 threads against 1 thread (2.6e-5 at step 5): rounding, not a difference in what
is computed. The gradient norm, more sensitive, differs 2.3e-4 at step 5 (2 threads against 1: 2.9e-4),
so it is held to 1e-3 and the loss to the issue's 1e-4.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from processes import finish, start

from vggt_fsdp.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "cpu_tiny.yaml")
COMMON = ["data.image_width=56", "data.frames_range=[4,4]", "data.num_workers=0",
          "parallel.precision.param_dtype=fp32", "accelerate.mixed_precision=no", "train.log_every=1",
          "train.progress_bar=false", "schedule.warmup_steps=2", "train.max_steps=5", "train.checkpoint_every=3",
          "train.val_every=5", "train.val_batches=1"]
CP = ["parallel.context_parallel=2", "data.frames_per_gpu=2"]


def _start(command: list[str]):
    return start(command, dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))


def _check(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("context_train")
    cp = _start([sys.executable, "-m", "vggt_fsdp.cli", "train", RECIPE, *COMMON, *CP,
                 f"train.output_dir={root / 'cp'}"])
    one = _start([sys.executable, "-m", "vggt_fsdp.train", RECIPE, *COMMON, "data.frames_per_gpu=4",
                  "accelerate.num_processes=1", f"train.output_dir={root / 'one'}"])
    for proc in (cp, one):
        _check(finish(proc, timeout=400))
    resumed = _start([sys.executable, "-m", "vggt_fsdp.cli", "train", RECIPE, *COMMON, *CP,
                      f"train.resume={root / 'cp' / 'checkpoints' / 'step-0000003'}",
                      f"train.output_dir={root / 'res'}"])
    _check(finish(resumed, timeout=400))
    return {name: read_metrics(root / name / "metrics.jsonl") for name in ("cp", "one", "res")}


def _train(records):
    return {r["step"]: r for r in records if "val" not in r}


def test_two_ranks_sharing_scenes_train_as_one_process(runs):
    cp, one = _train(runs["cp"]), _train(runs["one"])
    assert sorted(cp) == sorted(one) == [1, 2, 3, 4, 5]
    assert cp[5]["world_size"] == 2 and cp[5]["context_parallel"] == 2 and one[5]["world_size"] == 1
    for step in cp:
        assert cp[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-4), step
        assert cp[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-3), step
        assert cp[step]["loss_terms"].keys() == one[step]["loss_terms"].keys()
    # Training moved: the equality is not that of an untouched model.
    assert abs(cp[5]["loss"] - cp[1]["loss"]) > 1e-3
    val_cp = [r["val"] for r in runs["cp"] if "val" in r]
    val_one = [r["val"] for r in runs["one"] if "val" in r]
    assert len(val_cp) == len(val_one) == 1
    assert val_cp[0] == pytest.approx(val_one[0], rel=1e-4)
    assert set(val_cp[0]) == {"loss", "camera_auc30", "depth_absrel"}


def test_context_parallel_run_resumes_exactly(runs):
    cp, res = _train(runs["cp"]), _train(runs["res"])
    assert sorted(res) == [4, 5]
    for step in res:
        assert res[step]["loss"] == pytest.approx(cp[step]["loss"], rel=0, abs=1e-6), step
