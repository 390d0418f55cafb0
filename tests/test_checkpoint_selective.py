"""The selective checkpoint policy: a block recomputed in backward except the tensors `parallel.checkpoint.save`
names (sdpa: the fused SDPA op's outputs; qkv: the qkv projection's output).

Specified here: the recipe keys and their errors, the plan (whole blocks wrapped, labels, per-group save
sets), which ops backward re-runs, what the SAC cache holds (exactly the planner's formula), gradients
equal to no checkpointing in fp32 on the tiny and mid presets (one process, and FSDP2 over 2 gloo ranks),
and the planner's terms against the saved bytes of a measured step. Under torch.compile: tests/test_compile.py.
"""
from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vggt_fsdp.memory import formulas as F
from vggt_fsdp.memory import planner
from vggt_fsdp.memory.accounting import count_saved_bytes
from vggt_fsdp.memory.measure import measure_step
from vggt_fsdp.model.config import get_preset
from vggt_fsdp.model.layers import Block, RotaryPositionEmbedding2D, patch_positions
from vggt_fsdp.model.vggt import VGGT, build_model
from vggt_fsdp.parallel import ParallelConfig, plan_parallelism
from vggt_fsdp.parallel.checkpointing import (
    MATMUL_OPS,
    SDPA_OPS,
    apply_checkpointing,
    canonical_name,
    observe_selective_cache,
    recomputed_ops,
    wrap_modules,
    wrapped_paths,
)
from vggt_fsdp.parallel.config import (
    CheckpointConfig,
    GroupCheckpoint,
    parse_policy_label,
    policy_label,
)
from vggt_fsdp.recipe import RecipeError, load_recipe

SAVE_SETS = [("sdpa",), ("qkv",), ("sdpa", "qkv")]


# ------------------------------------------------------------------------------------------- recipe keys
def test_labels_name_the_save_set_in_a_fixed_order():
    assert policy_label("selective", ["qkv", "sdpa"]) == "selective(sdpa+qkv)"
    assert policy_label("selective", ["sdpa"]) == "selective(sdpa)"
    assert policy_label("block", ["sdpa"]) == "block"
    for label in ("none", "attention", "block", "selective(sdpa)", "selective(qkv)", "selective(sdpa+qkv)"):
        assert policy_label(*parse_policy_label(label)) == label
    for bad in ("selective()", "selective(qkv+sdpa)", "selective(sdpa+sdpa)", "selective(out)", "every_n"):
        with pytest.raises(ValueError, match="block checkpoint policy"):
            parse_policy_label(bad)


@pytest.mark.parametrize("overrides,message", [
    (["parallel.checkpoint.save=[]"], "parallel.checkpoint.save is empty"),
    (["parallel.checkpoint.save=[sdpa, sdpa]"], "names a tensor twice"),
    (["parallel.checkpoint.save=[spda]"], "did you mean 'sdpa'"),
    (["parallel.checkpoint.groups.global.save=[qkv]"],
     "groups.global.save applies to policy selective, but the group's policy is 'attention'"),
])
def test_bad_save_sets_are_refused_at_load(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("recipes/cpu_tiny.yaml", overrides)


def test_recipe_keys_reach_the_plan():
    recipe = load_recipe("recipes/cpu_tiny.yaml", [
        "parallel.checkpoint.policy=selective", "parallel.checkpoint.save=[qkv, sdpa]",
        "parallel.checkpoint.groups.frame.policy=selective", "parallel.checkpoint.groups.frame.save=[sdpa]",
        "parallel.checkpoint.groups.dino.policy=block"])
    model = build_model(get_preset("vggt-tiny").replace(enable_track=False), device="meta")
    plan = plan_parallelism(model, recipe.parallel)
    labels = {u.path: u.checkpoint for u in plan.units if u.kind == "block"}
    assert labels["aggregator.frame_blocks.0"] == "selective(sdpa)"
    assert labels["aggregator.global_blocks.3"] == labels["camera_head.trunk.0"] == "selective(sdpa+qkv)"
    assert labels["aggregator.patch_embed.blocks.1"] == "block"
    # Selective blocks are wrapped whole, and only they get a save set.
    assert set(plan.selective) == {p for p, label in labels.items() if label.startswith("selective")}
    assert set(plan.checkpoint_wrapped) == set(labels)
    assert plan.selective["aggregator.frame_blocks.2"] == ("sdpa",)


def test_recipe_show_names_the_policy(capsys):
    from vggt_fsdp.cli import main

    assert main(["recipe", "show", "recipes/cpu_tiny.yaml", "parallel.checkpoint.policy=selective",
                 "parallel.checkpoint.save=[sdpa, qkv]", "--plan-only"]) == 0
    out = capsys.readouterr().out
    assert out.count("selective(sdpa+qkv)") == 11  # 2 DINO + 4 frame + 4 global + 1 camera trunk block


# ------------------------------------------------------------------------------------------- one block
def _block(dtype: torch.dtype, qk_norm: bool = True, rope: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Block(32, 4, init_values=0.5, qk_norm=qk_norm,
                               rope=RotaryPositionEmbedding2D() if rope else None)).to(dtype)


def _inputs(dtype: torch.dtype, batch: int = 3):
    positions = patch_positions(3, 4, 5, "cpu")
    x = torch.randn(batch, positions.shape[1], 32, dtype=dtype, requires_grad=True)
    return x, positions


class OpLog(TorchDispatchMode):
    """The aten ops that run (the CPU backward runs on the calling thread)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("save", [None, *SAVE_SETS], ids=lambda s: "block" if s is None else "+".join(s))
def test_backward_reruns_the_block_except_what_is_saved(save):
    model = _block(torch.float32)
    wrap_modules(model, ["0"], {"0": save} if save else {})
    x, positions = _inputs(torch.float32)
    y = model[0](x, pos=positions)
    with OpLog() as log:
        y.sum().backward()
    sdpa_forwards = sum(op in SDPA_OPS for op in log.ops)
    matmuls = sum(op in MATMUL_OPS for op in log.ops)
    # Whole-block recompute: one SDPA forward, 4 projections re-run + 8 gradient matmuls.
    assert sdpa_forwards == (0 if save and "sdpa" in save else 1)
    assert matmuls == (11 if save and "qkv" in save else 12)
    # recomputed_ops (for recompute models) predicts the same from the forward's ops.
    with OpLog() as forward:
        _block(torch.float32)[0](x, pos=positions)
    rerun = [op for op, again in zip(forward.ops, recomputed_ops(forward.ops, save or ())) if again]
    assert sum(op in SDPA_OPS for op in rerun) == sdpa_forwards
    assert sum(op in MATMUL_OPS for op in rerun) + 8 == matmuls


@pytest.mark.parametrize("save", SAVE_SETS, ids="+".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm,rope", [(True, True), (False, False)])
def test_saved_bytes_of_one_block_are_the_formula(save, dtype, qk_norm, rope):
    model = _block(dtype, qk_norm, rope)
    wrap_modules(model, ["0"], {"0": save})
    x, positions = _inputs(dtype)
    cached = []
    with observe_selective_cache(cached.extend):
        report, _ = count_saved_bytes(lambda: model[0](x, pos=positions if rope else None))
    shape = F.BlockShape(3, positions.shape[1], 32, 4, x.element_size(), qk_norm, positions.shape[1] if rope else 0,
                         True)
    assert report.total_bytes == F.block_saved(shape, F.Kernels("cpu"), policy_label("selective", save))
    # What the cache holds: the SDPA op's output and logsumexp, the qkv projection's output.
    expected = []
    if "sdpa" in save:
        expected += [(3, 4, shape.seq, 8), (3, 4, shape.seq)]
    if "qkv" in save:
        expected += [(3 * shape.seq, 96)]
    assert sorted(tuple(t.shape) for t in cached) == sorted(expected)


@pytest.mark.parametrize("save", SAVE_SETS, ids="+".join)
def test_math_attention_saves_its_output_and_gradients_equal_the_fused_kernel(save):
    """SDPA's math kernel (the deterministic path on CUDA: fused kernels off) has no op of its own; the
    policy saves its output matmul (not the scores) and the qkv projection, and the gradients are those
    of the same kernel without checkpointing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def grads(wrap: bool):
        model = _block(torch.float32)
        if wrap:
            wrap_modules(model, ["0"], {"0": save})
        x, positions = _inputs(torch.float32)
        cached = []
        with sdpa_kernel([SDPBackend.MATH]), observe_selective_cache(cached.extend):
            model[0](x, pos=positions).square().sum().backward()
        return [x.grad, *(p.grad for p in model.parameters())], sorted(tuple(t.shape) for t in cached)

    plain, _ = grads(False)
    math, cached = grads(True)
    seq = patch_positions(3, 4, 5, "cpu").shape[1]
    expected = ([(12, seq, 8)] if "sdpa" in save else []) + ([(3 * seq, 96)] if "qkv" in save else [])
    assert cached == sorted(expected)  # never the (12, seq, seq) scores or probabilities
    for a, b in zip(math, plain):
        torch.testing.assert_close(a, b)


def test_a_block_without_attention_is_refused():
    model = nn.Sequential(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)))
    wrap_modules(model, ["0"], {"0": ("sdpa",)})
    x = torch.randn(3, 5, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="ran no attention"):
        model[0](x)
    with torch.no_grad():  # nothing is checkpointed without gradients: nothing to refuse
        model[0](x)


# ------------------------------------------------------------------------------------------- gradients
def _loss(out: dict) -> torch.Tensor:
    dense = sum((out[k].float() ** 2).mean() for k in ("depth", "depth_conf", "world_points", "world_points_conf"))
    return dense + sum((pose.float() ** 2).mean() for pose in out["pose_enc_list"])


def _grads(preset: str, checkpoint: CheckpointConfig, images: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = VGGT(get_preset(preset).replace(enable_track=False))
    plan = plan_parallelism(model, ParallelConfig(checkpoint=checkpoint))
    apply_checkpointing(model, plan.checkpoint_wrapped, plan.chunk_checkpointed, plan.selective)
    _loss(model(images)).backward()
    return {canonical_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None}


def _max_rel_err(got: dict, want: dict) -> float:
    assert got.keys() == want.keys() and len(want) > 100
    return max(((got[k].double() - want[k].double()).norm() / want[k].double().norm().clamp_min(1e-30)).item()
               for k in want)


MIXED = CheckpointConfig(policy="selective", save=["sdpa", "qkv"],
                         groups={"dino": GroupCheckpoint("selective", save=["qkv"]),
                                 "frame": GroupCheckpoint("selective", save=["sdpa"])})


@pytest.mark.parametrize("preset", ["vggt-tiny", "vggt-mid"])
def test_gradients_equal_no_checkpointing(preset):
    """fp32, 2 scenes of 2 frames; the DINO, frame and global blocks each keep another save set."""
    images = torch.rand(2, 2, 3, 28, 42, generator=torch.Generator().manual_seed(1))
    want = _grads(preset, CheckpointConfig(policy="none"), images)
    assert _max_rel_err(_grads(preset, MIXED, images), want) <= 1e-6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    """FSDP2 over 2 gloo ranks, fp32: gradients of this rank's scene, no checkpointing against selective."""
    import torch.distributed as dist

    from vggt_fsdp.parallel import apply_parallelism, build_mesh

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo")
    images = torch.rand(2, 2, 3, 28, 42, generator=torch.Generator().manual_seed(1))[rank:rank + 1]
    result = {}
    for preset in ("vggt-tiny", "vggt-mid"):
        for name, checkpoint in (("none", CheckpointConfig(policy="none")), ("selective", MIXED)):
            cfg = ParallelConfig(checkpoint=checkpoint)
            cfg.precision.param_dtype = "fp32"
            torch.manual_seed(0)
            model = VGGT(get_preset(preset).replace(enable_track=False))
            apply_parallelism(model, cfg, build_mesh(cfg.sharding, "cpu"))
            _loss(model(images)).backward()
            result[preset, name] = {canonical_name(n): p.grad.full_tensor()
                                    for n, p in model.named_parameters() if p.grad is not None}
            result[preset, name, "wrapped"] = len(wrapped_paths(model))
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_gradients_equal_no_checkpointing_under_fsdp2(tmp_path):
    mp.spawn(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for preset in ("vggt-tiny", "vggt-mid"):
            assert result[preset, "none", "wrapped"] == 0 and result[preset, "selective", "wrapped"] > 0
            assert _max_rel_err(result[preset, "selective"], result[preset, "none"]) <= 1e-6, (rank, preset)


# ------------------------------------------------------------------------------------------- the planner
def test_planner_terms_are_the_measured_saved_bytes():
    """One step of the tiny model, bf16, sharded over a fake group of 2: the planner's activation terms of
    the DINO (qkv), frame (sdpa) and global (sdpa+qkv) blocks within 2% of the measured bytes, the SAC
    cache included."""
    cfg = get_preset("vggt-tiny").replace(enable_track=False)
    parallel = ParallelConfig(checkpoint=MIXED)
    measured = measure_step(cfg, parallel, 2, 2, 2, (28, 42), "cpu")
    predicted = planner.plan(cfg, parallel, 2, 4, (28, 42), "cpu", frames_range=(2, 2))
    for group in ("dino", "frame", "global"):
        got, want = predicted.total("activation", group), measured.saved.by_group[group]
        assert abs(got - want) <= 0.02 * want, (group, got, want)
    assert abs(predicted.total("activation") - measured.saved.total_bytes) <= 0.02 * measured.saved.total_bytes
    block_terms = [t.name for t in predicted.terms if t.group in ("dino", "frame", "global")]
    assert "DINO blocks (2 x selective(qkv))" in block_terms
    assert "global blocks (4 x selective(sdpa+qkv))" in block_terms


def test_selective_bytes_per_token_of_vggt_1b():
    """The figures the README quotes: per token and block of VGGT-1B in bf16 on CUDA."""
    cfg = get_preset("vggt-1b").aggregator
    shape = F.BlockShape(1, 24 * 1374, cfg.embed_dim, cfg.num_heads, 2, True, 24 * 1374, True)
    cuda = F.Kernels("cuda")
    per_token = {label: F.block_saved(shape, cuda, label) / shape.tokens
                 for label in ("block", "selective(sdpa)", "selective(sdpa+qkv)")}
    assert per_token == {"block": 2048, "selective(sdpa)": 2048 + 2112, "selective(sdpa+qkv)": 2048 + 2112 + 6144}


def test_fitter_order_is_the_recompute_flops_of_vggt_1b_at_24_frames():
    """planner.BLOCK_POLICIES is ordered by the FLOPs each policy re-runs for VGGT-1B's DINO, frame and
    global blocks at 24 frames a scene, 518 x 518 (formulas.block_recompute_flops)."""
    one_b = get_preset("vggt-1b")
    a, pe = one_b.aggregator, one_b.patch_embed
    tokens = 37 * 37 + 1 + a.num_register_tokens
    shapes = ([F.BlockShape(24, 1 + pe.num_register_tokens + 37 * 37, a.embed_dim, pe.num_heads, 2, False, 0, True)]
              + [F.BlockShape(24, tokens, a.embed_dim, a.num_heads, 2, True, tokens, True)]
              + [F.BlockShape(1, 24 * tokens, a.embed_dim, a.num_heads, 2, True, 24 * tokens, True)])

    def recompute(name: str) -> float:
        if name.startswith("every_"):
            n = int(name.split("_")[1])
            return len(range(0, 24, n)) / 24 * recompute("block")
        return sum(sum(F.block_recompute_flops(s, name).values()) for s in shapes)

    costs = [recompute(name) for name in planner.BLOCK_POLICIES]
    assert costs == sorted(costs) and costs[0] == 0
    assert {"selective(sdpa)", "selective(sdpa+qkv)"} <= set(planner.BLOCK_POLICIES)
    labels = [label for label, _ in planner.policy_candidates(ParallelConfig())]
    assert "blocks selective(sdpa+qkv), heads chunks" in labels
    assert planner.recompute_rank("blocks selective(sdpa), heads none") < planner.recompute_rank(
        "blocks attention, heads none")
