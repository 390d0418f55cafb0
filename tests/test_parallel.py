"""The sharding engine: plan, checkpoint wrapping, FSDP2 on 2 CPU processes (gloo) through Accelerate.

The 2-process test runs once (module fixture) and the tests below read what it measured: equality with
a single-process unsharded run, identical losses on every rank, storage per rank, one unit per parameter
and the Accelerate FSDP path.
"""
from __future__ import annotations

import copy
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from vggt_fsdp.model.layers import Attention, Block
from vggt_fsdp.model.vggt import VGGT, build_model
from vggt_fsdp.parallel import ParallelConfig, plan_parallelism
from vggt_fsdp.parallel.checkpointing import apply_checkpointing, canonical_name, wrapped_paths
from vggt_fsdp.parallel.config import GroupCheckpoint, ShardingConfig
from vggt_fsdp.parallel.sharding import mesh_shape
from vggt_fsdp.recipe import load_recipe, model_config

REPO = Path(__file__).resolve().parents[1]
CPU_TINY = REPO / "recipes" / "cpu_tiny.yaml"
STEPS, LR = 3, 1e-3


# --------------------------------------------------------------------------------------- shared helpers
def tiny_model(track: bool = False) -> VGGT:
    recipe = load_recipe(CPU_TINY, [f"model.heads.track={str(track).lower()}"])
    torch.manual_seed(0)
    return VGGT(model_config(recipe.model))


def batch() -> list[torch.Tensor]:
    """The global batch: 2 scenes of 2 frames at 28 x 42 px (2 x 3 patches); rank r trains on scene r.

    The single-process reference runs the scenes one after the other and sums loss / 2 (gradient
    accumulation: the same global-batch gradient). Batch-1 kernels on both sides make the per-scene
    gradients bitwise equal, so what is compared is the sharding. (Batch-2 kernels round differently,
    and AdamW turns that noise into +-lr steps where a gradient is mathematically zero, e.g. a bias
    added to every key, which softmax ignores; the sharded run would then be compared with noise.)
    """
    images = torch.rand(2, 2, 3, 28, 42, generator=torch.Generator().manual_seed(1))
    return [images[:1], images[1:]]


def loss_fn(out: dict) -> torch.Tensor:
    """A simple loss touching every output of the camera, depth and point heads (each refinement
    iteration of the camera head, so every parameter gets a gradient)."""
    dense = sum((out[k].float() ** 2).mean() for k in ("depth", "depth_conf", "world_points", "world_points_conf"))
    return dense + sum((pose.float() ** 2).mean() for pose in out["pose_enc_list"])


def train(model: nn.Module, scenes: list[torch.Tensor], steps: int = STEPS) -> list[torch.Tensor]:
    """AdamW steps on the mean loss over `scenes` (one backward per scene); returns the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for _ in range(steps):
        total = 0.0
        for images in scenes:
            loss = loss_fn(model(images)) / len(scenes)
            loss.backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 copies by canonical name (collective for a sharded model)."""
    out = {}
    for name, param in model.named_parameters():
        tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[canonical_name(name)] = tensor.detach().clone()
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def max_rel_err(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(rel_err(got[k], want[k]) for k in want)


def params_rel_err(got: dict, want: dict) -> float:
    """Relative error of the whole parameter vector. (Per tensor, a few tensors whose gradient is
    mathematically zero, e.g. a bias added to every key that softmax ignores, hold only rounding noise,
    which AdamW normalises into +-lr steps: their error is noise / noise, whatever the sharding.)"""
    assert got.keys() == want.keys()
    flat_got = torch.cat([got[k].flatten().double() for k in sorted(want)])
    flat_want = torch.cat([want[k].flatten().double() for k in sorted(want)])
    return ((flat_got - flat_want).norm() / flat_want.norm()).item()


# --------------------------------------------------------------------------------------- plans (meta device)
def test_plan_units_are_blocks_then_heads_then_root_and_own_each_parameter_once():
    model = build_model(model_config(load_recipe(CPU_TINY, ["model.heads.track=true"]).model), device="meta")
    plan = plan_parallelism(model, ParallelConfig())
    blocks = [path for path, m in model.named_modules() if isinstance(m, Block)]
    heads = ["camera_head", "depth_head", "point_head", "track_head"]
    assert [u.path for u in plan.units if u.kind == "block"] == blocks
    assert sorted(u.path for u in plan.units if u.kind == "module") == sorted(heads)
    assert plan.units[-1].path == "" and plan.units[-1].kind == "root" and not plan.units[-1].reshard_after_forward
    assert sum(u.num_params for u in plan.units) == sum(p.numel() for p in model.parameters())
    # dtypes: the camera, depth and point heads (and the camera trunk blocks inside) are fp32.
    dtypes = {u.path: (u.param_dtype, u.reduce_dtype) for u in plan.units}
    assert dtypes["camera_head.trunk.0"] == dtypes["depth_head"] == ("fp32", "fp32")
    assert dtypes["aggregator.frame_blocks.0"] == dtypes[""] == dtypes["track_head"] == ("bf16", "fp32")


def test_plan_works_for_vggt_1b_on_meta():
    model = build_model(model_config(load_recipe(REPO / "recipes" / "a100_40g.yaml").model), device="meta")
    plan = plan_parallelism(model, load_recipe(REPO / "recipes" / "a100_40g.yaml").parallel)
    kinds = [u.kind for u in plan.units]
    assert kinds.count("block") == 24 + 24 + 24 + 4 and kinds.count("module") == 3
    assert sum(u.num_params for u in plan.units) == 1_256_537_516 - 65_941_396  # upstream total minus track head
    assert len(plan.checkpoint_wrapped) == 72 and plan.chunk_checkpointed == ["point_head", "depth_head"]


def _expected_wraps(model: nn.Module, cfg: ParallelConfig) -> set[str]:
    """What the policy names, computed from the module tree independently of the planner."""
    groups = {"dino": "aggregator.patch_embed.blocks.", "frame": "aggregator.frame_blocks.",
              "global": "aggregator.global_blocks.", "camera_trunk": "camera_head.trunk."}
    expected = set()
    for path, module in model.named_modules():
        if not isinstance(module, Block):
            continue
        group = next(g for g, prefix in groups.items() if path.startswith(prefix))
        override = cfg.checkpoint.groups.get(group)
        policy = override.policy if override else cfg.checkpoint.policy
        n = (override.n if override and override.n else cfg.checkpoint.n)
        index = int(path.rsplit(".", 1)[1])
        if policy == "attention":
            expected |= {f"{path}.{sub}" for sub, m in module.named_modules() if isinstance(m, Attention)}
        elif policy == "block" or (policy == "every_n" and index % n == 0):
            expected.add(path)
    return expected


POLICIES = {
    "none": dict(policy="none"),
    "attention": dict(policy="attention"),
    "block": dict(policy="block"),
    "every_n": dict(policy="every_n", n=2),
    "per_group": dict(policy="attention", groups={"dino": GroupCheckpoint("none"), "global": GroupCheckpoint("block"),
                                                   "frame": GroupCheckpoint("every_n", n=3)}),
}


def checkpointed(name: str) -> tuple[nn.Module, ParallelConfig]:
    """The tiny model with the checkpoint policy POLICIES[name] (and per-chunk heads) applied, unsharded."""
    model, cfg = tiny_model(), ParallelConfig()
    for key, value in POLICIES[name].items():
        setattr(cfg.checkpoint, key, value)
    cfg.checkpoint.heads = "chunks"
    plan = plan_parallelism(model, cfg)
    apply_checkpointing(model, plan.checkpoint_wrapped, plan.chunk_checkpointed)
    return model, cfg


@pytest.mark.parametrize("name", POLICIES)
def test_wrapping_is_exactly_what_the_policy_names(name):
    model, cfg = checkpointed(name)
    expected = _expected_wraps(tiny_model(), cfg)
    assert set(wrapped_paths(model)) == expected
    assert (expected == set()) == (name == "none")
    assert {path for path, m in model.named_modules() if getattr(m, "checkpoint_chunks", False)} == \
        {"depth_head", "point_head"}
    # State-dict names are untouched by the wrappers.
    assert set(model.state_dict()) == set(tiny_model().state_dict())


def test_checkpointing_changes_no_gradient():
    images = torch.cat(batch())
    reference = tiny_model()
    loss_fn(reference(images)).backward()
    want = {name: p.grad.clone() for name, p in reference.named_parameters() if p.grad is not None}
    for name in ("attention", "block", "per_group"):
        model, _ = checkpointed(name)
        loss_fn(model(images)).backward()
        got = {canonical_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert max_rel_err(got, want) <= 1e-6, name


class ToyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x).softmax(-1) * x


class ToyLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = ToyAttention()
        self.ffn = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.ffn(x + self.attention(x))


def toy_model() -> nn.Module:
    """Another project's model: its own block and attention classes, a head as module "2"."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), *[ToyLayer() for _ in range(3)], nn.Linear(8, 2))


def toy_parallel() -> ParallelConfig:
    cfg = ParallelConfig()
    cfg.layout.block_types = ["ToyLayer"]
    cfg.layout.attention_types = [f"{ToyAttention.__module__}.{ToyAttention.__qualname__}"]
    cfg.layout.units, cfg.layout.groups, cfg.precision.fp32_modules = ["4"], {}, ["4"]
    return cfg


def test_layout_names_for_another_model():
    """A model with its own block / attention classes is planned once the layout names them."""
    model = toy_model()
    with pytest.raises(ValueError, match="no module of the model matches parallel.layout.block_types"):
        plan_parallelism(model, ParallelConfig())
    cfg = toy_parallel()
    plan = plan_parallelism(model, cfg)
    assert [(u.path, u.param_dtype) for u in plan.units] == [("1", "bf16"), ("2", "bf16"), ("3", "bf16"),
                                                               ("4", "fp32"), ("", "bf16")]
    assert plan.checkpoint_wrapped == ["1.attention", "2.attention", "3.attention"]
    cfg.layout.attention_types = ["Attention"]
    with pytest.raises(ValueError, match="has no sub-module of parallel.layout.attention_types"):
        plan_parallelism(model, cfg)
    cfg.checkpoint.policy, cfg.checkpoint.heads = "block", "chunks"
    with pytest.raises(ValueError, match="checkpoint_chunks"):
        plan_parallelism(model, cfg)


def test_mesh_shapes():
    assert mesh_shape(ShardingConfig(), 16, 8) == (16,)
    assert mesh_shape(ShardingConfig(mode="hybrid"), 16, 8) == (2, 8)
    assert mesh_shape(ShardingConfig(mode="hybrid", replicate_degree=4), 16, 8) == (4, 4)
    assert mesh_shape(ShardingConfig(mode="hybrid", shard_degree=2), 16, None) == (8, 2)
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        mesh_shape(ShardingConfig(mode="hybrid"), 16, None)
    with pytest.raises(ValueError, match="!= world size"):
        mesh_shape(ShardingConfig(mode="hybrid", replicate_degree=3, shard_degree=4), 16, 8)
    with pytest.raises(ValueError, match="replicate_degree=3 does not divide the world size 16"):
        mesh_shape(ShardingConfig(mode="hybrid", replicate_degree=3), 16, 8)


# --------------------------------------------------------------------------------------- 2 processes, gloo
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: the recipe's Accelerator (FSDP bridged on CPU), then three measured runs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule

    from vggt_fsdp.parallel import apply_parallelism, build_accelerator, build_mesh, prepare_model, prepare_optimizer

    torch.set_num_threads(1)
    # The DPT heads return views of one tensor (depth and confidence); harmless for this loss.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    recipe = load_recipe(CPU_TINY)
    accelerator = build_accelerator(recipe)
    images, result = batch(), {"rank": rank}
    fp32 = fp32_parallel()

    def global_loss(losses):  # what a trainer logs: the mean over ranks
        stacked = torch.stack(losses)
        dist.all_reduce(stacked, op=dist.ReduceOp.AVG)
        return stacked.tolist()

    # 1. fp32, sharded over 2 ranks: storage, unit ownership, and 3 AdamW steps on this rank's scene.
    model = tiny_model()
    apply_parallelism(model, fp32, build_mesh(fp32.sharding, "cpu"))
    result["local_numel"] = sum(p.to_local().numel() for p in model.parameters())
    result["rows"] = sum(p.numel() // p.shape[0] for p in model.parameters())
    owners = {}
    for module in model.modules():
        if isinstance(module, FSDPModule) and module._get_fsdp_state()._fsdp_param_group is not None:
            for fsdp_param in module._get_fsdp_state()._fsdp_param_group.fsdp_params:
                owners.setdefault(id(fsdp_param.sharded_param), []).append(type(module).__name__)
    result["owners"] = [len(v) for v in owners.values()]
    result["num_params"] = len(list(model.parameters()))
    result["fp32_losses"] = global_loss(train(model, images[rank:rank + 1]))
    result["fp32_params"] = full_params(model)

    # 1b. fp32, hybrid 2-D mesh (replicate 2 x shard 1): the HSDP path; every rank holds everything.
    hybrid = fp32_parallel()
    hybrid.sharding.mode, hybrid.sharding.shard_degree = "hybrid", 1
    model = tiny_model()
    apply_parallelism(model, hybrid, build_mesh(hybrid.sharding, "cpu"))
    result["hybrid_mesh"] = tuple(model.aggregator.frame_blocks[0].norm1.weight.device_mesh.shape)
    result["hybrid_local_numel"] = sum(p.to_local().numel() for p in model.parameters())
    result["hybrid_losses"] = global_loss(train(model, images[rank:rank + 1]))
    result["hybrid_params"] = full_params(model)

    # 1c. another project's model: sharded by its layout; per-rank gradients of the full batch.
    model, toy_inputs = toy_model(), torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    toy_cfg = toy_parallel()
    toy_cfg.precision.param_dtype = "fp32"
    apply_parallelism(model, toy_cfg, build_mesh(toy_cfg.sharding, "cpu"))
    model(toy_inputs[2 * rank:2 * rank + 2]).square().mean().backward()
    result["toy_grads"] = {canonical_name(n): p.grad.full_tensor() for n, p in model.named_parameters()}
    result["toy_wrapped"] = wrapped_paths(model)

    # 2. bf16 (the recipe's policy) through Accelerate: prepare, backward, clipping, save_state.
    model = tiny_model()
    prepare_model(accelerator, model, recipe.parallel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    prepared, optimizer = prepare_optimizer(accelerator, model, optimizer)
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    optimizer_params = [p for group in inner.param_groups for p in group["params"]]
    result["accelerate"] = {"is_fsdp2": accelerator.is_fsdp2, "same_model": prepared is model,
                            "distributed_type": str(accelerator.distributed_type),
                            # Accelerate's own re-mapping confuses parameters with empty local shards.
                            "optimizer_holds_model_params": all(
                                a is b for a, b in zip(optimizer_params, model.parameters(), strict=True))}
    losses = []
    for step in range(STEPS):
        loss = loss_fn(prepared(images[rank]))
        accelerator.backward(loss)
        norm = accelerator.clip_grad_norm_(prepared.parameters(), 1e9)  # measures, never clips
        if step == 0:
            local_sq = sum(p.grad.to_local().double().pow(2).sum() for p in prepared.parameters()
                           if p.grad is not None)
            dist.all_reduce(local_sq)
            result["clip_norm"], result["manual_norm"] = float(norm), float(local_sq.sqrt())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    result["bf16_losses"] = global_loss(losses)
    result["bf16_params"] = full_params(prepared)
    accelerator.save_state(os.path.join(out_dir, "state"))
    result["state_files"] = sorted(os.listdir(os.path.join(out_dir, "state")))

    # 3. bf16 on one rank over the whole global batch: the single-process unsharded reference of the same
    # mixed precision (FSDP2 on a 1-rank mesh shards nothing).
    solo = dist.new_group([0])
    if rank == 0:
        model = tiny_model()
        apply_parallelism(model, recipe.parallel, DeviceMesh.from_group(solo, "cpu"))
        result["bf16_single_losses"] = [float(l) for l in train(model, images)]
        result["bf16_single_params"] = full_params(model)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


def fp32_parallel() -> ParallelConfig:
    """The cpu_tiny recipe's policy (attention checkpointing) in fp32, plus per-chunk head checkpointing."""
    cfg = copy.deepcopy(load_recipe(CPU_TINY).parallel)
    cfg.precision.param_dtype = "fp32"
    cfg.checkpoint.heads = "chunks"
    return cfg


@pytest.fixture(scope="module")
def fp32_reference():
    """Single process, unsharded, fp32, the whole global batch. It has the same checkpoint wrappers as the
    sharded run: recompute changes the order autograd sums gradient contributions in, a rounding-level
    difference (test_checkpointing_changes_no_gradient bounds it) that AdamW amplifies to +-lr steps
    where a gradient is mathematically zero."""
    model = tiny_model()
    plan = plan_parallelism(model, fp32_parallel())
    apply_checkpointing(model, plan.checkpoint_wrapped, plan.chunk_checkpointed)
    losses = [float(l) for l in train(model, batch())]
    return losses, full_params(model)


def test_fp32_sharded_run_equals_single_process_run(two_ranks, fp32_reference):
    ref_losses, ref_params = fp32_reference
    for rank in two_ranks:
        assert rank["fp32_losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert params_rel_err(rank["fp32_params"], ref_params) <= 1e-5
    # The parameters moved far more than that: the equality is not the trivial one of an untrained model.
    assert params_rel_err(two_ranks[0]["fp32_params"], full_params(tiny_model())) > 1e-3


def test_hybrid_sharded_run_equals_single_process_run(two_ranks, fp32_reference):
    ref_losses, ref_params = fp32_reference
    total = sum(p.numel() for p in tiny_model().parameters())
    for rank in two_ranks:
        assert rank["hybrid_mesh"] == (2, 1) and rank["hybrid_local_numel"] == total
        assert rank["hybrid_losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert params_rel_err(rank["hybrid_params"], ref_params) <= 1e-5


def test_another_projects_model_is_sharded_by_its_layout(two_ranks):
    model, toy_inputs = toy_model(), torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    model(toy_inputs).square().mean().backward()
    want = {name: p.grad for name, p in model.named_parameters()}
    for rank in two_ranks:
        assert rank["toy_wrapped"] == ["1.attention", "2.attention", "3.attention"]
        assert max_rel_err(rank["toy_grads"], want) <= 1e-6


def test_every_rank_sees_the_same_loss(two_ranks):
    assert two_ranks[0]["fp32_losses"] == two_ranks[1]["fp32_losses"]
    assert two_ranks[0]["bf16_losses"] == two_ranks[1]["bf16_losses"]


def test_bf16_sharded_run_matches_single_process_bf16_run(two_ranks, fp32_reference):
    sharded = single = two_ranks[0]  # rank 0 ran both
    # Both runs gather the same fp32 master weights to bf16 and reduce gradients in fp32; they differ only
    # in how the two scenes' gradients are summed (across ranks vs inside one backward) and in bf16
    # rounding of batch-1 vs batch-2 kernels: a few bf16 roundings (unit 2**-8) of the gradient, which
    # AdamW turns into parameter changes of at most a few lr per element. Bound: 2**-8 relative.
    assert sharded["bf16_losses"] == pytest.approx(single["bf16_single_losses"], rel=2**-8)
    assert params_rel_err(sharded["bf16_params"], single["bf16_single_params"]) <= 2**-8
    # bf16 is really in effect: the losses differ from fp32 ones, by no more than bf16 compute explains
    # through ~10 blocks (2**-4 relative).
    ref_losses = fp32_reference[0]
    assert sharded["bf16_losses"] != pytest.approx(ref_losses, rel=1e-6)
    assert sharded["bf16_losses"] == pytest.approx(ref_losses, rel=2**-4)


def test_each_parameter_lives_in_exactly_one_fsdp_unit(two_ranks):
    for rank in two_ranks:
        assert rank["owners"] == [1] * rank["num_params"]


def test_sharded_storage_per_rank_is_half(two_ranks):
    total = sum(p.numel() for p in tiny_model().parameters())
    local = [rank["local_numel"] for rank in two_ranks]
    assert sum(local) == total  # nothing replicated
    # Each parameter is split along dim 0; ranks differ by at most one row of each parameter.
    for numel in local:
        assert abs(numel - total / 2) <= two_ranks[0]["rows"]
    assert max(local) < 0.55 * total


def test_accelerate_takes_the_fsdp_path(two_ranks):
    for rank in two_ranks:
        assert rank["accelerate"] == {"is_fsdp2": True, "same_model": True,
                                      "distributed_type": "DistributedType.FSDP",
                                      "optimizer_holds_model_params": True}
        assert rank["clip_norm"] == pytest.approx(rank["manual_norm"], rel=1e-5)
        assert "pytorch_model_fsdp_0" in rank["state_files"] and "optimizer_0" in rank["state_files"]


LONE_PROCESS = """
import torch
from vggt_fsdp.model.vggt import VGGT
from vggt_fsdp.parallel import build_accelerator, prepare_model, prepare_optimizer
from vggt_fsdp.recipe import load_recipe, model_config
recipe = load_recipe("recipes/cpu_tiny.yaml", ["accelerate.num_processes=1"])
accelerator = build_accelerator(recipe)
model = VGGT(model_config(recipe.model))
plan = prepare_model(accelerator, model, recipe.parallel)
optimizer = torch.optim.AdamW(model.parameters())
model, optimizer = prepare_optimizer(accelerator, model, optimizer)
accelerator.backward(model(torch.rand(1, 2, 3, 28, 28))["depth"].mean())
optimizer.step()
print(accelerator.is_fsdp2, torch.distributed.get_world_size(), len(plan.units), type(model).__name__)
"""


def test_a_lone_process_is_bridged_to_fsdp_too():
    """Started without a launcher, Accelerate leaves a process undistributed; the bridge gives it a 1-rank
    group so the same FSDP2 code runs (e.g. one GPU, or `python -m vggt_fsdp.train` on a laptop)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    result = subprocess.run([sys.executable, "-c", LONE_PROCESS], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "1", "15", "FSDPVGGT"]


# ------------------------------------------------------------------------------------------- compile
@pytest.mark.slow  # test_compile covers it in CI: compiled blocks' gradients equal eager's, and the whole
# model compiles under FSDP2 over the sampler's shapes with its parameter names unchanged
def test_compiled_blocks_give_the_same_gradients_and_names(tmp_path, monkeypatch):
    """parallel.compile compiles each block's forward, inside its checkpoint wrapper and under FSDP2's hooks.
    Dynamo's "eager" backend traces exactly what inductor would compile, in seconds instead of minutes."""
    import torch.distributed as dist

    from vggt_fsdp.parallel import apply_parallelism, build_mesh
    from vggt_fsdp.parallel import compiling, sharding

    traced = []
    monkeypatch.setattr(sharding, "compile_blocks",
                        lambda model, paths: traced.extend(paths) or compiling.compile_blocks(model, paths, "eager"))
    recipe = load_recipe("recipes/cpu_tiny.yaml", ["parallel.precision.param_dtype=fp32", "accelerate.mixed_precision=no",
                                                   "parallel.checkpoint.policy=block"])
    images = torch.rand(1, 3, 3, 28, 28)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        results = []
        for compile_blocks in (False, True):
            recipe.parallel.compile = compile_blocks
            model = tiny_model()
            apply_parallelism(model, recipe.parallel, build_mesh(recipe.parallel.sharding, "cpu"))
            out = model(images)
            (out["depth"].mean() + out["world_points"].mean() + out["pose_enc"].square().mean()).backward()
            results.append({canonical_name(n): p.grad.full_tensor()
                            for n, p in model.named_parameters() if p.grad is not None})
    finally:
        dist.destroy_process_group()
    plain, compiled = results
    assert traced == [u.path for u in plan_parallelism(tiny_model(), recipe.parallel).units if u.kind == "block"]
    assert compiled.keys() == plain.keys() and len(plain) > 100
    for name, grad in plain.items():
        assert torch.allclose(compiled[name], grad, rtol=1e-6, atol=1e-7), name
