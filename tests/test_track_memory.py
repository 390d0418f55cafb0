"""The track head's memory (issue 13): the formulas of memory/track_formulas.py against exact saved-tensor
counts on the CPU, part by part, under the CPU's autocast rules and under CUDA's (emulated on the CPU), and
the planner's track terms against a measured training step.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from benchmarks.track_memory import TrackShape, build_head, count_parts, cuda_grid_sample_rule
from vggt_fsdp.memory import planner
from vggt_fsdp.memory import track_formulas as TF
from vggt_fsdp.memory.cuda_autocast import cuda_autocast_rules
from vggt_fsdp.memory.formulas import Kernels
from vggt_fsdp.memory.measure import measure_step
from vggt_fsdp.model.config import get_preset
from vggt_fsdp.parallel.config import CheckpointConfig, ParallelConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TOL = 0.02
GiB = 2**30


def _close(predicted: int, measured: int) -> bool:
    return abs(predicted - measured) <= TOL * max(measured, 1)


def _formula_shape(preset: str, shape: TrackShape) -> TF.TrackShape:
    cfg = get_preset(preset)
    b = planner.Batch(shape.scenes, shape.frames, shape.height, shape.width, cfg.aggregator.patch_size,
                      shape.points)
    return TF.TrackShape(**{**planner.track_shape(cfg, b).__dict__, "iters": shape.iters})


@contextlib.contextmanager
def _cuda_rules():
    with cuda_autocast_rules(), cuda_grid_sample_rule():
        yield


# (preset, chunk recompute, shape: scenes, frames, height, width, points, iterations)
CASES = [
    ("vggt-tiny", False, TrackShape(1, 3, 42, 56, 5, 1)),
    ("vggt-tiny", True, TrackShape(2, 3, 56, 70, 7, 2)),
    ("vggt-mid", False, TrackShape(2, 3, 42, 56, 7, 2)),
    ("vggt-mid", True, TrackShape(1, 4, 42, 42, 9, 3)),
]


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
@pytest.mark.parametrize("preset,chunks,shape", CASES, ids=lambda v: str(v) if not isinstance(v, TrackShape) else
                         f"{v.scenes}x{v.frames}-{v.height}x{v.width}-N{v.points}-I{v.iters}")
def test_formulas_match_saved_tensor_counts(preset, chunks, shape, kind):
    """Feature extractor and tracker (correlation lookups, update transformer and the rest) within 2% of
    the counted bytes; "cuda" counts on the CPU under CUDA's autocast rules (fp32 norms, grid_sample in
    its inputs' dtype)."""
    cfg = get_preset(preset)
    head = build_head(cfg, chunks)
    with _cuda_rules() if kind == "cuda" else contextlib.nullcontext():
        parts = count_parts(head, cfg, shape)
    s, k = _formula_shape(preset, shape), Kernels(kind, autocast=True)
    assert parts["features"] > 0 or chunks
    assert _close(TF.features_saved(s, k, chunks), parts["features"]), (TF.features_saved(s, k, chunks), parts)
    tracker = parts["tracker"] + parts["corr"] + parts["updateformer"]
    assert _close(TF.tracker_saved(s, k, chunks), tracker), (TF.tracker_saved(s, k, chunks), parts)
    assert parts["other"] == 0


def test_recompute_keeps_the_tracker_small_and_the_feature_extractor_nothing():
    cfg = get_preset("vggt-mid")
    shape = TrackShape(1, 4, 42, 42, 9, 2)
    plain, chunked = (count_parts(build_head(cfg, on), cfg, shape) for on in (False, True))
    assert chunked["features"] == 0 and chunked["updateformer"] == 0
    assert chunked["total"] < plain["total"] / 10


# ------------------------------------------------------------------------------------ where the memory is
def _vggt_1b(points: int, chunks: bool, kind: str = "cuda") -> dict[str, int]:
    cfg = get_preset("vggt-1b")
    s = planner.track_shape(cfg, planner.Batch(1, 24, 518, 518, 14, points))
    k = Kernels(kind, autocast=True)
    return {"features": TF.features_saved(s, k, chunks), "once": TF.tracker_once_saved(s, k, chunks),
            "corr": s.iters * TF.corr_saved(s, k), "update": s.iters * TF.update_saved(s, k),
            "tracker": TF.tracker_saved(s, k, chunks)}


def test_without_recompute_the_correlations_and_the_update_transformer_dominate():
    """VGGT-1B, 24 frames of 518 x 518: at upstream's 512 tracks the correlation windows' volumes and the
    update transformer's activations are most of the head; with chunk recompute it keeps under 2 GiB."""
    plain = _vggt_1b(512, chunks=False)
    assert plain["corr"] + plain["update"] > 0.75 * (plain["features"] + plain["tracker"])
    assert plain["features"] + plain["tracker"] > 20 * GiB
    assert _vggt_1b(512, chunks=True)["tracker"] < 2 * GiB
    # Both dominant terms grow with the points; the feature extractor does not.
    few = _vggt_1b(64, chunks=False)
    assert few["features"] == plain["features"] and few["corr"] < plain["corr"] / 2


# ------------------------------------------------------------------------------------ the planner
# (preset, world size, heads policy, scenes, frames per scene, image, points)
PLAN_CASES = [
    ("vggt-tiny", 2, "none", 2, 3, (42, 56), 5),
    # Minutes on 2 cores; the head-level cases above check vggt-mid's terms, the tiny case the planner's.
    pytest.param("vggt-mid", 1, "chunks", 1, 3, (42, 70), 7, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("preset,world,heads,scenes,frames,image,points", PLAN_CASES)
def test_planner_track_terms_match_a_measured_step(preset, world, heads, scenes, frames, image, points):
    """A training step of the model with only the track head (FSDP2, fake process group, the recipe
    default precision): the bytes the track head saves, the kept layers it reads included, within 2% of
    the planner's track terms and kept layers."""
    cfg = get_preset(preset).replace(enable_camera=False, enable_depth=False, enable_point=False)
    pc = ParallelConfig(checkpoint=CheckpointConfig(policy="block", heads=heads))
    measured = measure_step(cfg, pc, world, scenes, frames, image, "cpu", track_points=points)
    predicted = planner.plan(cfg, pc, world, scenes * frames, image, "cpu", frames_range=(frames, frames),
                             track_points=points)
    track = predicted.total("activation", "track") + predicted.term("kept layer outputs (as the heads hold them)").bytes
    assert _close(track, measured.saved.by_group["track"]), (track, measured.saved.by_group["track"])


def test_planner_needs_the_points_and_grows_with_them():
    cfg, pc = get_preset("vggt-1b"), ParallelConfig(checkpoint=CheckpointConfig(policy="block", heads="none"))
    with pytest.raises(ValueError, match="track_points"):
        planner.plan(cfg, pc, 8, 8, (518, 518))
    peaks = [planner.plan(cfg, pc, 8, 8, (518, 518), track_points=n).peak_bytes for n in (64, 512)]
    assert peaks[0] < peaks[1]


@pytest.mark.parametrize("recipe,memory,frames", [("a100_40g_track.yaml", 39.59, 24),
                                                  ("a100_80g_track.yaml", 79.15, 48)])
def test_track_recipes_fit_their_card(recipe, memory, frames, capsys):
    from vggt_fsdp.cli import main

    assert main(["plan", str(RECIPES / recipe), "--gpu-memory", str(memory), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["plan"]["frames_per_gpu"] == frames
    assert any(t["name"] == "track head tracker" and t["bytes"] > 0 for t in data["plan"]["terms"])
    # frames_per_gpu: auto resolves to at least the recipe's frames on its card.
    assert planner.resolve_frames_per_gpu(_load(recipe, "data.frames_per_gpu=auto"), int(memory * GiB)) >= frames


def _load(name: str, *overrides: str):
    from vggt_fsdp.recipe import load_recipe

    return load_recipe(RECIPES / name, list(overrides))


@pytest.mark.parametrize("preset", ["vggt-tiny", "vggt-mid"])
def test_forward_flops_match_the_flop_counter(preset):
    """The head's forward FLOPs by kind (what chunk recompute runs again, for the step-time model) equal
    torch's FlopCounterMode on the head (fp32, SDPA as its math matmuls)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.track_memory import head_inputs

    cfg = get_preset(preset)
    shape = TrackShape(2, 3, 42, 56, 7, 2)
    layers, images, queries = head_inputs(cfg, shape)
    layers = [t.float() if t is not None else None for t in layers]
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        build_head(cfg, False).float()(layers, images, 5, query_points=queries, iters=shape.iters)
    s = _formula_shape(preset, shape)
    counted = counter.get_flop_counts()["Global"]
    predicted = TF.forward_flops(s)
    assert sum(predicted.values()) == counter.get_total_flops()
    assert predicted["convolution"] == counted[torch.ops.aten.convolution]
    assert TF.recompute_flops(s, checkpointed=False) == {}
    assert sum(TF.recompute_flops(s, checkpointed=True).values()) < sum(predicted.values())
