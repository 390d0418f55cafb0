"""Precision modes: every unit computes in the dtype `recipe show` says, in every mode the toolkit offers.

The modes are `param_dtype: fp32`, `bf16` with `autocast: true` (upstream's way) and `bf16` with
`autocast: false` (the MixedPrecisionPolicy alone). A user's model (own block, attention and head classes)
is sharded with an fp32 head; hooks record the dtypes each Linear sees, in forward and in the recompute of
a checkpointed block.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vggt_fsdp.memory.fake_pg import fake_process_group
from vggt_fsdp.model.config import get_preset
from vggt_fsdp.model.init import materialize
from vggt_fsdp.model.vggt import build_model
from vggt_fsdp.parallel import apply_parallelism, plan_parallelism
from vggt_fsdp.parallel.config import CheckpointConfig, LayoutConfig, ParallelConfig, PrecisionConfig
from vggt_fsdp.parallel.precision import accelerate_mixed_precision, describe

BF16, FP32 = torch.bfloat16, torch.float32
MODES = {  # name: (param_dtype, autocast)
    "fp32": ("fp32", False),
    "bf16 autocast": ("bf16", True),
    "bf16 no autocast": ("bf16", False),
}


# ------------------------------------------------------------------------------------ a user's model
class UserAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class UserBlock(nn.Module):
    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = UserAttention(dim, heads)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc(F.gelu(self.norm2(x)))


class UserHead(nn.Module):
    """A head the user lists in fp32_modules, with a block of its own (an fp32 block unit)."""

    def __init__(self, dim: int):
        super().__init__()
        self.block = UserBlock(dim)
        self.out = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(x))


class SelfCastingHead(nn.Module):
    """A head that declares it casts what it reads (as VGGT's heads do)."""

    casts_own_inputs = True

    def __init__(self, dim: int):
        super().__init__()
        self.out = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x[:, :1].to(self.out.weight.dtype))


class UserModel(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(UserBlock(dim) for _ in range(depth))
        self.head = UserHead(dim)
        self.cast_head = SelfCastingHead(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x), self.cast_head(x)


def user_parallel(param_dtype: str, autocast: bool, policy: str = "block") -> ParallelConfig:
    return ParallelConfig(
        layout=LayoutConfig(block_types=["UserBlock"], attention_types=["UserAttention"],
                            units=["head", "cast_head"], groups={}),
        precision=PrecisionConfig(param_dtype=param_dtype, fp32_modules=["head", "cast_head"], autocast=autocast),
        checkpoint=CheckpointConfig(policy=policy),
    )


def record_linears(model: nn.Module, prefixes: tuple[str, ...]) -> list[tuple[str, torch.dtype, torch.dtype, torch.dtype]]:
    """(module path, input dtype, weight dtype, output dtype) of every call of a Linear under `prefixes`."""
    calls = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and path.startswith(prefixes):
            def hook(mod, args, out, path=path):
                calls.append((path.replace("_checkpoint_wrapped_module.", ""), args[0].dtype, mod.weight.dtype,
                              out.dtype))
            module.register_forward_hook(hook)
    return calls


def run_user_model(param_dtype: str, autocast: bool):
    """Shard, forward and backward the user's model; return the Linear calls and the cast head's input."""
    torch.manual_seed(0)
    with fake_process_group(1):
        model = UserModel()
        plan = apply_parallelism(model, user_parallel(param_dtype, autocast))
        calls = record_linears(model, ("blocks.", "head.", "cast_head."))
        received = []
        model.cast_head.register_forward_pre_hook(lambda mod, args: received.append(args[0].dtype))
        out, cast_out = model(torch.randn(2, 5, 4))
        (out.float().sum() + cast_out.float().sum()).backward()  # backward recomputes the checkpointed blocks
    return plan, calls, received, (out.dtype, cast_out.dtype)


@pytest.mark.parametrize("mode", list(MODES))
def test_user_fp32_units_compute_in_fp32_in_every_mode(mode):
    param_dtype, autocast = MODES[mode]
    plan, calls, received, outputs = run_user_model(param_dtype, autocast)
    trunk = BF16 if param_dtype == "bf16" else FP32
    # What `recipe show` says is what runs.
    shown = {u.path: u.param_dtype for u in plan.units}
    assert shown["head"] == shown["head.block"] == shown["cast_head"] == "fp32"
    assert shown["blocks.0"] == param_dtype
    head_calls = [c for c in calls if c[0].startswith(("head.", "cast_head."))]
    trunk_calls = [c for c in calls if c[0].startswith("blocks.")]
    # Forward (3 Linears) plus the checkpointed block's recompute in backward (stopped early once the
    # tensors backward needs exist again): recompute in the fp32 block ran in fp32 too.
    assert len([c for c in head_calls if c[0].startswith("head.block.")]) > 3
    assert head_calls and all(c[1:] == (FP32, FP32, FP32) for c in head_calls), head_calls
    assert trunk_calls and all(c[1:] == (trunk, trunk, trunk) for c in trunk_calls), trunk_calls
    assert outputs == (FP32, FP32)
    # A module that casts its own inputs gets them as they come: the trunk's dtype, no fp32 copy.
    assert received == [trunk]


def test_fp32_head_under_bare_autocast_is_the_defect_this_guards_against():
    """Without the toolkit's guard a Linear with fp32 weights and fp32 input computes in bf16 under autocast."""
    linear = nn.Linear(4, 4)
    with torch.autocast("cpu", dtype=BF16):
        assert linear(torch.randn(2, 4)).dtype == BF16


# ------------------------------------------------------------------------------------ VGGT
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_vggt_heads_cast_what_they_read_and_compute_in_fp32(autocast):
    cfg = get_preset("vggt-tiny").replace(enable_track=False)
    torch.manual_seed(0)
    with fake_process_group(1):
        model = build_model(cfg, device="meta")
        apply_parallelism(model, ParallelConfig(precision=PrecisionConfig(autocast=autocast)))
        materialize(model, torch.device("cpu"))
        calls = record_linears(model, ("aggregator.frame_blocks.", "camera_head.", "depth_head."))
        seen = {}
        model.aggregator.register_forward_pre_hook(lambda mod, args: seen.update(images=args[0].dtype))
        model.depth_head.register_forward_pre_hook(lambda mod, args: seen.update(tokens=args[0][-1].dtype))
        out = model(torch.rand(1, 2, 3, 28, 42))
        sum(v.float().mean() for v in out.values() if torch.is_tensor(v) and v.requires_grad).backward()
    # The root keeps the fp32 images (the aggregator normalises them in fp32 and casts once).
    assert seen == {"images": FP32, "tokens": BF16}  # the heads get the bf16 layers: no fp32 copies
    for path, x, w, y in calls:
        expected = BF16 if path.startswith("aggregator.") else FP32
        assert (x, w, y) == (expected, expected, expected), path
    assert {out[k].dtype for k in ("pose_enc", "depth", "world_points")} == {FP32}


def test_vggt_loss_is_the_same_with_and_without_cpu_autocast():
    """On the CPU, bf16 autocast changes no op of VGGT's bf16 trunk (its LayerNorm is not on the CPU
    fp32 list; weights are already bf16), so both modes give bitwise the same forward. On CUDA they
    differ: autocast runs LayerNorm in fp32 (see benchmarks/precision_curves.py for the effect)."""
    cfg = get_preset("vggt-tiny").replace(enable_track=False)
    losses = []
    for autocast in (True, False):
        torch.manual_seed(0)
        with fake_process_group(1):
            model = build_model(cfg, device="meta")
            apply_parallelism(model, ParallelConfig(precision=PrecisionConfig(autocast=autocast)))
            materialize(model, torch.device("cpu"))
            torch.manual_seed(1)
            out = model(torch.rand(1, 2, 3, 28, 28))
            losses.append(sum(v.float().mean() for v in out.values() if torch.is_tensor(v) and v.requires_grad))
    assert losses[0].item() == losses[1].item()


def test_planner_reads_the_heads_casting_contract():
    from vggt_fsdp.memory import planner

    cfg = get_preset("vggt-tiny").replace(enable_track=False)
    units = planner.unit_layout(cfg, ParallelConfig())
    by_path = {u.path: u for u in units}
    assert not by_path["depth_head"].casts_inputs and not by_path["camera_head"].casts_inputs
    assert not by_path[""].casts_inputs  # the VGGT root keeps fp32 images and query points
    assert by_path["aggregator.frame_blocks.0"].casts_inputs
    assert planner._head_input_mode(units) == "chunk"


# ------------------------------------------------------------------------------------ kernels and config
@pytest.mark.parametrize("dim", [1024, 4096])
def test_bf16_layernorm_keeps_fp32_statistics_inside_the_kernel(dim):
    """bf16 in, bf16 out, and the output is the exact result rounded to bf16: the kernel accumulates the
    mean and variance in fp32 (statistics in bf16 would be wrong in most elements for inputs offset from
    zero). The CPU kernel hands the saved mean/rstd for backward back in bf16; CUDA's in fp32."""
    torch.manual_seed(0)
    x = (torch.randn(64, dim) + 8.0).to(BF16)
    weight, bias = (torch.rand(dim) + 0.5).to(BF16), torch.randn(dim).to(BF16)
    exact = F.layer_norm(x.double(), (dim,), weight.double(), bias.double())
    out = F.layer_norm(x, (dim,), weight, bias)
    assert out.dtype == BF16
    assert (out == exact.to(BF16)).float().mean() > 0.999
    mean = x.double().mean(-1, keepdim=True).to(BF16).double()  # what bf16 statistics would give
    var = (x.double() - mean).pow(2).mean(-1, keepdim=True).to(BF16).double()
    bf16_stats = ((x.double() - mean) / (var + 1e-5).sqrt() * weight.double() + bias.double()).to(BF16)
    assert (bf16_stats == exact.to(BF16)).float().mean() < 0.5
    _, saved_mean, saved_rstd = torch.ops.aten.native_layer_norm(x, [dim], weight, bias, 1e-5)
    assert saved_mean.dtype == saved_rstd.dtype == BF16


@pytest.mark.parametrize("param_dtype,autocast,expected", [
    ("bf16", True, "bf16"), ("bf16", False, "no"), ("fp32", True, "no"), ("fp32", False, "no")])
def test_accelerate_mixed_precision_follows_autocast(param_dtype, autocast, expected):
    cfg = PrecisionConfig(param_dtype=param_dtype, autocast=autocast)
    assert accelerate_mixed_precision(cfg) == expected
    assert ("autocast around" in describe(cfg)) == (expected == "bf16")


def test_recipe_with_autocast_off_needs_accelerate_mixed_precision_no():
    from vggt_fsdp.recipe import load_recipe

    recipe = load_recipe("recipes/cpu_tiny.yaml", ["parallel.precision.autocast=false",
                                                   "accelerate.mixed_precision=no"])
    assert recipe.parallel.precision.autocast is False
    with pytest.raises(ValueError, match=r"accelerate.mixed_precision='bf16'.*autocast=False.*set it to 'no'"):
        load_recipe("recipes/cpu_tiny.yaml", ["parallel.precision.autocast=false", "accelerate.mixed_precision=bf16"])


def test_plan_is_independent_of_autocast():
    """Which unit computes in which dtype does not depend on autocast: only how it gets there."""
    model = build_model(get_preset("vggt-tiny").replace(enable_track=False), device="meta")
    plans = [plan_parallelism(model, ParallelConfig(precision=PrecisionConfig(autocast=a))) for a in (True, False)]
    assert plans[0] == plans[1]


# ------------------------------------------------------------------------------------ the planner
BLOCK_CASES = [(qk, rope, ls, policy) for qk in (True, False) for rope in (True, False) for ls in (True, False)
               for policy in ("none", "attention")]


@pytest.mark.parametrize("qk_norm,rope,layerscale,policy", BLOCK_CASES)
def test_block_formula_under_cuda_autocast_matches_saved_bytes(qk_norm, rope, layerscale, policy):
    """Under CUDA autocast (its fp32 LayerNorm rule applied on the CPU) a bf16 block saves exactly what
    `Kernels("cuda", autocast=True)` predicts: fp32 copies of each LayerNorm's input, weight and bias."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    from vggt_fsdp.memory import formulas as F
    from vggt_fsdp.memory.accounting import count_saved_bytes
    from vggt_fsdp.memory.cuda_autocast import cuda_autocast_rules
    from vggt_fsdp.model.layers import Block, RotaryPositionEmbedding2D, patch_positions

    dim, heads, batch = 64, 4, 3
    positions = patch_positions(3, 4, 5, "cpu")
    seq = positions.shape[1]
    block = Block(dim, heads, init_values=0.5 if layerscale else None, qk_norm=qk_norm,
                  rope=RotaryPositionEmbedding2D() if rope else None).to(BF16)
    if policy == "attention":
        block.attn = checkpoint_wrapper(block.attn, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    tables = RotaryPositionEmbedding2D().tables(positions, dim // heads // 2) if rope else None
    x = torch.randn(batch, seq, dim, dtype=BF16, requires_grad=True)
    with cuda_autocast_rules(), torch.autocast("cpu", dtype=BF16):
        report, _ = count_saved_bytes(lambda: block(x, pos=tables))
    shape = F.BlockShape(batch, seq, dim, heads, 2, qk_norm, seq if rope else 0, layerscale)
    kernels = F.Kernels("cuda", autocast=True)
    expected = F.block_saved(shape, kernels, policy)
    if rope and policy == "none":
        expected += F.rope_tables_saved(shape, kernels)
    assert report.total_bytes == expected
    if policy == "none":  # the fp32 copies are real: the no-autocast formula is short of the measurement
        assert F.block_saved(shape, F.Kernels("cuda"), policy) < expected


def test_bf16_blocks_each_save_their_own_rope_tables():
    """RoPE casts the fp32 tables to a bf16 q's dtype in every block: two blocks save two copies."""
    from vggt_fsdp.memory import formulas as F
    from vggt_fsdp.memory.accounting import count_saved_bytes
    from vggt_fsdp.model.layers import Block, RotaryPositionEmbedding2D, patch_positions

    dim, heads, rope = 64, 4, RotaryPositionEmbedding2D()
    positions = patch_positions(3, 4, 5, "cpu")
    seq = positions.shape[1]
    blocks = nn.Sequential(*(Block(dim, heads, qk_norm=True, rope=rope) for _ in range(2))).to(BF16)
    tables = rope.tables(positions, dim // heads // 2)
    x = torch.randn(2, seq, dim, dtype=BF16, requires_grad=True)
    report, _ = count_saved_bytes(lambda: blocks[1](blocks[0](x, pos=tables), pos=tables))
    shape = F.BlockShape(2, seq, dim, heads, 2, True, seq, False)
    kernels = F.Kernels("cpu")
    assert not F.rope_tables_shared(shape, kernels)
    assert report.total_bytes == 2 * (F.block_saved(shape, kernels, "none") + F.rope_tables_saved(shape, kernels))


def test_planner_follows_autocast_for_the_whole_model():
    """The planned activations of VGGT-tiny on CUDA with autocast equal the saved bytes of a real sharded
    step under CUDA's autocast rules (on the CPU), group by group; the no-autocast plan is short of them."""
    from vggt_fsdp.memory import planner
    from vggt_fsdp.memory.accounting import SavedTensorCounter
    from vggt_fsdp.memory.cuda_autocast import cuda_autocast_rules
    from vggt_fsdp.memory.measure import block_groups

    cfg = get_preset("vggt-tiny").replace(enable_track=False)
    torch.manual_seed(0)
    with fake_process_group(2):
        model = build_model(cfg, device="meta")
        apply_parallelism(model, ParallelConfig(checkpoint=CheckpointConfig(policy="none")))
        materialize(model, torch.device("cpu"))
        counter = SavedTensorCounter(block_groups(model))
        with cuda_autocast_rules(), counter:
            model(torch.rand(1, 2, 3, 28, 42))
    measured = counter.report
    plans = {autocast: planner.plan(cfg, ParallelConfig(checkpoint=CheckpointConfig(policy="none"),
                                                        precision=PrecisionConfig(autocast=autocast)),
                                    2, 2, (28, 42), "cuda", frames_range=(2, 2))
             for autocast in (True, False)}
    for group in ("dino", "frame", "global"):
        assert plans[True].total("activation", group) == measured.by_group[group], group
        assert plans[False].total("activation", group) < measured.by_group[group], group
    assert abs(plans[True].total("activation") - measured.total_bytes) <= 0.005 * measured.total_bytes


class MixingHead(nn.Module):
    """Mixes an fp32 embedding into its input and relies on autocast at its Linear (as VGGT's tracker)."""

    needs_autocast = True

    def __init__(self, dim: int):
        super().__init__()
        self.out = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + torch.linspace(0, 1, x.shape[-1], device=x.device))  # promotes to fp32


class MixingModel(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList(UserBlock(dim) for _ in range(2))
        self.head = MixingHead(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_a_module_that_needs_autocast_gets_it_in_both_bf16_modes(autocast):
    parallel = ParallelConfig(
        layout=LayoutConfig(block_types=["UserBlock"], attention_types=["UserAttention"], units=["head"], groups={}),
        precision=PrecisionConfig(fp32_modules=[], autocast=autocast), checkpoint=CheckpointConfig(policy="none"))
    with fake_process_group(1):
        model = MixingModel()
        apply_parallelism(model, parallel)
        calls = record_linears(model, ("head.",))
        model(torch.randn(2, 5, 16)).float().sum().backward()
    assert calls == [("head.out", FP32, BF16, BF16)]  # fp32 input, bf16 weights: autocast made it work
