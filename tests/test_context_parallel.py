"""Context parallelism: a scene's frames split over a group of ranks gives what one process gives.

The spawned ranks (gloo, fp32) shard the model with FSDP2 over all of them, split each scene's frames
over the context group (parallel/context.py) and record the gathered outputs, the loss and the full
gradients under each checkpoint policy; the test process computes the same scenes unsharded on one
process with the same checkpoint wrappers. Presets: tiny (4 heads: N = 2 and 4, every policy) and mid
(6 heads: N = 2 and 3, no checkpointing, block and selective; N = 4 does not divide its heads and is
refused, the last table of this file).
"""
from __future__ import annotations

import contextlib
import copy
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from vggt_fsdp.model.vggt import VGGT
from vggt_fsdp.parallel import ParallelConfig, plan_parallelism
from vggt_fsdp.parallel.checkpointing import apply_checkpointing, canonical_name
from vggt_fsdp.parallel.context import ContextLayout, check_context_parallel
from vggt_fsdp.recipe import load_recipe, model_config

REPO = Path(__file__).resolve().parents[1]
CPU_TINY = REPO / "recipes" / "cpu_tiny.yaml"
POLICIES = ("none", "attention", "block", "selective")
COMPILED = ("none", "selective")
OUTPUTS = ("depth", "depth_conf", "world_points", "world_points_conf", "pose_enc")
# preset: (scenes, frames, the policies its ranks run)
PRESETS = {"vggt-tiny": (2, 4, POLICIES), "vggt-mid": (1, 6, ("none", "block", "selective"))}


def tiny_model(preset: str = "vggt-tiny") -> VGGT:
    torch.manual_seed(0)
    return VGGT(model_config(load_recipe(CPU_TINY, [f"model.preset={preset}"]).model))


def scenes(preset: str = "vggt-tiny") -> torch.Tensor:
    """The preset's scenes at 28 x 42 px (2 x 3 patches)."""
    count, frames, _ = PRESETS[preset]
    return torch.rand(count, frames, 3, 28, 42, generator=torch.Generator().manual_seed(1))


def loss_fn(out: dict) -> torch.Tensor:
    """Touches every output of the camera (every refinement iteration), depth and point heads, with
    frames weighted differently, so a frame put in the wrong place changes the loss."""
    weights = torch.arange(1, out["depth"].shape[1] + 1, dtype=torch.float32)
    dense = sum(((out[k].float() ** 2).flatten(2).mean(dim=(0, 2)) * weights).sum()
                for k in ("depth", "depth_conf", "world_points", "world_points_conf"))
    return dense + sum(((pose.float() ** 2).mean(dim=(0, 2)) * weights).sum() for pose in out["pose_enc_list"])


def parallel_config(policy: str) -> ParallelConfig:
    cfg = copy.deepcopy(load_recipe(CPU_TINY).parallel)
    cfg.precision.param_dtype = "fp32"
    cfg.checkpoint.policy = policy
    return cfg


def run(model: VGGT, images: torch.Tensor, counter=None) -> tuple[dict, float, dict]:
    with counter if counter is not None else contextlib.nullcontext():
        out = model(images)
    loss = loss_fn(out)
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:  # unused by this model (e.g. the DINO mask token)
            continue
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grads[canonical_name(name)] = grad.detach().clone()
    return {k: out[k].detach().clone() for k in OUTPUTS}, float(loss.detach()), grads


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, size: int, port: int, out_dir: str, compiled: bool = False,
            preset: str = "vggt-tiny") -> None:
    import torch.distributed as dist

    from vggt_fsdp.memory.accounting import SavedTensorCounter
    from vggt_fsdp.memory.measure import block_groups
    from vggt_fsdp.parallel import apply_parallelism, build_mesh
    from vggt_fsdp.parallel.context import new_context_group

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    context = new_context_group(size)
    layout = context.layout
    images = scenes(preset)[:, layout.frames(scenes(preset).shape[1])]
    result = {}
    for policy in COMPILED if compiled else PRESETS[preset][2]:
        cfg = parallel_config(policy)
        cfg.compile = compiled
        model = tiny_model(preset)
        apply_parallelism(model, cfg, build_mesh(cfg.sharding, "cpu"))
        model.set_context(context)
        counter = SavedTensorCounter(block_groups(model))
        result[policy] = run(model, images, counter)
        result[f"saved {policy}"] = counter.report
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def reference(policy: str, preset: str = "vggt-tiny") -> tuple[dict, float, dict]:
    model = tiny_model(preset)
    plan = plan_parallelism(model, parallel_config(policy))
    apply_checkpointing(model, plan.checkpoint_wrapped, plan.chunk_checkpointed, plan.selective)
    return run(model, scenes(preset))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def references():
    return {policy: reference(policy) for policy in POLICIES}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """(size, preset) -> what each of `size` spawned ranks recorded (spawned once for the module)."""
    cache: dict[tuple[int, str], list[dict]] = {}

    def get(size: int, preset: str = "vggt-tiny") -> list[dict]:
        if (size, preset) not in cache:
            out_dir = tmp_path_factory.mktemp(f"ranks{size}")
            mp.spawn(_worker, args=(size, size, _free_port(), str(out_dir), False, preset), nprocs=size, join=True)
            cache[size, preset] = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(size)]
        return cache[size, preset]

    return get


@pytest.mark.parametrize("preset, size", [("vggt-tiny", 2), ("vggt-tiny", 4), ("vggt-mid", 2), ("vggt-mid", 3)])
def test_frames_split_over_ranks_equal_one_process(preset, size, references, spawned):
    ranks = spawned(size, preset)
    for policy in PRESETS[preset][2]:
        want_out, want_loss, want_grads = references[policy] if preset == "vggt-tiny" else reference(policy, preset)
        for rank in ranks:
            out, loss, grads = rank[policy]
            assert loss == pytest.approx(want_loss, rel=1e-5), policy
            for key in OUTPUTS:
                assert out[key].shape == want_out[key].shape
                assert rel_err(out[key], want_out[key]) <= 1e-5, (policy, key)
            assert grads.keys() == want_grads.keys()
            bad = {k: rel_err(grads[k], want_grads[k]) for k in want_grads
                   if rel_err(grads[k], want_grads[k]) > 1e-5}
            assert not bad, (policy, bad)
    # Frame 0's own camera token got a gradient: the rank holding frame 0 used it.
    assert want_grads["aggregator.camera_token"][:, 0].abs().sum() > 0


@pytest.mark.slow  # inductor compiles every block graph: 4.5-11 minutes on 2 loaded cores (the eager
# tests above cover the exchange in the model, test_a_compiled_global_block_exchanges_exactly inside a
# compiled block; this covers the whole model compiled)
def test_frames_split_over_ranks_equal_one_process_compiled(references, tmp_path):
    mp.spawn(_worker, args=(2, 2, _free_port(), str(tmp_path), True), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for policy in COMPILED:
            out, loss, grads = got[policy]
            want_out, want_loss, want_grads = references[policy]
            assert loss == pytest.approx(want_loss, rel=1e-5)
            assert all(rel_err(out[k], want_out[k]) <= 1e-5 for k in OUTPUTS), policy
            assert max(rel_err(grads[k], want_grads[k]) for k in want_grads) <= 1e-5, policy


def test_saved_activations_per_rank_shrink_with_the_group_and_match_the_planner(spawned):
    """Per-rank saved tensors (saved-tensor hooks, measured on 2 ranks with frames split) against one
    process holding the scene (the same counter under FSDP2 on a fake 2-rank group, measure_step): about
    half, and the planner's activation terms for parallel.context_parallel=2 within 5% of it."""
    from vggt_fsdp.memory import planner
    from vggt_fsdp.memory.measure import measure_step

    cfg = model_config(load_recipe(CPU_TINY).model)
    image = tuple(scenes().shape[-2:])
    whole = measure_step(cfg, parallel_config("none"), 2, 2, 4, image, "cpu").saved.total_bytes
    split = parallel_config("none")
    split.context_parallel = 2
    predicted = planner.plan(cfg, split, 2, 4, image, "cpu", frames_range=(4, 4)).total("activation")
    for rank in spawned(2):
        measured = rank["saved none"].total_bytes
        assert 0.45 <= measured / whole <= 0.6, (measured, whole)
        assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def test_layout_splits_frames_contiguously_and_groups_consecutive_ranks():
    layouts = [ContextLayout.of(rank, 8, 4) for rank in range(8)]
    assert [(l.rank, l.group_index) for l in layouts] == [(r % 4, r // 4) for r in range(8)]
    assert all(l.num_groups == 2 for l in layouts)
    assert [layouts[r].frames(12) for r in range(4)] == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 12)]
    with pytest.raises(ValueError, match="multiple of parallel.context_parallel"):
        layouts[0].frames(10)


@pytest.mark.parametrize("size, world, heads, message", [
    (3, 4, {"aggregator": 6}, "does not divide the 4 processes"),
    (4, 8, {"aggregator": 6}, "does not divide the 6 heads of aggregator"),
    (0, 4, {"aggregator": 4}, ">= 1"),
])
def test_context_parallel_checks_name_the_bad_value(size, world, heads, message):
    with pytest.raises(ValueError, match=message):
        check_context_parallel(size, world, heads)


@pytest.mark.parametrize("name, scene, memory", [("a100_40g_long", 96, 39.59), ("a100_80g_long", 192, 79.15)])
def test_long_recipes_plan_to_fit_their_cards_with_long_scenes(name, scene, memory, capsys):
    """`vggt-fsdp plan recipes/<long>.yaml`: the largest scene (frames_range[1]) fits per GPU with margin,
    and its frames are split 4 ways (the plan is of one GPU's share)."""
    import json

    from vggt_fsdp.cli import main

    assert main(["plan", str(REPO / "recipes" / f"{name}.yaml"), "--gpu-memory", str(memory), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert recipe.data.frames_range[1] >= scene and recipe.parallel.context_parallel == 4
    assert data["fits"] and data["margin_GiB"] >= 0.1 * memory
    # The worst split of the group's 4 x frames_per_gpu frames (here two shorter scenes) is what fits...
    assert data["plan"]["scenes"] * data["plan"]["frames_per_scene"] == 4 * data["plan"]["frames_per_gpu"] == scene
    assert data["context_exchange_s"] > 0
    # ...and one scene of the longest length fits on its own too.
    from vggt_fsdp.memory import planner

    shape = planner.recipe_shape(recipe)
    longest = planner.plan(shape.model_cfg, recipe.parallel, shape.world_size, scene // 4, shape.image_hw,
                           frames_range=(scene, scene))
    assert longest.frames_per_scene == scene and longest.scenes == 1 and longest.fits(memory * 0.9 * 1024**3)


def test_a_group_that_does_not_divide_the_presets_heads_is_refused_when_the_recipe_loads():
    """vggt-mid has 6 heads: N = 4 cannot give each rank a whole share of them."""
    with pytest.raises(ValueError, match="parallel.context_parallel=4 does not divide the 6 heads"):
        load_recipe(CPU_TINY, ["model.preset=vggt-mid", "parallel.context_parallel=4", "accelerate.num_processes=4",
                               "data.frames_range=[4,8]", "data.frames_per_gpu=2"])


def _block_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One global block, its frames split over 2 ranks, compiled as parallel.compile compiles blocks."""
    import torch.distributed as dist

    from vggt_fsdp.model.layers import Block
    from vggt_fsdp.parallel.compiling import compile_blocks, compiled_graphs
    from vggt_fsdp.parallel.context import new_context_group

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.block = Block(32, 4, qk_norm=True)
    holder.block.attn.__dict__["context"] = new_context_group(world)
    compile_blocks(holder, ["block"])
    x = _block_input()[:, rank * 6:(rank + 1) * 6].clone().requires_grad_(True)
    out = holder.block(x)
    (out * _block_weights()[:, rank * 6:(rank + 1) * 6]).sum().backward()
    grads = {name: p.grad.clone() for name, p in holder.block.named_parameters()}
    for grad in grads.values():
        dist.all_reduce(grad)  # a parameter's gradient is the sum of the ranks' parts
    torch.save({"out": out.detach(), "x_grad": x.grad, "grads": grads, "graphs": len(compiled_graphs())},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _block_input() -> torch.Tensor:
    return torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(3))


def _block_weights() -> torch.Tensor:
    return torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(4))


def test_a_compiled_global_block_exchanges_exactly(tmp_path):
    """The exchange traced into a compiled block (inductor, dynamic shapes, as parallel.compile does):
    outputs, input gradients and parameter gradients equal the eager block over all tokens on one
    process. (The whole model compiled at N = 2 is the slow test above; this is its fast cover.)"""
    from vggt_fsdp.model.layers import Block

    torch.manual_seed(0)
    block = Block(32, 4, qk_norm=True)
    x = _block_input().requires_grad_(True)
    out = block(x)
    (out * _block_weights()).sum().backward()
    mp.spawn(_block_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        share = slice(rank * 6, (rank + 1) * 6)
        assert got["graphs"] >= 1  # the block ran compiled
        assert rel_err(got["out"], out.detach()[:, share]) <= 1e-5
        assert rel_err(got["x_grad"], x.grad[:, share]) <= 1e-5
        want = torch.cat([param.grad.flatten() for _, param in block.named_parameters()])
        have = torch.cat([got["grads"][name].flatten() for name, _ in block.named_parameters()])
        # as one vector: k_norm's bias has an exactly zero gradient (softmax ignores a shift shared by all
        # keys), which both sides get only as rounding noise
        assert rel_err(have, want) <= 1e-5


def test_a_stand_in_group_runs_a_ranks_shapes_without_a_group():
    """StandInGroup (the step-time model counts with it; the one-GPU stage 60_long_share measures with it):
    a rank's 2 of 4 frames give outputs of the whole scene's 4 frames, and its global attention attends
    over all 4 frames' tokens with half the heads, so the share's attention FLOPs lie between a plain
    2-frame and a plain 4-frame forward's."""
    from vggt_fsdp.memory.flops import Counter
    from vggt_fsdp.parallel.context import StandInGroup

    def attention_flops(model, images):
        with Counter() as counter:
            out = model(images)
        return out, counter.work.by_kind()["attention"]

    model = tiny_model()
    _, two = attention_flops(model, scenes()[:, :2])
    _, four = attention_flops(model, scenes())
    model.set_context(StandInGroup(2))
    out, share = attention_flops(model, scenes()[:, :2])
    assert out["depth"].shape[:2] == out["pose_enc"].shape[:2] == (2, 4)
    assert two < share < four
