"""The benchmark machinery: FLOP counting, peak table and MFU, the communication model, one measured
configuration on the CPU, the comparison's subprocess runner and the report's verdicts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import bench_step, comm_model, compare_recipes, flops, report

REPO = Path(__file__).resolve().parents[1]
CPU_RECIPE = str(REPO / "recipes" / "cpu_tiny.yaml")


# --------------------------------------------------------------------------------------- FLOPs
def test_quadratic_extrapolation_is_exact_for_quadratics():
    poly = lambda s: 7 + 11 * s + 13 * s * s  # noqa: E731
    counts = {s: poly(s) for s in flops.SAMPLE_FRAMES}
    for frames in (1, 4, 24, 48):
        assert flops.quadratic_in_frames(counts, frames) == poly(frames)


def test_flop_count_extrapolated_from_small_scenes_equals_direct_count():
    """FLOPs(B, S) = B (a + b S + c S^2) for VGGT: the count from 1, 2, 3 frames equals a direct one."""
    from vggt_fsdp.model import build_model, get_preset

    cfg = get_preset("vggt-tiny").replace(enable_track=False)
    model = build_model(cfg, "cpu")
    images = lambda b, s: torch.rand(b, s, 3, 56, 56)  # noqa: E731
    counted = flops.count_step_flops(model, images, scenes=2, frames_per_scene=5)
    with flops._countable_attention(torch.device("cpu")):
        direct = flops._count(model, (images(2, 5),), flops.surrogate_loss)
    assert (counted.forward, counted.backward) == direct
    # Attention is counted on the CPU too (math backend): more than the linear layers alone.
    assert counted.backward > counted.forward > 0


def test_fused_attention_backward_correction_leaves_twice_the_forward():
    """torch's FLOP formula for the fused SDPA backward includes recomputing q k^T; removing a fifth of it
    (what `_count` does on CUDA) leaves the math path's 2x forward, for VGGT's attention shapes."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    for shape in ((2, 16, 1374, 64), (1, 16, 24 * 1374, 64)):  # frame and global attention of VGGT-1B
        backward = sdpa_backward_flop_count(shape, shape, shape, shape)
        assert backward - backward // 5 == 2 * sdpa_flop_count(shape, shape, shape)
    assert torch.ops.aten._scaled_dot_product_flash_attention_backward in flops._fused_attention_backward_ops()


def test_peak_table_and_mfu():
    assert flops.peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.peak_tflops("NVIDIA H200") == 989.0
    assert flops.peak_tflops("Tesla T4") is None
    assert flops.mfu(989e12 * 0.5, 1.0, 989.0) == pytest.approx(0.5)
    assert flops.mfu(1e12, 1.0, None) is None


# --------------------------------------------------------------------------------------- comm model
def _unit(numel, trainable=None, pbytes=2, rbytes=4, reshard=True, name="u"):
    return comm_model.UnitVolume(name, numel, numel if trainable is None else trainable, pbytes, rbytes, reshard)


def test_comm_volumes_and_ring_bytes():
    units = [_unit(1_000_000), _unit(500_000, trainable=0, pbytes=4, reshard=False)]
    assert units[0].all_gather_bytes == 2 * 1_000_000 * 2  # forward + backward re-gather, bf16
    assert units[1].all_gather_bytes == 500_000 * 4  # fp32 unit, gathered once
    assert units[1].reduce_bytes_total == 0  # frozen: nothing to reduce
    one = comm_model.predict(units, 1, comm_model.A100_CLUSTER)
    assert one.comm_s == 0 and one.all_gather_gb == 0
    eight = comm_model.predict(units, 8, comm_model.A100_CLUSTER)
    assert eight.all_gather_gb * 1e9 == pytest.approx(7 / 8 * (4_000_000 + 2_000_000))
    assert eight.reduce_gb * 1e9 == pytest.approx(7 / 8 * 4_000_000)
    # Across nodes the ring is slower than inside one: more time for (almost) the same bytes.
    sixty_four = comm_model.predict(units, 64, comm_model.A100_CLUSTER)
    assert sixty_four.comm_s > eight.comm_s
    # Hybrid: in-node all-gathers as on 8 GPUs, plus an all-reduce of each GPU's gradient shard.
    hybrid = comm_model.predict(units, 64, comm_model.A100_CLUSTER, "hybrid")
    assert hybrid.all_gather_gb == pytest.approx(eight.all_gather_gb)
    assert hybrid.reduce_gb > eight.reduce_gb
    with pytest.raises(ValueError, match="sharding must be"):
        comm_model.predict(units, 8, comm_model.A100_CLUSTER, "ddp")


def test_overlap_hides_communication_behind_longer_compute():
    units = [_unit(50_000_000, name=f"b{i}") for i in range(10)]
    fast = comm_model.predict(units, 64, comm_model.A100_CLUSTER, compute_s=100.0, frames_per_gpu=24)
    assert fast.step_s == pytest.approx(100.0 + fast.exposed_s)
    assert fast.exposed_s < fast.comm_s  # only the ends are exposed
    assert fast.frames_per_s_total == pytest.approx(64 * 24 / fast.step_s)
    slow = comm_model.predict(units, 64, comm_model.A100_CLUSTER, compute_s=1e-4)
    assert slow.step_s >= slow.comm_s  # communication-bound: the step waits for all of it
    assert 0 < slow.efficiency < fast.efficiency <= 1


def test_unit_volumes_read_from_fully_sharded_model():
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from vggt_fsdp.memory.fake_pg import fake_process_group

    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    model[1].bias.requires_grad_(False)
    with fake_process_group(4, "cpu"):
        fully_shard(model[0], mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        fully_shard(model, reshard_after_forward=False)
        volumes = {v.name: v for v in comm_model.unit_volumes(model)}
    assert volumes["0"] == comm_model.UnitVolume("0", 8 * 16 + 16, 8 * 16 + 16, 2, 4, True)
    assert volumes["<root>"] == comm_model.UnitVolume("<root>", 16 * 4 + 4, 16 * 4, 4, 4, False)


# --------------------------------------------------------------------------------------- one configuration
@pytest.fixture(scope="module")
def tiny_result() -> dict:
    """One measured configuration of the tiny model, sharded over a fake group of 2, on the CPU."""
    spec = bench_step.BenchSpec(recipe=CPU_RECIPE, frames_per_gpu=2, height=56, width=56, world_size=2,
                                warmup=0, steps=2, device="cpu", name="tiny")
    return bench_step.run_benchmark(spec)


def test_mix_times_the_samplers_batches_in_turn_and_totals_them():
    """--mix N: the recipe sampler's first N batches (scene lengths and aspect ratios vary), each timed
    once; frames/s and FLOP/s are totals over the sequence, FLOPs counted per batch shape."""
    spec = bench_step.BenchSpec(recipe=CPU_RECIPE, frames_per_gpu=4, height=56, width=56, world_size=2,
                                warmup=1, steps=3, mix=3, device="cpu", name="mix",
                                overrides=["data.frames_range=[2, 4]", "data.aspect_range=[0.5, 1.0]"])
    result = bench_step.run_benchmark(spec)
    assert result["status"] == "ok", result.get("traceback")
    mix = result["shape"]["mix"]
    assert len(mix) == 3 and len({(m["frames_per_scene"], m["height"]) for m in mix}) > 1  # shapes vary
    assert all(m["scenes"] == 4 // m["frames_per_scene"] for m in mix)  # batch = floor(budget / S)
    # The first timed step is the batch after the warm-up one: batches 1, 2, then 0 again.
    order = [1, 2, 0]
    flops = result["flops"]["per_batch"]
    elapsed = sum(result["timing"]["all"])
    assert result["throughput"]["frames_per_s"] == pytest.approx(sum(m["scenes"] * m["frames_per_scene"]
                                                                      for m in mix) / elapsed)
    assert result["throughput"]["achieved_tflops"] == pytest.approx(sum(flops[i] for i in order) / elapsed / 1e12)


def test_bench_step_measures_a_sharded_tiny_step_on_cpu(tiny_result):
    result = tiny_result
    assert result["status"] == "ok", result.get("traceback")
    timing, thr = result["timing"], result["throughput"]
    assert len(timing["all"]) == 2 and timing["min"] <= timing["median"] <= timing["max"]
    assert thr["frames_per_s"] == pytest.approx(2 / timing["median"])
    assert thr["tokens_per_s"] == pytest.approx(thr["frames_per_s"] * (4 * 4 + 5))
    assert thr["achieved_tflops"] == pytest.approx(result["flops"]["total"] / timing["median"] / 1e12)
    assert thr["mfu"] is None  # no peak for a CPU: never an MFU
    memory = result["memory"]
    assert memory["kind"] == "cpu" and memory["saved_tensor_bytes"] > 0
    # 16 bytes a parameter (fp32 parameters, gradients, two AdamW moments), sharded over 2 ranks.
    assert memory["model_state_bytes"] == pytest.approx(16 * result["model"]["trainable_params"] / 2, rel=0.05)
    units = result["comm_units"]
    assert sum(u["numel"] for u in units) == result["model"]["params"]
    assert result["parallel"]["world_size"] == 2


def test_flop_counts_are_shared_by_configurations_of_one_model_and_shape(tmp_path, monkeypatch):
    cache = tmp_path / "flops.json"
    spec = bench_step.BenchSpec(recipe=CPU_RECIPE, frames_per_gpu=2, height=56, width=56, device="cpu",
                                flops_cache=str(cache))
    recipe = bench_step._recipe(spec)
    first = bench_step.count_flops(spec, recipe, torch.device("cpu"))
    assert "cached" not in first and first["total"] > 0
    monkeypatch.setattr(bench_step, "_count_flops", lambda *a: pytest.fail("counted again"))
    # Keeping all layer outputs changes memory, not FLOPs: the same count serves the baseline.
    keep_all = ["model.overrides.keep_all_layers=true"]
    baseline = bench_step._recipe(bench_step.BenchSpec(**{**spec.__dict__, "overrides": keep_all}))
    assert bench_step.count_flops(spec, baseline, torch.device("cpu")) == {**first, "cached": True}
    other_shape = bench_step.BenchSpec(**{**spec.__dict__, "frames_per_gpu": 4, "frames_per_scene": None})
    assert bench_step.flops_key(other_shape, recipe, torch.device("cpu")) != bench_step.flops_key(
        spec, recipe, torch.device("cpu"))


def test_out_of_memory_is_a_result_not_a_crash(monkeypatch):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench_step, "build_workload", boom)
    spec = bench_step.BenchSpec(recipe=CPU_RECIPE, frames_per_gpu=2, height=56, width=56, device="cpu",
                                warmup=0, steps=1)
    result = bench_step.run_benchmark(spec)
    assert (result["status"], result["phase"]) == ("oom", "build")
    assert "out of memory" in result["error"]


class _FakeProps:
    name, major, minor = "NVIDIA H200", 9, 0
    total_memory = 140 * 2**30


def test_cuda_device_gets_an_index_and_the_cap_a_fraction(monkeypatch):
    """The CUDA-only paths, exercised on a CPU machine with torch.cuda's entry points replaced."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: _FakeProps)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    device = bench_step.resolve_device("auto")
    assert device == torch.device("cuda", 3)  # memory calls refuse a bare "cuda"
    cap = bench_step.cap_device_memory(device, 40)
    assert cap["applied"] and cap["cap_bytes"] == 40 * 2**30 and calls == [(40 / 140, 3)]
    whole = bench_step.cap_device_memory(device, 141)  # no smaller than the card: its own memory limits
    assert not whole["applied"] and whole["cap_bytes"] == 140 * 2**30 and len(calls) == 1
    assert bench_step.describe_device(device)["name"] == "NVIDIA H200"
    assert bench_step.device_slug(bench_step.describe_device(device)) == "nvidia-h200"


def test_a_flop_count_out_of_memory_leaves_the_measurement(monkeypatch):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(bench_step, "count_flops", boom)
    spec = bench_step.BenchSpec(recipe=CPU_RECIPE, frames_per_gpu=1, height=56, width=56, device="cpu",
                                warmup=0, steps=1)
    result = bench_step.run_benchmark(spec)
    assert result["status"] == "ok" and result["phase"] == "done"
    assert result["flops"]["total"] is None and "out of memory" in result["flops"]["error"]
    assert result["throughput"]["achieved_tflops"] is None and result["throughput"]["frames_per_s"] > 0


def test_spec_rejects_partial_scenes_and_cpu_memory_cap():
    with pytest.raises(ValueError, match="multiple of frames_per_scene"):
        bench_step.BenchSpec(recipe=CPU_RECIPE, frames_per_gpu=30, frames_per_scene=24, height=56, width=56)
    split = bench_step.BenchSpec(recipe=CPU_RECIPE, frames_per_gpu=64, height=56, width=56)
    assert (split.scenes, split.frames_per_scene) == (4, 16)
    with pytest.raises(ValueError, match="caps a CUDA device"):
        bench_step.cap_device_memory(torch.device("cpu"), 40)
    assert bench_step.BenchSpec(recipe=CPU_RECIPE, frames_per_gpu=48, height=56, width=56).scenes == 2


# --------------------------------------------------------------------------------------- comparison
def test_plan_orders_recipes_first_and_baseline_uses_upstream_choices():
    configs = compare_recipes.plan(compare_recipes.PROFILES["gpu"])
    roles = [c.role for c in configs]
    # The block policy before issue 10 first (the reference of the speed-ups), then the recipes, worst
    # case, then the same three on the sampler's mix, before the baseline and the sweep.
    assert roles[:6] == ["block_40g", "recipe_40g", "recipe_80g"] * 2
    assert [c.mix for c in configs[:6]] == [0, 0, 0, 6, 6, 6]
    assert roles.index("sweep") > roles.index("baseline")
    # compiled after the baseline (the slowest start), worst case then the mix of 2+ scene batches
    compiled = [(c.mix, c.overrides[-1]) for c in configs if c.role == "compiled_40g"]
    assert compiled == [(0, "parallel.compile=true"), (6, "parallel.compile=true")]
    assert max(i for i, r in enumerate(roles) if r == "baseline") < roles.index("compiled_40g")
    block = configs[0]
    assert set(compare_recipes.BLOCK_POLICY_BEFORE) <= set(block.overrides) and block.gpu_memory_gib == 40.0
    assert "--mix" in compare_recipes.bench_command(configs[3], compare_recipes.PROFILES["gpu"])
    assert compare_recipes.plan(compare_recipes.PROFILES["cpu"])[0].role == "volumes"
    base = [c for c in configs if c.role == "baseline"]
    assert {(c.frames, c.gpu_memory_gib) for c in base} >= {(24, 40.0), (24, 80.0), (8, 80.0)}
    assert all(c.world_size == 1 for c in base)
    assert all(set(compare_recipes.UPSTREAM_BASELINE) <= set(c.overrides) for c in base)
    by_role = {c.role: c for c in configs}
    assert (by_role["recipe_40g"].gpu_memory_gib, by_role["recipe_80g"].gpu_memory_gib) == (40.0, 80.0)


@pytest.mark.parametrize("device_name, card", [
    # no card (a CPU run): also checked by the 20_throughput stage's smoke run (test_gpu_stages_smoke)
    pytest.param(None, None, marks=pytest.mark.slow),
    ("NVIDIA H200", "h200"),
])
def test_predict_asks_the_planner_at_the_measured_shape_and_card(device_name, card):
    profile = compare_recipes.PROFILES["cpu"]
    config = compare_recipes.Config("40GB recipe", "recipe_40g", compare_recipes.RECIPE_40G, 2, 8,
                                    [*profile.overrides, *compare_recipes.BLOCK_POLICY_BEFORE])
    predicted = compare_recipes.predict(config, profile, device_name)
    assert predicted["card"] == card and "--frames 2 --gpus 8 --image 112x112" in predicted["command"]
    assert 0.2 < predicted["recompute_fraction"] < 0.5  # every block recomputed whole: about a third
    assert (predicted["step_s"] is None) == (card is None)  # no step time is predicted for a CPU
    assert compare_recipes.predict(compare_recipes.replace(config, mix=2), profile, device_name) == {}


def test_run_config_records_a_failing_subprocess():
    profile = compare_recipes.PROFILES["cpu"]
    config = compare_recipes.Config("missing", "recipe_40g", "recipes/does_not_exist.yaml", 2, 1)
    result = compare_recipes.run_config(config, profile, timeout_s=120)
    assert result["status"] == "error" and "does_not_exist.yaml" in result["error"]
    assert result["config"]["name"] == "missing" and "bench_step" in result["command"]


# --------------------------------------------------------------------------------------- report
def _gpu_result(role, frames, peak_gib, fps, mfu=None, device="NVIDIA H100 80GB HBM3", status="ok", ws=8):
    return {
        "status": status, "config": {"role": role, "name": role, "frames": frames, "world_size": ws},
        "spec": {"frames_per_gpu": frames, "height": 518, "width": 518, "world_size": ws},
        "device": {"type": "cuda", "name": device, "torch": "2.11"}, "model": {"preset": "vggt-1b"},
        "memory": {"kind": "cuda", "peak_allocated_bytes": int(peak_gib * report.GIB)},
        "throughput": {"frames_per_s": fps, "mfu": mfu}, "parallel": {"checkpoint": "attention"},
    }


def test_targets_are_judged_from_matching_measurements_only():
    results = [_gpu_result("recipe_40g", 24, 37.0, 9.0), _gpu_result("recipe_80g", 48, 77.0, 10.0, mfu=0.5)]
    verdicts = {v.target.split(":")[0] + v.target[-12:]: v.status for v in report.judge_targets(results)}
    statuses = [v.status for v in report.judge_targets(results)]
    assert statuses == ["met", "not met", "met", "met"], verdicts  # 80GB peak 77 GiB >= 76: not met
    # The same numbers from an H200 do not judge the H100 MFU target; from a CPU, nothing is judged.
    h200 = [_gpu_result("recipe_80g", 48, 70.0, 10.0, mfu=0.5, device="NVIDIA H200")]
    assert report.judge_targets(h200)[2].status == "not measured"
    wrong_world = [_gpu_result("recipe_40g", 24, 30.0, 9.0, ws=1)]
    assert report.judge_targets(wrong_world)[0].status == "not measured"
    slow = [_gpu_result("recipe_40g", 24, 30.0, 7.0), _gpu_result("recipe_80g", 48, 70.0, 10.0)]
    assert report.judge_targets(slow)[3].status == "not met"  # 0.7 < 0.8


def _timed(result, step_s, predicted_s=None, mix=0, scenes=2, frames_per_scene=24):
    result["config"]["mix"] = mix
    result["timing"] = {"median": step_s}
    result["shape"] = {"scenes": scenes, "frames_per_scene": frames_per_scene}
    result["predicted"] = {"step_s": predicted_s, "recompute_fraction": 0.1}
    return result


def test_throughput_targets_compare_within_one_run():
    results = [_timed(_gpu_result("block_40g", 24, 15.0, 8.0), 3.0, 3.3),
               _timed(_gpu_result("recipe_40g", 24, 30.0, 10.4), 2.3, 2.2),
               _timed(_gpu_result("recipe_80g", 48, 60.0, 12.0, mfu=0.31), 4.0, 4.5),
               _timed(_gpu_result("recipe_40g", 24, 30.0, 99.0), 0.2, 5.0, mix=6)]  # a mix is not the worst case
    statuses = [v.status for v in report.judge_throughput(results)]
    # 10.4/8.0 = 1.30 >= 1.25; 12/10.4 = 1.15 >= 1.15; MFU 31%; worst step error +12.5% (80GB) <= 15%
    assert statuses == ["met", "met", "met", "met"], report.judge_throughput(results)
    results[2]["predicted"]["step_s"] = 4.8  # +20%
    assert report.judge_throughput(results)[3].status == "not met"
    table = "\n".join(report.throughput_table(results, cpu=False))
    assert "| 1.30 |" in table and "sampler mix of 6" in table
    assert [v.status for v in report.judge_throughput(results[1:])][0] == "not measured"  # no block policy run


def test_report_labels_cpu_results_and_notes_missing_charts(tmp_path, monkeypatch, tiny_result):
    result = dict(tiny_result)
    result["config"] = {"role": "recipe_80g", "name": "80GB recipe", "frames": 2, "world_size": 2}
    result["command"] = "python -m benchmarks.bench_step ..."
    doc = {"command": "python -m benchmarks.compare_recipes --profile cpu", "date_utc": "2026-01-01T00:00:00+00:00",
           "profile": {"image": [56, 56], "warmup": 0, "steps": 1}, "results": [result]}
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as without the `plots` extra
    path = report.write_report(doc, tmp_path, "cpu-run", charts=True)
    text = path.read_text()
    assert "**CPU results.**" in text and "Charts skipped: matplotlib is not installed" in text
    assert "a model, not a measurement" in text
    assert "| met |" not in text  # no target is judged from CPU runs
    json.dumps(doc, default=str)  # the document the comparison writes is JSON-serialisable


def test_bench_step_cli_writes_json(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_step", CPU_RECIPE, "--frames", "2", "--image", "56x56",
         "--world-size", "4", "--volumes-only", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["status"] == "ok" and result["comm_units"] and "bench_step" in result["command"]


def test_compare_main_writes_results_and_respects_the_budget(tmp_path, monkeypatch):
    """Orchestration only (each configuration's subprocess is replaced): every planned configuration is
    recorded, in order; once the budget is spent the rest are 'skipped'; JSON and report are written."""
    calls = []

    def fake_run(config, profile, timeout_s, flops_cache=None):
        calls.append(config.name)
        result = {"status": "oom", "error": "out of memory", "phase": "steps", "wall_s": 0.0,
                  "device": {"type": "cpu", "name": "CPU", "torch": torch.__version__, "torch_threads": 1},
                  "config": compare_recipes.asdict(config), "command": "python -m benchmarks.bench_step"}
        if config.role == "volumes":
            result = {"status": "ok", "name": config.name, "model": {"preset": "vggt-1b"},
                      "config": compare_recipes.asdict(config),
                      "comm_units": [compare_recipes.asdict(_unit(1000))], "command": "x", "wall_s": 0.0}
        return result

    monkeypatch.setattr(compare_recipes, "run_config", fake_run)
    assert compare_recipes.main(["--profile", "cpu", "--out", str(tmp_path), "--no-charts"]) == 0
    planned = compare_recipes.plan(compare_recipes.PROFILES["cpu"])
    assert calls == [c.name for c in planned]
    (json_file,) = tmp_path.glob("*-cpu.json")
    doc = json.loads(json_file.read_text())
    assert [r["config"]["name"] for r in doc["results"]] == calls and "compare_recipes" in doc["command"]
    text = json_file.with_suffix(".md").read_text()
    assert "**oom**" in text and "out of memory" in text

    calls.clear()
    out2 = tmp_path / "budget"
    assert compare_recipes.main(["--profile", "cpu", "--out", str(out2), "--no-charts", "--budget-s", "0"]) == 0
    doc = json.loads(next(out2.glob("*.json")).read_text())
    assert calls == [] and {r["status"] for r in doc["results"]} == {"skipped"}


def test_charts_are_drawn_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    results = [_gpu_result("recipe_40g", 24, 30.0, 9.0), _gpu_result("recipe_80g", 48, 70.0, 10.0),
               _gpu_result("baseline", 24, 0.0, 0.0, status="oom", ws=1),
               {**_gpu_result("sweep", 16, 50.0, 12.0), "config": {"role": "sweep", "name": "s", "policy": "block",
                                                                   "frames": 16, "world_size": 8}}]
    files = report.write_charts({"results": results}, tmp_path, "gpu", cpu=False)
    assert files == ["gpu-recipes.png", "gpu-memory-vs-frames.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in files)


def test_compare_stops_after_errors_in_a_row(tmp_path, monkeypatch):
    calls = []

    def failing(config, profile, timeout_s, flops_cache=None):
        calls.append(config.name)
        return {"status": "error", "error": "ImportError: no accelerate", "config": compare_recipes.asdict(config),
                "wall_s": 0.0}

    monkeypatch.setattr(compare_recipes, "run_config", failing)
    assert compare_recipes.main(["--profile", "cpu", "--out", str(tmp_path), "--no-charts"]) == 0
    assert len(calls) == compare_recipes.MAX_ERRORS_IN_ROW
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["results"][-1]["status"] == "skipped" and "in a row" in doc["results"][-1]["error"]


def test_kernel_kinds_cover_the_kernels_a_step_runs():
    from benchmarks.kernel_profile import kind_of

    assert kind_of("void pytorch_flash::flash_bwd_dq_dk_dv_loop_kernel<...>") == "attention"
    assert kind_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
    assert kind_of("cudnn::detail::dgrad2d_alg1_1<float>") == "convolution"
    assert kind_of("void at::native::vectorized_layer_norm_kernel<c10::BFloat16>") == "layer norm"
    assert kind_of("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>") == "elementwise / reduce"
    assert kind_of("some_kernel_nobody_named") == "other"


def test_profiling_refuses_the_cpu(tmp_path):
    from benchmarks.kernel_profile import profile_step

    with pytest.raises(ValueError, match="CUDA"):
        profile_step(lambda: None, torch.device("cpu"), tmp_path / "p.json")


def test_the_grid_runs_each_variant_of_the_three_before_the_next():
    configs = compare_recipes.plan(compare_recipes.PROFILES["gpu"], include_baseline=False, include_sweep=False,
                                   grid=True)
    worst = [c.name for c in configs if not c.mix]
    assert worst[:3] == ["block policy (before)", "40GB recipe", "80GB recipe"]
    assert worst[3:6] == [f"{n}, no autocast" for n in worst[:3]] and len(worst) == 12
    assert all(c.frames == 24 for c in configs) and "compiled_40g" not in {c.role for c in configs}
    no_compile = compare_recipes.plan(compare_recipes.PROFILES["gpu"], include_baseline=False, include_sweep=False,
                                      grid=True, compile_grid=False)
    assert not any("compiled" in c.name for c in no_compile)


def _grid_result(role, variant, step, status="ok", cap_respected=True, mix=0):
    name = {"recipe_40g": "40GB recipe", "recipe_80g": "80GB recipe"}.get(role, role)
    return {"status": status, "config": {"role": role, "name": f"{name}, {variant}" if variant else name,
                                         "variant": variant, "mix": mix},
            "timing": {"median": step} if status == "ok" else None, "memory": {"cap_respected": cap_respected},
            "device": {"name": "NVIDIA H100"}}


def test_the_fastest_configuration_that_fits_its_cap_is_named_as_overrides():
    results = [_grid_result("recipe_40g", "", 3.0), _grid_result("recipe_40g", "no autocast", 2.6),
               _grid_result("recipe_40g", "compiled", 2.1, cap_respected=False),  # reserved past the cap: does not fit
               _grid_result("recipe_40g", "no autocast, compiled", 0, status="oom"),
               _grid_result("recipe_40g", "compiled", 1.0, mix=6),  # a mix is no worst case
               _grid_result("recipe_80g", "", 0, status="oom"), _grid_result("block_40g", "", 0.5)]
    best = compare_recipes.fastest_fitting(results)
    assert best["40GB recipe"]["overrides"] == compare_recipes.GRID_VARIANTS["no autocast"]
    assert best["40GB recipe"]["step_s"] == 2.6 and best["80GB recipe"] is None and set(best) == {"40GB recipe",
                                                                                                  "80GB recipe"}


def test_charts_name_frames_caps_device_and_date():
    r = _gpu_result("recipe_40g", 24, 30.0, 9.0)
    r["config"]["gpu_memory_gib"] = 40.0
    assert report.chart_label(r) == "recipe_40g (24 frames/GPU, cap 40 GiB)"
    assert report.chart_provenance({"results": [r], "date_utc": "2026-12-07T10:00:00"}) == (
        "NVIDIA H100 80GB HBM3, measured 2026-12-07")
