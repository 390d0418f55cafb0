"""End to end: the tiny VGGT trained by the real entry points on 2 CPU processes (gloo), fp32.

One scenario covers the acceptance criteria with three launches:
  A  `vggt-fsdp train` (which runs `accelerate launch`): 4 steps straight, checkpoint every 2;
  B1 `accelerate launch -m vggt_fsdp.train`: the same recipe, killed (SIGKILL) while writing the
     step-4 checkpoint, which must leave step 2 complete and the half-written one unused;
  B2 `torchrun -m vggt_fsdp.train`: resume=auto continues from step 2 to step 4.
A and B1+B2 must log the same losses and export the same weights (1e-6), and the export must load
strictly into the model. Two single-process trainings (side by side) show the loss falling, the track
loss with the track head on too.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import finish, start

from vggt_fsdp.parallel.accelerate import accelerate_config_yaml
from vggt_fsdp.recipe import load_recipe
from vggt_fsdp.train import checkpoint as ckpt
from vggt_fsdp.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "cpu_tiny.yaml")
# Small and exact: fp32 everywhere, 56 px wide, 2-3 frames per scene, no loader workers.
TINY = ["data.image_width=56", "data.frames_range=[2,3]", "data.frames_per_gpu=3", "data.num_workers=0",
        "parallel.precision.param_dtype=fp32", "accelerate.mixed_precision=no", "train.log_every=1",
        "train.progress_bar=false", "schedule.warmup_steps=1"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def _start(command: list[str], **env: str) -> subprocess.Popen:
    return start(command, _env(**env))


def _launch(command: list[str], timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    return finish(_start(command, **env), timeout)


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"


def _exported(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    common = [*TINY, "train.max_steps=4", "train.checkpoint_every=2", "train.keep_last=3",
              "train.val_every=2", "train.val_batches=1"]
    a = _launch([sys.executable, "-m", "vggt_fsdp.cli", "train", RECIPE, *common,
                 f"train.output_dir={root / 'a'}", "train.log_with=[tensorboard]"])
    _check(a)
    acc_cfg = root / "accelerate.yaml"
    acc_cfg.write_text(accelerate_config_yaml(load_recipe(RECIPE, TINY)))
    b1 = _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_cfg),
                  "-m", "vggt_fsdp.train", RECIPE, *common, f"train.output_dir={root / 'b'}"],
                 VGGT_FSDP_CRASH_IN_SAVE="4")
    checkpoints_after_crash = [s for s, _ in ckpt.complete_checkpoints(root / "b" / "checkpoints")]
    leftovers = sorted(p.name for p in (root / "b" / "checkpoints").iterdir())
    b2 = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                  "-m", "vggt_fsdp.train", RECIPE, *common, f"train.output_dir={root / 'b'}"])
    _check(b2)
    return {"root": root, "a": a, "b1": b1, "b2": b2, "after_crash": checkpoints_after_crash,
            "leftovers": leftovers}


def test_kill_during_checkpoint_write_leaves_previous_checkpoint(runs):
    assert runs["b1"].returncode != 0  # it was killed
    assert runs["after_crash"] == [2]
    assert ".tmp-step-0000004" in runs["leftovers"] and "step-0000004" not in runs["leftovers"]
    assert "resumed from" in runs["b2"].stderr and "step-0000002 at step 2" in runs["b2"].stderr


def test_vggt_fsdp_train_ends_with_a_summary_and_no_fsdp_view_warning(runs):
    err = runs["a"].stderr
    out = runs["root"] / "a"
    summary = err[err.index("[vggt-fsdp] run ended after"):].splitlines()
    assert summary[0].endswith(f": {out}") and summary[1].startswith("  loss ")
    assert summary[1].endswith("(mean of steps 4-4)")  # train.log_every=1 here
    assert summary[3].startswith(f"  checkpoints  {out / 'checkpoints'} (step-0000002, step-0000004;")
    assert summary[4].startswith(f"  weights      {out / 'model.safetensors'} (")
    assert "returned a view tensor" not in err  # FSDP2's warning about the DPT heads (issue 22)


def test_resume_is_exact(runs):
    a = [r for r in read_metrics(runs["root"] / "a" / "metrics.jsonl") if "val" not in r]
    b = [r for r in read_metrics(runs["root"] / "b" / "metrics.jsonl") if "val" not in r]
    # The killed run logged steps 1-4; resumed from step 2, its records of 3-4 moved to
    # metrics-discarded.jsonl and 3-4 were logged again: each step once.
    b_by_step = {r["step"]: r["loss"] for r in b}
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["step"] for r in b] == [1, 2, 3, 4]
    for record in a:
        assert b_by_step[record["step"]] == pytest.approx(record["loss"], rel=0, abs=1e-6)
    wa, wb = _exported(runs["root"] / "a" / "model.safetensors"), _exported(runs["root"] / "b" / "model.safetensors")
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-6, msg=name)


def test_tensorboard_holds_the_loss_of_every_logged_step(runs):
    """Run A logged to TensorBoard through Accelerate's tracker (train.log_with): the events hold the
    loss of each logged step as metrics.jsonl has it, and the throughput and validation scalars."""
    pytest.importorskip("tensorboard")
    from test_tasks import tensorboard_scalars

    folder = runs["root"] / "a" / "tensorboard"
    logged = {r["step"]: r["loss"] for r in read_metrics(runs["root"] / "a" / "metrics.jsonl") if "val" not in r}
    assert tensorboard_scalars(folder, "loss") == pytest.approx(logged, rel=1e-6)
    assert sorted(tensorboard_scalars(folder, "frames_per_s")) == [1, 2, 3, 4]
    assert sorted(tensorboard_scalars(folder, "loss_terms/loss_camera")) == [1, 2, 3, 4]
    assert sorted(tensorboard_scalars(folder, "val/camera_auc30")) == [2, 4]


def test_export_loads_strictly_and_equals_checkpoint(runs, tmp_path):
    from vggt_fsdp.model import build_model, load_weights
    from vggt_fsdp.recipe import model_config

    out = tmp_path / "exported.safetensors"
    result = _launch([sys.executable, "-m", "vggt_fsdp.cli", "export", str(runs["root"] / "a"), str(out)])
    _check(result)
    assert "step-0000004" in result.stdout
    model = build_model(model_config(load_recipe(RECIPE, TINY).model))
    report = load_weights(model, out, strict=True)
    assert report.ok
    exported = _exported(out)
    final = _exported(runs["root"] / "a" / "model.safetensors")  # written by the run itself
    state = model.state_dict()
    for name, value in final.items():
        assert torch.equal(exported[name], value)
        assert torch.equal(state[name], value)
    # The training moved the weights: the export is not the initialisation.
    init = build_model(model_config(load_recipe(RECIPE, TINY).model)).state_dict()
    assert any(not torch.equal(init[n], final[n]) for n in final if final[n].is_floating_point())


def test_metrics_records_have_the_documented_fields(runs):
    record = [r for r in read_metrics(runs["root"] / "a" / "metrics.jsonl") if "val" not in r][-1]
    for key in ("step", "loss", "loss_terms", "lr", "grad_norm", "grad_norm_groups", "step_time_s",
                "data_wait_s", "frames_per_s", "tokens_per_s", "peak_allocated_gib", "peak_reserved_gib",
                "host_rss_gib", "world_size", "sharding", "checkpoint_policy", "device"):
        assert key in record, key
    assert record["world_size"] == 2 and record["device"] == "cpu" and record["peak_allocated_gib"] is None
    assert record["frames_per_s"] > 0 and record["host_rss_gib"] > 0
    assert {"loss_camera", "loss_depth", "loss_point"} <= set(record["loss_terms"])
    assert set(record["grad_norm_groups"]) == {"aggregator", "camera", "depth", "point"}
    # Frames and replaced bad frames per source, summed over both ranks since the run began.
    assert record["data"]["skipped_frames"] == {"synthetic": 0} and record["data"]["frames"]["synthetic"] > 0


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """Two single-process trainings, side by side (each keeps one core busy):
    - "fit": the recipe's model and precision on a small fixed set of synthetic scenes, 100 steps;
    - "track": `vggt-fsdp train recipes/cpu_tiny.yaml model.heads.track=true` in short (56 px, two
      scenes, 16 steps; loss.track is on by default with the head: "auto")."""
    root = tmp_path_factory.mktemp("fits")
    small = ["data.image_width=56", "data.frames_range=[2,3]", "data.frames_per_gpu=3", "data.num_workers=0",
             "train.checkpoint_every=0", "train.progress_bar=false"]
    commands = {
        "fit": [*small, "data.synthetic.num_scenes=4", "schedule.warmup_steps=5", "train.max_steps=100",
                "train.log_every=10"],
        "track": [*small, "model.heads.track=true", "data.synthetic.num_scenes=2",
                  "data.synthetic.num_track_queries=16", "schedule.warmup_steps=2", "train.max_steps=16",
                  "train.log_every=8"],
    }
    procs = {name: _start([sys.executable, "-m", "vggt_fsdp.train", RECIPE, *overrides,
                           f"train.output_dir={root / name}"]) for name, overrides in commands.items()}
    for proc in procs.values():
        _check(finish(proc, timeout=480))
    return {name: read_metrics(root / name / "metrics.jsonl") for name in commands}


def test_loss_falls_on_the_tiny_synthetic_task(fits):
    """With log_every=10 the first record is the mean of the first ten steps and the last the mean of
    the final ten."""
    records = fits["fit"]
    assert [r["step"] for r in records] == list(range(10, 101, 10))
    first_ten, final = records[0]["loss"], records[-1]["loss"]
    assert final <= 0.5 * first_ten, [round(r["loss"], 3) for r in records]


def test_training_with_the_track_head_lowers_the_track_loss(fits):
    """The mean track loss of the second eight steps is below that of the first eight."""
    first, second = (r["loss_terms"]["loss_track_total"] for r in fits["track"])
    assert second < first


def test_validation_reports_pose_auc_and_depth_absrel(runs):
    a = [r for r in read_metrics(runs["root"] / "a" / "metrics.jsonl") if "val" in r]
    b = [r for r in read_metrics(runs["root"] / "b" / "metrics.jsonl") if "val" in r]
    assert [r["step"] for r in a] == [2, 4]
    for record in a:
        assert 0.0 <= record["val"]["camera_auc30"] <= 1.0 and record["val"]["depth_absrel"] >= 0.0
    # The same held-out batches every time, and validating does not disturb training's RNG streams:
    # the resumed run's step-4 validation equals the straight run's.
    assert b[-1]["step"] == 4 and b[-1]["val"] == pytest.approx(a[-1]["val"], rel=0, abs=1e-6)


def test_sigterm_to_vggt_fsdp_train_saves_and_exits_zero(tmp_path):
    """Preemption through the real launcher chain: `vggt-fsdp train` -> accelerate launch -> 2 ranks."""
    import json
    import time

    out = tmp_path / "pre"
    command = [sys.executable, "-m", "vggt_fsdp.cli", "train", RECIPE, *TINY, "train.max_steps=10000",
               "train.checkpoint_every=0", f"train.output_dir={out}"]
    proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert (out / "metrics.jsonl").is_file(), "training did not start"
        proc.send_signal(signal.SIGTERM)  # to the command only; it passes the signal on
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    info = json.loads((out / "preempted.json").read_text())
    assert info["step"] >= 1 and "preempted at step" in err
    assert [s for s, _ in ckpt.complete_checkpoints(out / "checkpoints")] == [info["step"]]
    assert not (out / "model.safetensors").exists()  # a preempted run is not finished
