"""`vggt-fsdp plan`: the card a recipe states, overrides, world sizes, predicted step time and --optimize.

The command is run in-process (`cli.main`) on the tiny recipe, planned for a GPU card where a test
needs step times; the VGGT-1B recipes only where the acceptance names them (memory figures, no search).
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from vggt_fsdp import hardware
from vggt_fsdp.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = str(RECIPES / "cpu_tiny.yaml")
# The tiny recipe planned for an A100 40GB instead of its CPU processes.
ON_A100 = ["hardware.device=a100_40g", "hardware.memory_gib=null", "accelerate.use_cpu=false"]


def plan_json(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def plan_error(capsys, *argv: str) -> str:
    assert main(["plan", *argv]) == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------ the recipe's card
def test_the_80g_recipe_is_checked_against_its_card_without_flags(capsys):
    data = plan_json(capsys, str(RECIPES / "a100_80g.yaml"))
    card = hardware.card("a100_80g")
    assert data["gpu_memory_bytes"] == card.memory_bytes and data["gpu_memory_source"].startswith("a100_80g")
    assert data["card"]["name"] == "a100_80g" and "estimate" in data["card"]["rates"]
    assert data["fits"] and data["predicted_step_s"] > 0 and 0 < data["recompute_fraction"] < 1
    assert data["step_time"]["predicted_step_s"] == data["predicted_step_s"]


def test_gpu_memory_overrides_the_cards_memory_not_its_rates(capsys):
    data = plan_json(capsys, TINY, *ON_A100, "--gpu-memory", "12.5")
    assert data["gpu_memory_GiB"] == 12.5 and data["gpu_memory_source"] == "--gpu-memory"
    assert data["card"]["name"] == "a100_40g"


def test_a_cpu_recipe_plans_cpu_kernels_against_its_stated_memory_and_has_no_step_time(capsys):
    data = plan_json(capsys, TINY)
    assert data["plan"]["device_kind"] == "cpu" and data["gpu_memory_GiB"] == 4.0
    assert data["predicted_step_s"] is None and "hardware.device" in data["step_time_unavailable"]
    assert data["recompute_fraction"] > 0  # counted all the same (cpu_tiny checkpoints attention)


def test_a_recipe_without_a_card_asks_for_one(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = plan_error(capsys, TINY, "hardware.device=null", "hardware.memory_gib=null")
    assert "hardware.device" in err and "--gpu-memory" in err


# ------------------------------------------------------------------------------ command line
def test_positional_overrides_and_set_are_the_same(capsys):
    positional = plan_json(capsys, TINY, "parallel.checkpoint.policy=block", "data.frames_per_gpu=6")
    legacy = plan_json(capsys, TINY, "--set", "parallel.checkpoint.policy=block", "--set", "data.frames_per_gpu=6")
    assert positional == legacy
    assert positional["plan"]["frames_per_gpu"] == 6
    assert set(positional["plan"]["policy"]["blocks"].values()) == {"block"}


@pytest.mark.parametrize("gpus,message", [
    ("0", "at least 1 GPU"),
    ("-8", "at least 1 GPU"),
    ("12", "not whole nodes of 8 GPUs"),
    ("3", "not whole nodes of 2 GPUs"),  # cpu_tiny: 2 processes a node
])
def test_invalid_gpus_are_refused_with_the_reason(capsys, gpus, message):
    recipe = str(RECIPES / "a100_40g.yaml") if gpus in ("0", "-8", "12") else TINY
    assert message in plan_error(capsys, recipe, "--gpus", gpus)


@pytest.mark.parametrize("gpus,shard", [("1", 1), ("2", 2), ("4", 4)])  # cpu_tiny shards fully
def test_valid_gpus_set_the_world(capsys, gpus, shard):
    data = plan_json(capsys, TINY, "--gpus", gpus)
    assert data["plan"]["world_size"] == int(gpus) and data["plan"]["shard_size"] == shard


def test_the_table_shows_the_step_time_by_kind(capsys):
    assert main(["plan", TINY, *ON_A100]) == 0
    out = capsys.readouterr().out
    assert "on NVIDIA A100 40GB" in out and "an estimate" in out
    for kind in ("attention", "matmul", "convolution", "memory"):
        assert f"  {kind}" in out
    assert "predicted step" in out and "MFU" in out


# ------------------------------------------------------------------------------ --optimize
@pytest.fixture(scope="module")
def unconstrained():
    """The tiny recipe's search on an A100 40GB, where every configuration fits."""
    return _optimize(ON_A100)


def _optimize(argv: list[str]) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", TINY, *argv, "--optimize", "--json"]) == 0
    return json.loads(out.getvalue())


def test_the_frontier_trades_memory_for_time(unconstrained):
    found = unconstrained["optimize"]
    frontier = found["frontier"]
    assert found["candidates"] > len(frontier)
    times = [p["predicted_step_s"] for p in frontier]
    memory = [p["device_GiB"] for p in frontier]
    assert times == sorted(times) and memory == sorted(memory, reverse=True) and len(frontier) >= 2
    # Everything fits a 40 GB card: the fastest is no block or head recompute at all (the camera trunk
    # keeps the recipe's own setting).
    best = found["best"]
    assert best == frontier[0] and best["recompute_fraction"] == min(p["recompute_fraction"] for p in frontier)
    assert set(best["blocks"].values()) == {"none"} and best["heads"] == "none"


def test_a_tighter_card_gets_the_fastest_configuration_that_fits_it(unconstrained):
    frontier = unconstrained["optimize"]["frontier"]
    # Memory for the middle of the frontier, margin included: the fastest points no longer fit.
    gib = (frontier[0]["device_GiB"] + frontier[-1]["device_GiB"]) / 2 / (1 - 0.05)
    found = _optimize([*ON_A100, "--gpu-memory", f"{gib:.4f}"])["optimize"]
    best = found["best"]
    assert best["fits_with_margin"] and best["device_GiB"] <= gib * 0.95
    assert best["predicted_step_s"] > frontier[0]["predicted_step_s"]
    faster = [p for p in found["frontier"] if p["predicted_step_s"] < best["predicted_step_s"]]
    assert faster and not any(p["fits_with_margin"] for p in faster)


def test_the_best_configuration_as_overrides_plans_as_it_was_reported(capsys, unconstrained):
    """The printed overrides, pasted after the recipe, give the plan and step time the search reported."""
    frontier = unconstrained["optimize"]["frontier"]
    point = frontier[len(frontier) // 2]
    overrides = [shlex.split(o)[0] for o in point["overrides"]]
    data = plan_json(capsys, TINY, *ON_A100, *overrides)
    assert data["plan"]["device_GiB"] == point["device_GiB"]
    assert data["predicted_step_s"] == point["predicted_step_s"]
    assert data["recompute_fraction"] == point["recompute_fraction"]


def test_optimize_needs_a_card_with_rates(capsys):
    assert "--optimize" in plan_error(capsys, TINY, "--optimize")


@pytest.mark.parametrize("heads", ["none", "chunks"])
def test_searched_layouts_are_labelled_as_the_sharding_plan_labels_them(heads):
    """The search plans each candidate on the layout of the first one, relabelled (planner.unit_layout);
    the labels must be those plan_parallelism gives the candidate itself."""
    from vggt_fsdp.memory import optimize, planner
    from vggt_fsdp.recipe import load_recipe, model_config

    recipe = load_recipe(TINY)
    cfg = model_config(recipe.model)
    choices = [dict.fromkeys(optimize.GROUPS, label) for label in planner.BLOCK_POLICIES]
    choices.append(dict(zip(optimize.GROUPS, planner.BLOCK_POLICIES[-3:])))
    for blocks in choices:
        candidate = optimize.candidate_config(recipe.parallel, blocks, heads)
        relabelled = planner.unit_layout(cfg, candidate)
        fresh = planner._unit_layout(cfg, candidate, ())
        assert [(u.path, u.checkpoint) for u in relabelled] == [(u.path, u.checkpoint) for u in fresh], blocks


# ------------------------------------------------------------------------------ --optimize over N
@pytest.mark.parametrize("heads, world, per_node, frames_range, track, sizes", [
    (16, 8, 8, (48, 96), False, [1, 2, 4, 8]),  # a100_40g_long: 16 would leave the node
    (16, 12, 4, (48, 96), False, [1, 2, 4]),  # 3 divides neither the heads nor the node's 4
    (16, 8, 8, (5, 5), False, [1]),  # a 5-frame scene splits over no group
    (16, 8, 8, (48, 96), True, [1]),  # the track head refuses context parallelism
    (4, 1, 8, (2, 24), False, [1]),  # one process
])
def test_optimize_tries_every_group_size_the_heads_processes_node_and_scenes_allow(
        heads, world, per_node, frames_range, track, sizes):
    from vggt_fsdp.memory.optimize import context_sizes

    assert context_sizes(heads, world, per_node, frames_range, track) == sizes


def test_optimize_ranks_group_sizes_by_frames_per_second_per_gpu_at_the_recipes_scene_length(capsys):
    """a100_40g_long holds 96 frames a group (4 GPUs x 24): each size N plans 96 / N frames a GPU; the
    recipe's own N is the main search; the rate counts the exchange; the advice pastes back as planned."""
    long_recipe = str(RECIPES / "a100_40g_long.yaml")
    assert main(["plan", long_recipe, "--optimize", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["optimize"]
    sizes = {g["context_parallel"]: g for g in found["context_sizes"]}
    assert sorted(sizes) == [1, 2, 4, 8]
    assert all(g["frames_per_gpu"] * n == 96 for n, g in sizes.items())
    assert sizes[4]["best"] == found["best"] and sizes[1]["exchange_s"] == 0
    for n, g in sizes.items():
        if g["best"] is None:
            continue
        assert n == 1 or g["exchange_s"] > 0
        step = g["best"]["predicted_step_s"] + g["exchange_s"]
        assert g["frames_per_s_per_gpu"] == pytest.approx(g["frames_per_gpu"] / step, rel=1e-3)
    fitting = [g for g in sizes.values() if g["best"] is not None]
    top = max(fitting, key=lambda g: g["frames_per_s_per_gpu"])
    overrides = [shlex.split(o)[0] for o in top["overrides"]]
    data = plan_json(capsys, long_recipe, *overrides)
    assert data["predicted_step_s"] == top["best"]["predicted_step_s"]
    assert data["plan"]["device_GiB"] == top["best"]["device_GiB"] and data["fits"]
