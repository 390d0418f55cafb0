"""A user's own model through the toolkit (issue 11 items 3 and 4, issue 22 item 1), with the starter task
(vggt_fsdp/tasks/own_model.py: own attention, block and head classes) and, where said, torch's own
TransformerEncoderLayer:

- `vggt-fsdp recipe show --model`: its units, dtypes and checkpointing; clear errors, no traceback;
- `vggt-fsdp plan --model` (memory/generic.py): model states exact and activations scaled from CPU
  measurements, checked against FSDPMemTracker and saved-tensor bytes over a fake process group of 8;
- `vggt-fsdp recipe copy own_model DIR`, then `vggt-fsdp train DIR/own_model.yaml task=DIR/own_model.py:...`
  on 2 CPU processes, no edits: killed while writing a checkpoint, resumed, the same losses as the run
  before the kill, the previous checkpoint intact, the loss falling, an export that loads strictly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from processes import finish, start

from vggt_fsdp.cli import main as cli
from vggt_fsdp.recipe import load_recipe
from vggt_fsdp.tasks import own_model

REPO = Path(__file__).resolve().parents[1]
STARTER = REPO / "vggt_fsdp" / "tasks"
RECIPE = str(STARTER / "own_model.yaml")
MODEL = f"{STARTER / 'own_model.py'}:build"

TORCH_LAYERS = '''
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(8, 32), *(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
                                             for _ in range(3)), nn.Linear(32, 1))

def example_inputs(size):
    return (torch.randn(size, 16, 8),)
'''
TORCH_RECIPE = """
accelerate: {distributed_type: FSDP, num_machines: 1, num_processes: 8, mixed_precision: bf16,
             use_cpu: false, fsdp_config: {fsdp_version: 2}}
parallel:
  layout: {block_types: [TransformerEncoderLayer], attention_types: [MultiheadAttention], units: ["4"],
           groups: {}}
  precision: {param_dtype: bf16, reduce_dtype: fp32, fp32_modules: ["4"]}
  checkpoint: {policy: attention}
"""


def plan_rows(text: str) -> dict[str, list[str]]:
    """The plan table's rows by unit path."""
    rows = {}
    for line in text.splitlines():
        cells = line.split()
        if len(cells) == 8 and cells[1] in ("block", "module", "root"):
            rows[cells[0]] = cells[1:]
    return rows


# ---------------------------------------------------------------------------------------- recipe show
def test_recipe_show_plans_the_users_model(capsys):
    assert cli(["recipe", "show", RECIPE, "--model", MODEL, "--plan-only"]) == 0
    out = capsys.readouterr().out
    assert "# model: own_model.OwnModel (203,139 parameters)" in out
    rows = plan_rows(out)
    # kind, group, params, param dtype, reduce dtype, reshard, checkpoint
    assert rows["layers.0"] == ["block", "first", "49,984", "fp32", "fp32", "yes", "block"]
    assert rows["layers.3"] == ["block", "-", "49,984", "fp32", "fp32", "yes", "attention"]
    assert rows["head"] == ["module", "-", "323", "fp32", "fp32", "yes", "none"]
    assert rows["<root>"][0] == "root" and list(rows) == ["layers.0", "layers.1", "layers.2", "layers.3",
                                                          "head", "<root>"]


def test_recipe_show_plans_torch_layers_in_bf16_with_an_fp32_head(tmp_path, capsys, monkeypatch):
    (tmp_path / "torch_layers.py").write_text(TORCH_LAYERS)
    (tmp_path / "torch.yaml").write_text(TORCH_RECIPE)
    monkeypatch.chdir(tmp_path)  # a dotted module name is imported from the current directory
    assert cli(["recipe", "show", "torch.yaml", "--model", "torch_layers:build", "--plan-only"]) == 0
    rows = plan_rows(capsys.readouterr().out)
    for block in ("1", "2", "3"):  # param dtype, reduce dtype, reshard, checkpoint
        assert rows[block][3:] == ["bf16", "fp32", "yes", "attention"]
    assert rows["4"][:1] + rows["4"][3:5] == ["module", "fp32", "fp32"]
    sys.modules.pop("torch_layers", None)


@pytest.mark.parametrize("args, message", [
    (["--model", "own_model"], "--model 'own_model': expected MODULE:CALLABLE"),
    (["--model", "no_such_module:build"], "cannot import no_such_module"),
    (["--model", f"{STARTER / 'own_model.py'}:nope"], "has no callable 'nope'"),
    (["--model", f"{STARTER / 'own_model.py'}:example_inputs"],  # a callable that raises
     "calling it on the meta device raised TypeError: example_inputs() missing 1 required positional"),
    (["--model", f"{STARTER / 'own_model.py'}:OwnConfig"], "the callable returned OwnConfig, not a torch.nn.Module"),
])
def test_recipe_show_says_what_is_wrong_in_one_line(args, message, capsys):
    try:
        code = cli(["recipe", "show", RECIPE, "--plan-only", *args])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------- plan --model
def _fsdp_step_on_fake_8(parallel, size: int):
    """Rank 0 of a fake 8-process FSDP2 job, one training step at `size`: FSDPMemTracker's model states
    and peak, and the forward's saved-tensor bytes."""
    from vggt_fsdp.memory.accounting import count_saved_bytes, measure_model_state
    from vggt_fsdp.memory.fake_pg import fake_process_group
    from vggt_fsdp.parallel import apply_parallelism, build_mesh

    with fake_process_group(8, "cpu"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        with torch.device("meta"):
            model = own_model.build()
        apply_parallelism(model, parallel, build_mesh(parallel.sharding, "cpu"))
        model.to_empty(device="cpu")
        with torch.no_grad():
            for param in model.parameters():
                param.to_local().uniform_(-0.02, 0.02)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
        for param in model.parameters():  # the optimizer state a later step has
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        (x,) = own_model.example_inputs(size)
        saved = {}

        def step():
            report, out = count_saved_bytes(lambda: model(x))
            saved["bytes"] = report.total_bytes
            out.float().square().mean().backward()
            optimizer.step()

        state = measure_model_state(model, optimizer, step, "cpu")
    return state, saved["bytes"]


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def planned_and_measured(request):
    from vggt_fsdp.memory.generic import plan_model

    mixed = {"fp32": "no", "bf16": "bf16"}[request.param]
    parallel = load_recipe(RECIPE, [f"parallel.precision.param_dtype={request.param}",
                                    f"accelerate.mixed_precision={mixed}"]).parallel
    size = 16
    planned = plan_model(own_model.build, own_model.example_inputs, parallel, 8, size, "cpu")
    return parallel, planned, *_fsdp_step_on_fake_8(parallel, size)


def test_model_states_and_units_in_flight_are_exact(planned_and_measured):
    from vggt_fsdp.memory.generic import unit_layout_of

    parallel, plan, state, _ = planned_and_measured
    terms = {t.name: t.bytes for t in plan.terms}
    assert terms["sharded parameters (fp32)"] == state.sharded_params
    assert terms["sharded gradients (fp32)"] == state.sharded_grads
    assert terms["AdamW state (fp32 exp_avg, exp_avg_sq, step)"] == state.optimizer_state
    # In flight: the root (kept from forward to backward) and the largest unit unsharded, and the
    # all-gather buffers of the running unit and the prefetched next one.
    with torch.device("meta"):
        units = unit_layout_of(own_model.build(), parallel)
    dtype_bytes = {"fp32": 4, "bf16": 2}[parallel.precision.param_dtype]
    root = next(u for u in units if u.kind == "root")
    largest = max((u for u in units if u.kind != "root"), key=lambda u: sum(p.numel for p in u.params))
    root_bytes, unit_bytes = (sum(p.numel for p in u.params) * dtype_bytes for u in (root, largest))
    assert terms["unsharded root parameters"] == root_bytes
    assert state.peak_unsharded_params == root_bytes + unit_bytes
    assert terms["running unit + prefetch all-gather"] == 2 * unit_bytes == state.peak_all_gather


def test_activations_scaled_from_small_sizes_match_a_measurement_at_the_target(planned_and_measured):
    _, plan, _, saved = planned_and_measured
    assert saved > 0
    assert next(t.bytes for t in plan.terms if t.name == "activations saved for backward") == saved
    assert [s.size for s in plan.samples] == [1, 2, 4]
    assert not any(note.startswith("warning") for note in plan.notes)  # linear: the check at 4 agreed


def test_the_peak_is_conservative_by_at_most_a_fifth(planned_and_measured):
    _, plan, state, _ = planned_and_measured
    assert state.peak_total <= plan.peak_bytes <= 1.2 * state.peak_total, (plan.peak_bytes, state.peak_total)


def test_plan_command_with_a_users_model(capsys):
    code = cli(["plan", RECIPE, "--model", MODEL, "--size", "64", "--gpus", "8", "--gpu-memory", "40",
                "--device-kind", "cpu", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert data["fits"] is True and data["gpu_memory_GiB"] == 40
    plan = data["plan"]
    assert (plan["world_size"], plan["shard_size"], plan["size"]) == (8, 8, 64)
    sources = {t["name"]: t["formula"] for t in plan["terms"]}
    assert sources["activations saved for backward"].startswith("measured:")
    assert "scaled to 64" in sources["activations saved for backward"]
    assert plan["notes"][0].startswith("exact: model states and units in flight")
    assert "measuring OwnModel's activations on the CPU at sizes 1, 2, 4" in captured.err


@pytest.mark.parametrize("args, message", [
    ([], "--size N (>= 1) is required with --model"),
    (["--size", "4", "--frames", "8"], "--frames and --image describe VGGT batches"),
    (["--size", "4", "--optimize"], "--optimize ranks VGGT checkpoint layouts by the step-time model"),
])
def test_plan_command_says_what_a_users_model_needs(args, message, capsys):
    assert cli(["plan", RECIPE, "--model", MODEL, "--gpu-memory", "40", *args]) == 2
    assert message in capsys.readouterr().err


def test_plan_header_names_the_recipes_kernels_and_the_missing_step_time(capsys):
    assert cli(["plan", RECIPE, "--model", MODEL, "--size", "8"]) == 0  # the starter is a CPU recipe
    header = capsys.readouterr().out.splitlines()[1]
    assert header.startswith("2 CPU processes (parameters sharded over 2), size 8 per process, cpu kernels; "
                             "no step time"), header


def test_plan_of_a_task_recipe_asks_for_its_model(capsys):
    assert cli(["plan", RECIPE]) == 2
    assert "plan its model with --model MODULE:CALLABLE --size N" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the trainer
def _train(dest: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    """The copied starter through `vggt-fsdp train` on 2 CPU processes: 6 steps, a checkpoint every 3,
    the task named on the command line (as a user points a recipe at their own file)."""
    command = [sys.executable, "-m", "vggt_fsdp.cli", "train", str(dest / "own_model.yaml"),
               f"task={dest / 'own_model.py'}:build_task", "train.max_steps=6", "train.checkpoint_every=3",
               "train.log_every=1", "train.val_every=0", "train.progress_bar=false", f"train.output_dir={out}"]
    return finish(start(command, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}), 300)


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """`recipe copy own_model DIR` (a directory outside the package), then run 1, killed (SIGKILL) while
    writing its step-6 checkpoint after logging step 6, and run 2, the same command, which resumes from
    step 3. Run 1's log up to the kill is the straight run."""
    from vggt_fsdp.train import checkpoint as ckpt

    root = tmp_path_factory.mktemp("own")
    dest, out = root / "my_project", root / "run"
    assert cli(["recipe", "copy", "own_model", str(dest)]) == 0
    killed = _train(dest, out, VGGT_FSDP_CRASH_IN_SAVE="6")
    after_kill = {"complete": [s for s, _ in ckpt.complete_checkpoints(out / "checkpoints")],
                  "entries": sorted(p.name for p in (out / "checkpoints").iterdir()),
                  "losses": _losses(out / "metrics.jsonl")}
    resumed = _train(dest, out)
    return {"dest": dest, "out": out, "killed": killed, "after_kill": after_kill, "resumed": resumed}


def test_the_starter_copy_is_a_recipe_and_its_task_module(trainer_runs):
    dest = trainer_runs["dest"]
    assert sorted(p.name for p in dest.iterdir()) == ["own_model.py", "own_model.yaml"]
    text = (dest / "own_model.yaml").read_text()
    assert "__script__" not in text  # `accelerate launch` of the copy must not train something else
    assert load_recipe(dest / "own_model.yaml").task == f"{dest / 'own_model.py'}:build_task"
    assert {"model", "data", "loss"}.isdisjoint(key.split(":")[0] for key in text.splitlines() if key[:1].isalpha())


def test_a_kill_while_saving_leaves_the_previous_checkpoint(trainer_runs):
    assert trainer_runs["killed"].returncode != 0
    after = trainer_runs["after_kill"]
    assert after["complete"] == [3]
    assert after["entries"] == [".tmp-step-0000006", "step-0000003"]  # the half-written one, never read
    assert sorted(after["losses"]) == [1, 2, 3, 4, 5, 6]


def test_the_resumed_run_repeats_the_straight_runs_losses_exactly(trainer_runs):
    resumed = trainer_runs["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "step-0000003 at step 3" in resumed.stderr
    assert "task " in resumed.stderr and "(own_model.OwnModel): 203,139 trainable parameters" in resumed.stderr
    straight = trainer_runs["after_kill"]["losses"]
    again = _losses(trainer_runs["out"] / "metrics.jsonl")
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    assert [again[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]  # bit for bit
    assert straight[6] < 0.8 * straight[1]  # it learns


def test_the_export_is_the_last_checkpoint_and_loads_strictly(trainer_runs):
    from safetensors.torch import load_file

    from vggt_fsdp.train import checkpoint as ckpt

    out = trainer_runs["out"]
    assert [s for s, _ in ckpt.complete_checkpoints(out / "checkpoints")] == [3, 6]
    exported = load_file(str(out / "model.safetensors"))
    last = ckpt.consolidated_model_state(out / "checkpoints" / "step-0000006")
    assert exported.keys() == last.keys()
    assert all(torch.equal(exported[name], last[name]) for name in last)
    model = own_model.build()
    model.load_state_dict(exported, strict=True)  # the model's own names: no FSDP or wrapper prefixes
    assert not torch.equal(model.pos, own_model.build().pos)  # trained, not the initialisation


@pytest.mark.parametrize("section, world, expected", [
    ({"num_processes": 8}, 8, None),
    ({"num_processes": 8}, 2, "launched with 2 process(es) but the recipe's accelerate.num_processes is 8"),
    ({}, 4, None),  # no process count in the recipe: nothing to compare
])
def test_topology_notice(section, world, expected):
    from vggt_fsdp.parallel.accelerate import topology_notice

    notice = topology_notice(section, world)
    if expected is None:
        assert notice is None
    else:
        assert notice.startswith(expected) and "accelerate-config RECIPE" in notice  # how to start the recipe's
