"""Preflight: every recipe mistake that used to surface late (after the processes started and built the
model) or never, refused before launch as one line naming the key.

The cases are a table: one line per mistake, `{tmp}` standing for a scratch directory that holds a
file (`afile`), an empty directory (`empty`), a checkpoint directory without its marker
(`not_a_checkpoint`) and initial weights of the wrong model (`wrong.safetensors`).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from vggt_fsdp.recipe import RecipeError, load_recipe
from vggt_fsdp.tasks import preflight
from vggt_fsdp.train.preflight import PreflightError, Problem

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cpu_tiny.yaml"

# (overrides, the key the error names, a phrase of its message). Each was accepted before, or failed
# only after launch (a traceback, a wrong dtype at step 1, or nothing at all).
CASES = {
    "a unit that does not exist": (["parallel.layout.units=[no_such_unit]"], "parallel.layout.units[0]",
                                   "'no_such_unit' matches no module"),
    "an fp32 module that does not exist": (["parallel.precision.fp32_modules=[no_such_head]"],
                                           "parallel.precision.fp32_modules[0]", "matches no module"),
    "an fp32 module that is not a unit": (["parallel.layout.units=[depth_head,point_head]"],
                                          "parallel.precision.fp32_modules[0]",
                                          "camera_head is not an FSDP unit"),
    "a group matching no block": (["parallel.layout.groups.frame=aggregator.frames.*"],
                                  "parallel.layout.groups.frame", "matches no block"),
    "checkpoint.n above the block count": (["parallel.checkpoint.policy=every_n", "parallel.checkpoint.n=1000"],
                                           "parallel.checkpoint.n", "1000 exceeds the"),
    "a group's n above its block count": (["parallel.checkpoint.groups.frame.policy=every_n",
                                           "parallel.checkpoint.groups.frame.n=99"],
                                          "parallel.checkpoint.groups.frame.n", "99 exceeds the"),
    "image width zero": (["data.image_width=0"], "data.image_width", "positive multiple"),
    "a block type the model lacks": (["parallel.layout.block_types=[NoSuchBlock]"], "parallel.layout.block_types[0]",
                                     "'NoSuchBlock' matches no module class of the model"),
    "a misspelt attention type": (["parallel.layout.attention_types=[Atention]"],
                                  "parallel.layout.attention_types[0]",
                                  "(did you mean 'Attention'?); the model's repeated classes: LayerScale (x22)"),
    "a misspelt unit": (["parallel.layout.units=[depth_heads]"], "parallel.layout.units[0]",
                        "'depth_heads' matches no module (did you mean 'depth_head'?)"),
    "no attention type with attention checkpointing": (["parallel.layout.attention_types=[]"], "parallel.layout",
                                                       "attention_types=[]"),
    "a freeze pattern matching nothing": (["model.freeze=[aggregator.patch_embeds.*]"], "model.freeze[0]",
                                          "matches no parameter"),
    "a freeze pattern matching everything": (["model.freeze=['*']"], "model.freeze", "freeze every parameter"),
    "a data root that does not exist": (["data.source=folder", "data.root={tmp}/nowhere"], "data.root",
                                        "does not exist"),
    "a data root that is a file": (["data.source=folder", "data.root={tmp}/afile"], "data.root", "is not a directory"),
    "initial weights that do not exist": (["model.init_weights={tmp}/nowhere.safetensors"], "model.init_weights",
                                          "does not exist"),
    "initial weights of another model": (["model.init_weights={tmp}/wrong.safetensors"], "model.init_weights",
                                         "does not match the model"),
    "a resume path that does not exist": (["train.resume={tmp}/nowhere"], "train.resume", "does not exist"),
    "a resume path that is no checkpoint": (["train.resume={tmp}/not_a_checkpoint"], "train.resume",
                                            "not a complete checkpoint"),
    "frames_per_gpu auto on the CPU": (["data.frames_per_gpu=auto"], "data.frames_per_gpu", "has no GPU"),
    "an output_dir that is a file": (["train.output_dir={tmp}/afile"], "train.output_dir", "is a file"),
    "an output_dir below a file": (["train.output_dir={tmp}/afile/run"], "train.output_dir", "is a file"),
}


@pytest.fixture
def scratch(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_a_checkpoint").mkdir()
    save_file({"aggregator.no_such_tensor": torch.zeros(2)}, str(tmp_path / "wrong.safetensors"))
    return tmp_path


def _problems(overrides: list[str], tmp: Path) -> list[str]:
    """The one-line errors for a recipe: its load error, or its preflight problems."""
    overrides = [o.format(tmp=tmp) for o in overrides]
    if not any(o.startswith("train.output_dir=") for o in overrides):
        overrides.append(f"train.output_dir={tmp / 'run'}")
    try:
        recipe = load_recipe(RECIPE, overrides)
    except RecipeError as err:
        return [str(err).split(": ", 1)[1]]  # without the recipe file's name
    return [str(p) for p in preflight(recipe, cuda=False)]


def test_a_good_recipe_passes(scratch):
    assert _problems([], scratch) == []


@pytest.mark.parametrize("case", list(CASES))
def test_mistake_is_refused_before_launch(case, scratch):
    overrides, key, phrase = CASES[case]
    problems = _problems(overrides, scratch)
    assert any(p.startswith(key) and phrase in p for p in problems), problems
    assert all("\n" not in p for p in problems)


@pytest.mark.parametrize("overrides", [
    ["parallel.layout.units=[camera_head,depth_head,point_head,track_head]"],  # track is disabled
    ["model.heads.point=false", "loss.point.enabled=false"],  # fp32_modules still lists point_head
    ["model.freeze=[track_head.*]"],
    ["parallel.checkpoint.policy=every_n", "parallel.checkpoint.n=2"],
])
def test_patterns_naming_disabled_heads_are_fine(overrides, scratch):
    assert _problems(overrides, scratch) == []


def test_an_unwritable_output_dir_is_refused(scratch, monkeypatch):
    # The tests may run as root, for whom permission bits do not stop a write: os.access decides.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == scratch / "empty" else real(p, mode))
    assert _problems([f"train.output_dir={scratch / 'empty'}"], scratch) == [
        f"train.output_dir: {scratch / 'empty'} is not writable by this user; choose another directory or fix "
        "its permissions"]
    assert "cannot be created" in _problems([f"train.output_dir={scratch / 'empty' / 'run'}"], scratch)[0]


def test_an_output_dir_held_by_a_live_trainer_is_refused(scratch):
    from vggt_fsdp.train.lock import RunLock

    with RunLock(scratch / "run"):  # this process stands for a trainer that is running
        problems = _problems([], scratch)
    assert len(problems) == 1 and problems[0].startswith("train.output_dir: ")
    assert f"PID {os.getpid()} on host {socket.gethostname()}" in problems[0]
    assert _problems([], scratch) == []  # released


def test_train_command_prints_each_problem_and_starts_nothing(scratch, capsys):
    from vggt_fsdp.cli import main

    out = scratch / "run"
    code = main(["train", str(RECIPE), f"train.output_dir={out}", "parallel.layout.units=[no_such_unit]",
                 "model.freeze=[nothing.*]"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    # The heads are no units now, so none of the three fp32 heads would compute in fp32.
    assert [line.split(":")[1].strip() for line in err] == [
        "model.freeze[0]", "parallel.layout.units[0]", "parallel.precision.fp32_modules[0]",
        "parallel.precision.fp32_modules[1]", "parallel.precision.fp32_modules[2]"]
    assert all(line.startswith("error: ") for line in err) and not out.exists()


def test_dry_run_writes_the_config_it_names(scratch, capsys):
    import shlex

    import yaml

    from vggt_fsdp.cli import main

    out = scratch / "run"
    assert main(["train", str(RECIPE), f"train.output_dir={out}", "train.max_steps=3", "--dry-run"]) == 0
    command = shlex.split(capsys.readouterr().out.strip())
    config = Path(command[command.index("--config_file") + 1])
    assert config == out / "accelerate_config.yaml"
    assert yaml.safe_load(config.read_text())["num_processes"] == 2
    assert command[-3:] == [str(RECIPE), f"train.output_dir={out}", "train.max_steps=3"]
    named = scratch / "cfg" / "acc.yaml"
    assert main(["train", str(RECIPE), f"train.output_dir={out}", "--dry-run", "--config-file", str(named)]) == 0
    assert named.is_file() and str(named) in capsys.readouterr().out


def test_preflight_error_survives_the_broadcast_to_other_ranks():
    import pickle

    err = PreflightError([Problem("model.freeze[0]", "'x' matches no parameter")])
    again = pickle.loads(pickle.dumps(err))
    assert again.problems == err.problems and str(again) == "model.freeze[0]: 'x' matches no parameter"


def _decide_on_two_ranks(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from vggt_fsdp.train.faults import rank0_decides, report_failure

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def decide():
        raise PreflightError([Problem("data.root", "/nowhere does not exist")])

    try:
        rank0_decides(decide, (PreflightError,))
    except PreflightError as err:
        report_failure(err)
        Path(out, f"rank{rank}").write_text(str(err))
    dist.barrier()
    dist.destroy_process_group()


def test_rank0s_refusal_reaches_every_rank_and_is_printed_once(tmp_path, capfd):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_decide_on_two_ranks, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["data.root: /nowhere does not exist"] * 2
    err = capfd.readouterr().err
    assert err.count("error: PreflightError: data.root: /nowhere does not exist") == 1
    assert "[vggt-fsdp rank 0]" in err
