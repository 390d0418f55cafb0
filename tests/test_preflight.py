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
    # Issue 21: late (a NaN loss after minutes, a traceback, a 60 GB allocation) or silent before.
    "lr NaN": (["optim.lr=.nan"], "optim.lr", "nan is not a finite number"),
    "lr infinite": (["optim.lr=.inf"], "optim.lr", "inf is not a finite number"),
    "a loss weight NaN": (["loss.depth.weight=.nan"], "loss.depth.weight", "not a finite number"),
    "warmup_start_lr NaN": (["schedule.warmup_start_lr=.nan"], "schedule.warmup_start_lr", "not a finite number"),
    "a clip norm NaN": (["optim.clip_groups.aggregator=.nan"], "optim.clip_groups.aggregator", "not a finite"),
    "a NaN in a free-form section": (["model.overrides.aggregator.drop=-.inf"], "model.overrides.aggregator.drop",
                                     "-inf is not a finite number"),
    "a NaN in a list": (["optim.betas=[0.9, .nan]"], "optim.betas[1]", "not a finite number"),
    "a negative data seed": (["data.seed=-1"], "data.seed", "give a non-negative seed"),
    "a negative train seed": (["train.seed=-1"], "train.seed", "give a non-negative seed"),
    "a seed above 2**63": (["data.seed=9223372036854775808"], "data.seed", "must be in [0, 2**63 - 1]"),
    "an output_dir under /proc": (["train.output_dir=/proc/vggt-fsdp-run"], "train.output_dir",
                                  "cannot be created"),
    "min_lr above lr": (["schedule.min_lr=0.01"], "schedule.min_lr", "is above optim.lr=0.001"),
    "max_steps of 10**21": (["train.max_steps=1000000000000000000000"], "train.max_steps", "a typo?"),
    "max_steps as 1e21": (["train.max_steps=1e21"], "train.max_steps", "expected int, got float"),
    "warmup steps of 10**12": (["schedule.warmup_steps=1000000000000"], "schedule.warmup_steps", "must be in"),
    "a model whose states exceed the process memory": (["model.overrides.aggregator.embed_dim=100000"],
                                                       "model.overrides", "above the 4 GiB of hardware.memory_gib"),
    "a model whose states exceed the host": (["model.overrides.aggregator.embed_dim=100000",
                                              "hardware.memory_gib=100000000"], "model.overrides",
                                             "GiB for this host's 2 process(es) in host memory, above its"),
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


@pytest.mark.parametrize("content", [b"\x00\x01safetensors\x00", "model: {preset: vggt-t\xefny}".encode("latin-1")],
                         ids=["binary", "latin-1"])
def test_a_file_that_is_not_text_is_not_a_recipe(content, tmp_path):
    path = tmp_path / "model.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=r"model\.yaml: not a text YAML recipe \((it holds NUL bytes|byte 22 is "
                       r"not UTF-8)\); name a recipe \.yaml file$"):
        load_recipe(path)


def test_a_model_that_fits_is_not_refused_for_its_size(scratch):
    """The size check counts states only: vggt-tiny's 2 processes need far below cpu_tiny's 4 GiB each."""
    from vggt_fsdp.model import build_model
    from vggt_fsdp.recipe import model_config
    from vggt_fsdp.train.preflight import model_state_problems

    recipe = load_recipe(RECIPE, [f"train.output_dir={scratch / 'run'}"])
    assert model_state_problems(recipe, build_model(model_config(recipe.model), device="meta")) == []
    tight = load_recipe(RECIPE, ["model.overrides.aggregator.embed_dim=2048", "hardware.memory_gib=4"])
    problem, = model_state_problems(tight, build_model(model_config(tight.model), device="meta"))
    assert problem.key == "model.overrides" and "sharded over 2" in problem.message


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
