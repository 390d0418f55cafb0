"""`parallel.compile`: compiled blocks that hold in real training (parallel/compiling.py).

- pytorch#166926 on the CPU: inductor's padding forced on, a batch of two scenes, a frame and a global
  block in non-reentrant checkpoint wrappers sharing one dynamo cache. Compiled inside the wrappers (how
  the H200 run failed at 48 frames) backward fails `assert_size_stride` (slow test); compiled around them
  (compile_blocks) the same step holds and matches eager.
- Selective checkpointing under inductor, at the trainer's settings (dynamic block inputs, bf16
  autocast): gradients equal eager within bf16 tolerance, a new shape compiles nothing, and the bytes
  kept for backward are those of eager selective checkpointing.
- Every shape the sampler draws: the tiny VGGT under FSDP2 with a policy per group, over sampler-drawn
  steps and a validation step, compiles a bounded, reported number of graphs (dynamo's own decisions:
  the "eager" backend is enough and takes seconds).
Inductor on 2 shared cores is slow: the inductor tests use 2 blocks of width 16.
"""
from __future__ import annotations

import pytest
import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
from torch import nn

from vggt_fsdp.memory.accounting import count_saved_bytes
from vggt_fsdp.model.layers import Block, RotaryPositionEmbedding2D, patch_positions
from vggt_fsdp.parallel import compiling
from vggt_fsdp.parallel.checkpointing import canonical_name, wrap_modules

DIM, HEADS = 16, 2
# Pads every stride above 8 elements to a multiple of 8 (32 B of fp32): the tiny blocks' 11-token
# sequences get padded like VGGT-1B's 1,374-token ones on a GPU.
FORCED_PADDING = dict(disable_padding_cpu=False, comprehensive_padding=True, padding_stride_threshold=8,
                      padding_alignment_bytes=32)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts with empty dynamo caches: which graph a call hits is what is being tested."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _two_blocks(save: tuple[str, ...] | None) -> tuple[nn.ModuleList, RotaryPositionEmbedding2D]:
    """A frame block and a global block (one class: one dynamo cache), each in a checkpoint wrapper."""
    torch.manual_seed(0)
    rope = RotaryPositionEmbedding2D()
    blocks = nn.ModuleList([Block(DIM, HEADS, init_values=0.1, qk_norm=True, rope=rope) for _ in range(2)])
    wrap_modules(blocks, ["0", "1"], {"0": save, "1": save} if save else {})
    return blocks, rope


def _step(blocks, rope, scenes: int, frames: int, grid: tuple[int, int], dtype=None):
    """Frame attention over (scenes x frames) sequences of one frame, then global attention over scenes
    sequences of all frames, as the aggregator alternates them. Returns the bytes saved for backward,
    the bytes of the RoPE tables, the output and the gradients."""
    positions = patch_positions(*grid, 5, "cpu")
    tokens = positions.shape[1]
    half = DIM // HEADS // 2
    tables = [rope.tables(positions, half, tokens), rope.tables(positions.repeat(1, frames, 1), half, tokens)]
    x = torch.randn(scenes * frames, tokens, DIM, generator=torch.Generator().manual_seed(scenes * 10 + frames),
                    requires_grad=True)

    def forward():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            y = blocks[0](x, pos=tables[0])
            return blocks[1](y.reshape(scenes, frames * tokens, DIM), pos=tables[1])

    report, out = count_saved_bytes(forward)
    out.float().square().mean().backward()
    grads = {canonical_name(n): p.grad for n, p in blocks.named_parameters()} | {"input": x.grad}
    return report.total_bytes, sum(t.nbytes for ts in tables for t in ts), out.detach(), grads


def _max_rel_err(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(((got[k].double() - want[k].double()).norm() / want[k].double().norm()).item() for k in want)


def _rel_err(got: dict, want: dict) -> float:
    """Of all gradients as one vector (a tensor whose gradient is near zero holds only rounding noise)."""
    flat = {name: torch.cat([g[k].double().flatten() for k in sorted(want)]) for name, g in (("got", got), ("want", want))}
    return ((flat["got"] - flat["want"]).norm() / flat["want"].norm()).item()


# ----------------------------------------------------------------------------------- pytorch#166926
def test_blocks_compiled_around_their_wrappers_hold_where_inside_failed():
    """The failing step of the H200 run (automatic dynamic: a static, padded graph for the frame block,
    then a dynamic one for the global block), compiled as compile_blocks does: backward holds and equals
    eager."""
    eager, rope = _two_blocks(None)
    *_, want = _step(eager, rope, scenes=2, frames=2, grid=(2, 3))
    blocks, rope = _two_blocks(None)
    compiling.compile_blocks(blocks, ["0", "1"], dynamic=None)
    before, padded = len(compiling.compiled_graphs()), torch._inductor.metrics.num_comprehensive_padding
    # No cached compile: the padding counter below counts only what inductor lowers in this test.
    with inductor_config.patch(FORCED_PADDING | {"fx_graph_cache": False}), \
            functorch_config.patch(enable_autograd_cache=False):
        *_, got = _step(blocks, rope, scenes=2, frames=2, grid=(2, 3))
    graphs = compiling.compiled_graphs()[before:]
    assert [g.path for g in graphs] == ["0", "1"]  # the frame block's static graph, the global block's dynamic one
    assert graphs[0].input_shapes[0] == (4, 11, DIM) and not all(isinstance(d, int) for d in graphs[1].input_shapes[0])
    assert torch._inductor.metrics.num_comprehensive_padding > padded  # padding was really on
    assert _max_rel_err(got, want) < 1e-4


@pytest.mark.slow  # the negative control of the test above (which covers the behaviour): minutes of inductor
def test_blocks_compiled_inside_their_wrappers_fail_the_stride_assertion():
    blocks, rope = _two_blocks(None)
    for block in blocks:  # what compiling.py did before: the wrapped block's own forward
        inner = block._checkpoint_wrapped_module
        inner.forward = torch.compile(inner.forward)
    with inductor_config.patch(FORCED_PADDING), pytest.raises(AssertionError, match="stride"):
        _step(blocks, rope, scenes=2, frames=2, grid=(2, 3))


# ----------------------------------------------------------------------------------- selective + inductor
def test_compiled_selective_blocks_match_eager_and_keep_what_eager_keeps():
    """The trainer's settings: dynamic inputs, bf16 autocast, selective(sdpa+qkv), padding forced. Compiled
    gradients are within bf16 tolerance of eager (no farther from eager bf16 than twice eager bf16 is
    from fp32); the second step (another frame count and aspect) compiles no graph; backward keeps what
    eager selective checkpointing keeps, plus the RoPE tables, which the graph saves as inputs (eager
    holds them in the checkpoint's closure, beside saved tensors)."""
    eager, rope = _two_blocks(("sdpa", "qkv"))
    blocks, rope_c = _two_blocks(("sdpa", "qkv"))
    compiling.compile_blocks(blocks, ["0", "1"])
    start = len(compiling.compiled_graphs())
    with inductor_config.patch(FORCED_PADDING):
        for scenes, frames, grid in [(2, 2, (2, 3)), (2, 3, (3, 2))]:
            *_, fp32 = _step(eager, rope, scenes, frames, grid)
            for module in eager:
                module.zero_grad(set_to_none=True)
            saved, tables, out, want = _step(eager, rope, scenes, frames, grid, torch.bfloat16)
            saved_c, _, out_c, got = _step(blocks, rope_c, scenes, frames, grid, torch.bfloat16)
            assert _rel_err(got, want) <= 2 * _rel_err(want, fp32)
            assert ((out_c.float() - out.float()).norm() / out.float().norm()).item() < 1e-2
            assert saved_c == saved + tables, (saved_c, saved, tables)
            for module in [*eager, *blocks]:
                module.zero_grad(set_to_none=True)
    # One dynamic graph, compiled for the frame block's first call, serves the global block and both
    # shapes.
    assert [g.path for g in compiling.compiled_graphs()[start:]] == ["0"]


# ----------------------------------------------------------------------------------- sampler shapes
def _steps_by_frames(sampler, frames_range) -> dict[int, list]:
    """The sampler's first steps, by the frame count each draws."""
    found: dict[int, list] = {}
    for step in range(200):
        shape = sampler.shape_at(step)
        found.setdefault(shape.num_frames, []).append(shape)
    assert set(found) == set(range(frames_range[0], frames_range[1] + 1))
    return found


# Without autocast the blocks trace bf16 inputs instead of autocast's casts: other graphs, which only
# this case compiles (45 s on a quiet 2-core machine, about 340 s on a loaded one).
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_sampler_shapes_compile_a_bounded_reported_set_of_graphs(tmp_path, capfd, monkeypatch, autocast):
    """The tiny VGGT under FSDP2 (1 rank), a policy per group (none, attention, selective, block: both
    compiled code paths), bf16 with and without autocast (`parallel.precision.autocast=false`, the mode
    a GPU run may choose). After one step of each specialisation (one frame: the camera trunk's sequence
    is 1; all frames: one scene; in between) and a validation step, more sampler-drawn shapes compile
    nothing."""
    import torch.distributed as dist

    from vggt_fsdp.data.sampler import DynamicBatchSampler
    from vggt_fsdp.model.vggt import VGGT
    from vggt_fsdp.parallel import apply_parallelism, build_mesh, sharding
    from vggt_fsdp.recipe import load_recipe, model_config

    monkeypatch.setattr(sharding, "compile_blocks",
                        lambda model, paths: compiling.compile_blocks(model, paths, "eager"))
    recipe = load_recipe("recipes/cpu_tiny.yaml", [
        "parallel.compile=true", "data.image_width=56", "data.frames_range=[1, 6]", "data.frames_per_gpu=6",
        "parallel.checkpoint.policy=selective", "parallel.checkpoint.groups.dino.policy=none",
        "parallel.checkpoint.groups.frame.policy=attention", "parallel.checkpoint.groups.camera_trunk.policy=block",
        *([] if autocast else ["parallel.precision.autocast=false", "accelerate.mixed_precision=no"])])
    assert recipe.parallel.precision.autocast is autocast
    sampler = DynamicBatchSampler(10, recipe.data, recipe.data.frames_per_gpu, 0, 1)
    by_frames = _steps_by_frames(sampler, recipe.data.frames_range)
    warm_up = [by_frames[1][0], by_frames[6][0], by_frames[2][0]]
    later = [by_frames[3][0], by_frames[5][0], by_frames[4][0]]  # frame counts not seen before

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = VGGT(model_config(recipe.model))
        apply_parallelism(model, recipe.parallel, build_mesh(recipe.parallel.sharding, "cpu"))
        start = len(compiling.compiled_graphs())

        def run(shapes):
            for shape in shapes:
                images = torch.rand(shape.scenes_per_rank, shape.num_frames, 3, *shape.image_hw)
                out = model(images)
                sum(v.float().mean() for v in out.values() if torch.is_tensor(v) and v.requires_grad).backward()
                with torch.no_grad():  # validation
                    model(images)
            return len(compiling.compiled_graphs()) - start

        warm = run(warm_up)
        assert [(s.scenes_per_rank, s.num_frames) for s in warm_up + later] == [(6, 1), (1, 6), (3, 2), (2, 3),
                                                                                (1, 5), (1, 4)]
        assert run(later) == warm
    finally:
        dist.destroy_process_group()
    kinds = compiling.block_kinds(model, [p for p, m in model.named_modules() if type(m).__name__.endswith(
        ("FSDPBlock", "FSDPCheckpointWrapper"))])
    assert kinds == 4  # DINO (none), frame (attention), global (selective), camera trunk (block, fp32)
    assert warm <= compiling.GRAPHS_PER_KIND * kinds
    log = capfd.readouterr().err
    assert log.count("[vggt-fsdp] compile: block graph") == warm
    assert "for aggregator.global_blocks.0" in log and "for camera_head.trunk.0" in log
    # Compiling changes no parameter name (checkpoints, exports and clipping groups read them).
    plain = [name for name, _ in VGGT(model_config(recipe.model)).named_parameters()]
    assert [canonical_name(name) for name, _ in model.named_parameters()] == plain
