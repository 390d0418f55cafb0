"""Tasks (vggt_fsdp/tasks, issue 22 items 1-4): any model through the toolkit's trainer.

- a task recipe: loaded, checked and written out without the VGGT task's sections; a plain task refuses
  them; a task that breaks the protocol, a missing batch size and layout patterns that match nothing
  are refused before launch, each one line naming the key (with the model's classes, "did you mean");
- the data order of a task's dataset: disjoint per rank, a function of (seed, epoch), resumable;
- a third-party model built on the meta device is initialised by its own init (transformers'
  Dinov2Model), and a model nothing initialises is refused naming both routes;
- VGGT extended by a head: the shared part loaded strictly from VGGT weights, the new head initialised;
- experiment trackers: TensorBoard events read back, unknown or missing trackers refused;
- two trainings side by side, one process each: transformers' Dinov2Model (no patch to its classes)
  through examples/hf_dinov2.py, and VGGT-tiny + an RGB head (examples/vggt_rgb_head.py) fine-tuned
  from VGGT weights. The 2-process starter task (copy, train, kill, resume) is in test_own_model.py.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from processes import finish, start
from torch import nn

from vggt_fsdp.cli import main as cli
from vggt_fsdp.recipe import RecipeError, dump_recipe, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
STARTER = REPO / "vggt_fsdp" / "tasks" / "own_model.yaml"
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))


# ---------------------------------------------------------------------------------------- recipes
def test_a_task_recipe_has_no_vggt_sections_and_round_trips():
    recipe = load_recipe(STARTER)
    assert not recipe.vggt_task and not recipe.vggt_sections
    assert recipe.task == f"{STARTER.parent / 'own_model.py'}:build_task"  # beside the recipe file
    dumped = yaml.safe_load(dump_recipe(recipe))
    assert {"model", "data", "loss"}.isdisjoint(dumped) and dumped["task_config"]["items"] == 4096
    assert recipe_from_dict(dumped) == recipe


def test_the_vggt_recipes_keep_their_sections():
    recipe = load_recipe("cpu_tiny")
    assert recipe.vggt_task and recipe.task is None
    assert {"model", "data", "loss"} <= set(yaml.safe_load(dump_recipe(recipe)))


def test_a_task_that_is_not_module_callable_is_refused_at_load():
    with pytest.raises(RecipeError, match="task: 'own_model' is not MODULE:CALLABLE"):
        load_recipe(STARTER, ["task=own_model"])


BAD_TASKS = {  # task module source -> (the key, a phrase of the one-line error)
    "no loss": ("class T:\n    model = nn.Linear(2, 2)\n    dataset = [0]\ndef build(recipe):\n    return T()",
                "task", "without ['loss']"),
    "a model that is no module": ("class T:\n    model = 3\n    dataset = [0]\n    loss = print\n"
                                  "def build(recipe):\n    return T()", "task", "its model is a int"),
    "an iterable dataset": ("class T:\n    model = nn.Linear(2, 2)\n    dataset = iter([])\n    loss = print\n"
                            "def build(recipe):\n    return T()", "task", "is not map-style"),
    "a builder that raises": ("def build(recipe):\n    raise KeyError('vocab')", "task",
                              "calling it raised KeyError: 'vocab'"),
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_a_task_that_breaks_the_protocol_is_one_line(case, tmp_path):
    from vggt_fsdp.tasks import preflight

    source, key, phrase = BAD_TASKS[case]
    (tmp_path / "bad.py").write_text("from torch import nn\n" + source + "\n")
    recipe = load_recipe(STARTER, [f"task={tmp_path / 'bad.py'}:build", f"train.output_dir={tmp_path / 'out'}"])
    problems = preflight(recipe, cuda=False)
    assert [p.key for p in problems] == [key] and phrase in problems[0].message, problems


@pytest.mark.parametrize("overrides, expected", [
    (["parallel.layout.units=[heads]"],
     "error: parallel.layout.units[0]: 'heads' matches no module (did you mean 'head'?); top-level modules: "),
    (["parallel.layout.block_types=[vggt_fsdp.model.layers.Block]"],
     "error: parallel.layout.block_types[0]: 'vggt_fsdp.model.layers.Block' matches no module class of the model; "
     "the model's repeated classes: TransformerLayer (x4), SelfAttention (x4)"),
    (["parallel.precision.fp32_modules=[camera_head]"], "error: parallel.precision.fp32_modules[0]: 'camera_head' "
                                                        "matches no module"),
    (["train.batch_size=null"], "error: train.batch_size: task "),
    (["task_config.val_items=10", "train.val_every=5"], "error: train.val_every: the task's val_dataset has 10 items, "
                                                        "fewer than one batch of 8 per process x 2"),
    (["model.preset=vggt-tiny"], "which does not read the recipe's model, data, loss sections"),
])
def test_train_refuses_before_launch(overrides, expected, tmp_path, capsys):
    """`vggt-fsdp train` of the starter with a VGGT pattern (as a copied VGGT recipe brings) or a typo:
    the problem named, exit 2, nothing started (no output directory)."""
    out = tmp_path / "out"
    assert cli(["train", str(STARTER), *overrides, f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "launching" not in err and not out.exists()


def test_recipe_show_warns_that_a_vggt_layout_does_not_fit_another_model(capsys):
    """A copied VGGT recipe shown with your model: the table is still printed, but each VGGT pattern
    that matches nothing is a warning, not a silent claim that heads compute in fp32."""
    model = f"{STARTER.parent / 'own_model.py'}:build"
    assert cli(["recipe", "show", "cpu_tiny", "parallel.layout.block_types=[TransformerLayer]",
                "parallel.layout.attention_types=[SelfAttention]", "--model", model, "--plan-only"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "warning: parallel.precision.fp32_modules[0]: 'camera_head' matches no module; top-level modules: " \
           "['embed', 'positions', 'layers', 'head'] (`vggt-fsdp train` refuses this)" in err
    assert len(err) == 11  # units: the 4 VGGT heads; groups: 4 of VGGT blocks; fp32_modules: 3 heads


# ---------------------------------------------------------------------------------------- data order
def test_each_rank_gets_its_own_batches_in_an_order_the_seed_and_epoch_fix():
    from vggt_fsdp.tasks.base import ShardedSampler

    ranks = [ShardedSampler(length=50, batch_size=4, rank=r, world=3, seed=7) for r in range(3)]
    epoch0 = [s.epoch_batches(0) for s in ranks]
    assert all(len(b) == 4 and all(len(x) == 4 for x in b) for b in epoch0)  # 50 // 3 // 4 whole batches
    items = [i for batches in epoch0 for batch in batches for i in batch]
    assert len(items) == len(set(items)) == 48
    assert ranks[0].epoch_batches(1) != epoch0[0]  # a new order each epoch
    assert ShardedSampler(50, 4, 0, 3, seed=7).epoch_batches(0) == epoch0[0]  # and the same again
    again = ShardedSampler(50, 4, 0, 3, seed=7)
    ranks[0].epoch, ranks[0].position = 2, 3
    again.load_state_dict(ranks[0].state_dict())
    assert (again.epoch, again.position) == (2, 3)


def test_a_map_task_resumes_with_the_next_batch():
    from vggt_fsdp.tasks.base import MapTask, ShardedSampler

    class Task:
        dataset = list(range(40))

    first = MapTask(Task(), ShardedSampler(40, 4, 0, 1, seed=1))
    stream = first.batches()
    straight = [next(stream).tolist() for _ in range(14)]  # past one epoch of 10 batches
    assert sorted(i for b in straight[:10] for i in b) == list(range(40))
    assert first.sampler.state_dict() == {"epoch": 1, "position": 4}  # what a checkpoint saves
    resumed = MapTask(Task(), ShardedSampler(40, 4, 0, 1, seed=1))
    resumed.sampler.load_state_dict({"epoch": 0, "position": 6})
    again = resumed.batches()
    assert [next(again).tolist() for _ in range(8)] == straight[6:14]


# ---------------------------------------------------------------------------------------- initialisation
def test_a_library_model_on_meta_is_initialised_by_its_own_init():
    pytest.importorskip("transformers")
    from hf_dinov2 import Dinov2Regressor
    from transformers import Dinov2Config

    from vggt_fsdp.parallel.materialize import MaterializeError, materialize_module
    from vggt_fsdp.tasks.base import model_init

    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    with torch.device("meta"):
        model = Dinov2Regressor(config)
    with pytest.raises(MaterializeError) as refused:  # the modules' own methods alone leave tokens and lambdas
        materialize_module(model, "cpu")
    text = str(refused.value)
    assert "cls_token: parameter of transformers.models.dinov2" in text and "lambda1" in text
    assert "init_weights() or _init_weights(module)" in text and "build the model on the CPU" in text
    with torch.device("meta"):
        model = Dinov2Regressor(config)
    materialize_module(model, "cpu", model_init=model_init(object(), model))  # finds backbone.init_weights
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    scale = model.backbone.encoder.layer[0].layer_scale1.lambda1
    assert torch.equal(scale, torch.full_like(scale, config.layerscale_value))
    assert 0.01 < model.backbone.embeddings.cls_token.std() < 0.03  # trunc_normal(std=initializer_range 0.02)


def test_a_task_hook_initialises_what_nothing_else_does():
    from vggt_fsdp.parallel.materialize import materialize_module
    from vggt_fsdp.tasks.base import model_init

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.empty(3, 4))

    class Task:
        def init_weights(self, model):
            model.table.fill_(0.5)

    with torch.device("meta"):
        model = Bare()
    materialize_module(model, "cpu", model_init=model_init(Task(), model))
    assert torch.equal(model.table, torch.full((3, 4), 0.5))


def test_an_extended_vggt_loads_the_shared_part_strictly_and_keeps_the_new_head(tmp_path):
    from vggt_rgb_head import VGGTWithRGB

    from vggt_fsdp.model import build_model, save_weights
    from vggt_fsdp.recipe import model_config
    from vggt_fsdp.tasks.vggt import InitWeightsError, load_initial_weights

    cfg = model_config(load_recipe(EXAMPLES / "vggt_rgb_head.yaml").model)
    torch.manual_seed(1)
    vggt = build_model(cfg)
    save_weights(vggt, tmp_path / "vggt.safetensors")
    torch.manual_seed(2)
    model = VGGTWithRGB(cfg)
    head = {k: v.clone() for k, v in model.rgb_head.state_dict().items()}
    load_initial_weights(model, str(tmp_path / "vggt.safetensors"), new_modules=("rgb_head",))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in vggt.state_dict().items())
    assert all(torch.equal(model.rgb_head.state_dict()[k], v) for k, v in head.items())
    partial = {k: v for k, v in vggt.state_dict().items() if not k.startswith("aggregator.camera_token")}
    save_weights(partial, tmp_path / "partial.safetensors")
    with pytest.raises(InitWeightsError, match="1 missing: aggregator.camera_token"):
        load_initial_weights(model, str(tmp_path / "partial.safetensors"), new_modules=("rgb_head",))


# ---------------------------------------------------------------------------------------- trackers
def tensorboard_scalars(folder: Path, tag: str) -> dict[int, float]:
    """The scalar `tag` of every TensorBoard event file under `folder`, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            found.update({e.step: e.value for e in acc.Scalars(tag)})
    return found


def test_tensorboard_gets_each_logged_steps_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from vggt_fsdp.train.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, tensorboard=False, static={"world_size": 2}, log_with=["tensorboard"])
    for step, loss in ((10, 0.5), (20, 0.25)):
        writer.write({"step": step, "loss": loss, "loss_terms": {"camera": loss / 2}, "mfu": None,
                      "val": {"auc": 0.7}, "device": "cpu"})
    writer.close()
    assert tensorboard_scalars(tmp_path / "tensorboard", "loss") == {10: 0.5, 20: 0.25}
    assert tensorboard_scalars(tmp_path / "tensorboard", "loss_terms/camera") == {10: 0.25, 20: 0.125}
    assert tensorboard_scalars(tmp_path / "tensorboard", "val/auc") == pytest.approx({10: 0.7, 20: 0.7})


def test_wandb_runs_offline_under_the_output_dir(tmp_path, monkeypatch):
    """W&B with WANDB_MODE=offline: no account, no network; the run is kept under output_dir/wandb (wandb
    is in the `tracking` extra, not in `dev`: CI skips this)."""
    pytest.importorskip("wandb")
    from vggt_fsdp.train.metrics import MetricsWriter

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = MetricsWriter(tmp_path, tensorboard=False, static={"world_size": 1}, log_with=["wandb"])
    writer.write({"step": 1, "loss": 0.5})
    writer.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb"))


@pytest.mark.parametrize("name, phrase", [
    ("tensorbord", "'tensorbord' is not a tracker Accelerate knows (did you mean 'tensorboard'?)"),
    ("clearml", "clearml needs the `clearml` package, which is not installed: pip install clearml --constraint"),
])
def test_trackers_that_cannot_run_are_refused_before_launch(name, phrase):
    from vggt_fsdp.train.preflight import tracker_problems

    if name == "clearml" and __import__("importlib").util.find_spec("clearml") is not None:
        pytest.skip("clearml is installed here")
    problems = tracker_problems([name])
    assert [p.key for p in problems] == ["train.log_with"] and phrase in problems[0].message


# ---------------------------------------------------------------------------------------- trainings
def _train(recipe: Path, out: Path, *overrides: str):
    command = [sys.executable, "-m", "vggt_fsdp.train", str(recipe), f"train.output_dir={out}", "train.log_every=1",
               "train.progress_bar=false", *overrides]
    return start(command, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trainings(tmp_path_factory):
    """One process each, side by side: Dinov2 (12 steps) and VGGT-tiny + RGB head (3 steps, 56 px)."""
    pytest.importorskip("transformers")
    from vggt_fsdp.model import build_model, save_weights
    from vggt_fsdp.recipe import model_config

    root = tmp_path_factory.mktemp("tasks")
    rgb_recipe = EXAMPLES / "vggt_rgb_head.yaml"
    save_weights(build_model(model_config(load_recipe(rgb_recipe).model)), root / "vggt.safetensors")
    dino = _train(EXAMPLES / "hf_dinov2.yaml", root / "dino", "train.max_steps=12", "train.checkpoint_every=0")
    rgb = _train(rgb_recipe, root / "rgb", "train.max_steps=3", f"model.init_weights={root / 'vggt.safetensors'}",
                 "data.image_width=56", "data.frames_range=[2,3]", "data.frames_per_gpu=3")
    return {"root": root, "dino": finish(dino, 400), "rgb": finish(rgb, 400)}


def test_transformers_dinov2_trains_through_a_task(trainings):
    from safetensors.torch import load_file

    run = trainings["dino"]
    assert run.returncode == 0, run.stderr[-4000:]
    assert "(hf_dinov2.Dinov2Regressor): 114,115 trainable parameters" in run.stderr
    losses = [r["loss"] for r in _metrics(trainings["root"] / "dino")]
    assert len(losses) == 12 and sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses
    exported = load_file(str(trainings["root"] / "dino" / "model.safetensors"))
    assert "backbone.embeddings.cls_token" in exported and "head.weight" in exported


def test_vggt_with_an_rgb_head_fine_tunes_from_vggt_weights(trainings):
    from safetensors.torch import load_file

    run = trainings["rgb"]
    assert run.returncode == 0, run.stderr[-4000:]
    assert "['rgb_head']: 62 tensors (372,004 parameters) are not in" in run.stderr
    assert "vggt-tiny + rgb_head: " in run.stderr
    records = _metrics(trainings["root"] / "rgb")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss_terms"]["loss_rgb"] > 0 for r in records) and "loss_camera" in records[0]["loss_terms"]
    exported = load_file(str(trainings["root"] / "rgb" / "model.safetensors"))
    assert "rgb_head.scratch.output_conv2.2.weight" in exported and "aggregator.camera_token" in exported
