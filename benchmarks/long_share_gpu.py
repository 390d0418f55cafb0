"""GPU stage 60_long_share (issue 19): one GPU's share of a long-scene recipe, measured.

    python -m benchmarks.long_share_gpu OUT_DIR --budget-s 60 [--smoke]

Context parallelism splits a scene's frames over a group of N GPUs, and one GPU cannot run the group's
exchange. What one GPU can measure is a rank's own work: its S/N frames through every frame-wise part,
its global attention over all S frames with H/N heads, the camera head over the whole scene's pose
tokens, the outputs and ground truth gathered for the loss. `benchmarks.bench_step` runs exactly that
with the all-to-all stood in for by local copies (`parallel.context.StandInGroup`) and the parameters
sharded over a fake 8-rank group, under the card's memory cap. Each row checks the planner's per-GPU
peak and step time for one long recipe, the exchange excepted (its time is a datasheet estimate that
only a group of GPUs can check):

1. `recipes/a100_40g_long.yaml`: 24 frames of a 96-frame scene, 40 GiB cap;
2. `recipes/a100_80g_long.yaml`: 48 frames of a 192-frame scene, 80 GiB cap.

A configuration the budget cannot hold is owed, not run (benchmarks/session_ledger.py). `--smoke`: the
tiny model at tiny shapes on the CPU, in this process (tests/test_gpu_stages_smoke.py); no GPU figure.
Writes OUT_DIR/long_share.json and summary.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


@dataclass
class ShareConfig:
    name: str
    recipe: str
    frames: int  # this GPU's frames of the scene (the scene has N times as many)
    gpu_memory_gib: float | None
    overrides: list[str] = field(default_factory=list)
    estimate_s: float = 60.0  # what a run needs on an H100/H200 (start, build, 2 steps): skip if less is left


def configs(smoke: bool) -> list[ShareConfig]:
    recipes = REPO / "recipes"
    if smoke:
        tiny = ["model.preset=vggt-tiny"]
        return [ShareConfig("40GB long recipe, one GPU's share", str(recipes / "a100_40g_long.yaml"), 1, None, tiny, 5),
                ShareConfig("80GB long recipe, one GPU's share", str(recipes / "a100_80g_long.yaml"), 2, None, tiny, 5)]
    return [ShareConfig("40GB long recipe, one GPU's share", str(recipes / "a100_40g_long.yaml"), 24, 40.0),
            ShareConfig("80GB long recipe, one GPU's share", str(recipes / "a100_80g_long.yaml"), 48, 80.0,
                        estimate_s=120.0)]


def bench_spec(config: ShareConfig, smoke: bool):
    from benchmarks.bench_step import BenchSpec

    height, width = (56, 56) if smoke else (518, 518)
    return BenchSpec(recipe=config.recipe, overrides=list(config.overrides), frames_per_gpu=config.frames,
                     frames_per_scene=config.frames, height=height, width=width, world_size=2 if smoke else 8,
                     gpu_memory_gib=config.gpu_memory_gib, warmup=0 if smoke else 1, steps=1,
                     device="cpu" if smoke else "auto", name=config.name)


def run_config(config: ShareConfig, smoke: bool, timeout_s: float) -> dict:
    from benchmarks.bench_step import run_benchmark

    spec = bench_spec(config, smoke)
    start = time.monotonic()
    # On a GPU each configuration in a fresh process: its memory and allocator state start clean.
    result = run_benchmark(spec) if smoke else _run_child(spec, timeout_s)
    result["wall_s"] = round(time.monotonic() - start, 1)
    result["config"] = asdict(config)
    if result.get("status") in ("ok", "oom"):
        result["planned"] = planned(spec, result)
    return result


def _run_child(spec, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "benchmarks.bench_step", spec.recipe, *spec.overrides,
                   "--frames", str(spec.frames_per_gpu), "--frames-per-scene", str(spec.frames_per_scene),
                   "--image", f"{spec.height}x{spec.width}", "--world-size", str(spec.world_size),
                   "--warmup", str(spec.warmup), "--steps", str(spec.steps), "--name", spec.name, "--json", str(out)]
        if spec.gpu_memory_gib is not None:
            command += ["--gpu-memory", str(spec.gpu_memory_gib)]
        try:
            proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
            return json.loads(out.read_text()) if out.is_file() else {
                "status": "error", "error": f"exit {proc.returncode} without a result", "stderr_tail": proc.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s"}


def planned(spec, result: dict) -> dict:
    """The planner's peak and step time for the measured share (one scene of N x its frames), the step on
    the measured device's card (none on the CPU), and their errors against the measurement."""
    from vggt_fsdp.hardware import card_for_device_name
    from vggt_fsdp.memory import planner, steptime
    from vggt_fsdp.recipe import load_recipe

    recipe = load_recipe(spec.recipe, spec.overrides)
    size = recipe.parallel.context_parallel
    shape = planner.recipe_shape(recipe, spec.world_size, (spec.height, spec.width))
    cuda = result.get("device", {}).get("type") == "cuda"
    plan = planner.plan(shape.model_cfg, recipe.parallel, spec.world_size, spec.frames_per_gpu, shape.image_hw,
                        "cuda" if cuda else "cpu", frames_range=(size * spec.frames_per_scene,) * 2,
                        freeze=shape.freeze)
    out = {"context_parallel": size, "scene_frames": size * spec.frames_per_scene, "peak_bytes": plan.peak_bytes}
    measured = result.get("memory", {}).get("peak_allocated_bytes")
    if measured:
        out["peak_error"] = (plan.peak_bytes - measured) / measured
    card = card_for_device_name(result.get("device", {}).get("name", "")) if cuda else None
    if card is not None:
        batch = planner.Batch(spec.scenes, spec.frames_per_scene, spec.height, spec.width,
                              shape.model_cfg.aggregator.patch_size)
        work = steptime.step_work(shape.model_cfg, recipe.parallel, batch, world_size=spec.world_size,
                                  freeze=shape.freeze)
        out["step_s"] = steptime.predict(work, card).total_s
        step = result.get("timing", {}).get("median")
        if step:
            out["step_error"] = (out["step_s"] - step) / step
    return out


# --------------------------------------------------------------------------------------- the stage
def run_stage(out: Path, budget_s: float, smoke: bool) -> dict:
    from benchmarks import session_ledger as ledger
    from benchmarks.bench_step import describe_device, resolve_device

    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device("cpu" if smoke else "auto")
    doc: dict = {"smoke": smoke, "device": describe_device(device), "budget_s": budget_s, "results": [], "owed": []}
    ledger.run_configs(out, doc, configs(smoke), budget_s - (time.monotonic() - start),
                       lambda config, timeout_s: run_config(config, smoke, timeout_s),
                       lambda doc: _write(doc, out))
    doc["wall_s"] = round(time.monotonic() - start, 1)
    _write(doc, out)
    return doc


def _write(doc: dict, out: Path) -> None:
    (out / "long_share.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "summary.md").write_text(summary(doc))


def summary(doc: dict) -> str:
    device = doc["device"]
    head = "CPU smoke run (tiny model; no GPU figure)" if doc["smoke"] else (
        f"{device.get('name')}, torch {device.get('torch')}, {device.get('date_utc')}")
    lines = [f"# One GPU's share of a long-scene recipe ({head})", "",
             "| configuration | frames (of the scene) | cap | status | peak allocated | planner peak (error) "
             "| step | planner step (error) | frames/s/GPU | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["results"]:
        c, mem, thr, plan = r["config"], r.get("memory", {}), r.get("throughput", {}), r.get("planned", {})
        peak, step = mem.get("peak_allocated_bytes"), r.get("timing", {}).get("median")
        planned_peak = (f"{plan['peak_bytes'] / GIB:.2f} GiB" + (f" ({plan['peak_error']:+.1%})" if "peak_error" in plan
                                                                 else "")) if plan else "-"
        planned_step = (f"{plan['step_s']:.2f} s" + (f" ({plan['step_error']:+.1%})" if "step_error" in plan else "")
                        if "step_s" in plan else "-")
        mfu, fps = thr.get("mfu"), thr.get("frames_per_s")
        cells = [c["name"], f"{c['frames']} (of {plan.get('scene_frames', '?')})",
                 f"{c['gpu_memory_gib']:g} GiB" if c["gpu_memory_gib"] else "-", str(r.get("status")),
                 f"{peak / GIB:.2f} GiB" if peak else "-", planned_peak, f"{step:.2f} s" if step else "-",
                 planned_step, f"{fps:.2f}" if fps else "-", f"{mfu:.1%}" if mfu is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for owed in doc["owed"]:
        lines.append(f"| {owed['name']} | - | - | owed: {owed['why']} | - | - | - | - | - | - |")
    lines += ["", "Each row: one rank of a context group, the exchange stood in for by local copies (no "
              "communication measured; parallel.context.StandInGroup), parameters sharded over a fake 8-rank "
              "group, memory capped to the card; `python -m benchmarks.long_share_gpu` "
              "(benchmarks/gpu_stages/60_long_share.sh). The planner's step leaves the exchange out as well."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.long_share_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: the machinery only")
    args = parser.parse_args(argv)
    doc = run_stage(args.out, args.budget_s, args.smoke)
    print(summary(doc))
    return 1 if any(r.get("status") not in ("ok", "oom") for r in doc["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
