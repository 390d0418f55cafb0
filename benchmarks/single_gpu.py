"""The single-GPU recipes on one GPU (GPU stage 50_single_gpu): VGGT-1B fine-tuned with CPU offload.

    python -m benchmarks.single_gpu OUT_DIR --budget-s 80 [--smoke]

For each recipe, on a card capped at the memory it is sold with (an H200 capped at 24 and 40 GiB), in a
fresh process (its own cap and peaks): the trainer's own pieces (`build_trainer`: offloaded states,
pinned memory, the optimizer on the host) train two optimizer steps of 2 micro-batches on synthetic
scenes at the planner's worst split of the recipe's frame budget (its most scenes of 2 frames at
518x518), and report

- the device peak (`torch.cuda.max_memory_allocated`, reserved) against the planner's prediction for the
  same batch (the acceptance is within 10%);
- the time of the second step, split into micro-batches and the host optimizer step (timed around
  `optimizer.step()`), and the host optimizer's share of an optimizer step at the recipe's own
  `train.grad_accum_steps` (extrapolated from the measured micro-batch: said so);
- the process's peak host memory (ru_maxrss) against the planner's host plan.

The recipes run cheapest first; one that the budget left cannot hold is skipped and the report says so.
`--smoke`: the same code on the CPU with the tiny model and tiny shapes (no cap, no GPU figure).
Writes OUT_DIR/single_gpu.json and OUT_DIR/summary.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
# (recipe, cap in GiB, seconds a run needs on an H200: build and offloaded init, 2 steps, host AdamW;
# an estimate to decide what fits the budget).
RUNS = [("gpu24g_single", 24, 70), ("a100_40g_single", 40, 90)]
MEASURE = ["data.source=synthetic", "data.root=null", "data.frames_range=[2,2]", "data.aspect_range=[1.0,1.0]",
           "train.grad_accum_steps=2", "train.max_steps=2", "train.val_every=0", "train.progress_bar=false",
           "train.log_every=1", "data.num_workers=2"]
SMOKE = ["model.preset=vggt-tiny", "accelerate.use_cpu=true", "hardware.device=null", "data.image_width=56", "data.frames_per_gpu=4",
         "data.num_workers=0"]


# ======================================================================================== one recipe
def measure_one(name: str, cap_gib: float, smoke: bool) -> dict:
    """Train 2 steps of `name` in this process and measure them (see the module docstring)."""
    import torch

    from vggt_fsdp.memory import offload, planner
    from vggt_fsdp.recipe import load_recipe
    from vggt_fsdp.train.build import build_trainer

    out_dir = tempfile.mkdtemp(prefix=f"single_gpu_{name}_")
    overrides = [*MEASURE, *(SMOKE if smoke else []), f"train.output_dir={out_dir}"]
    recipe = load_recipe(str(REPO / "recipes" / f"{name}.yaml"), overrides)
    cap = None
    if not smoke:
        from benchmarks.bench_step import cap_device_memory

        torch.cuda.init()
        cap = cap_device_memory(torch.device("cuda", torch.cuda.current_device()), cap_gib)
    started = time.perf_counter()
    built = build_trainer(recipe)
    trainer, device = built.trainer, built.trainer.device
    build_s = time.perf_counter() - started

    host_steps: list[float] = []
    step = trainer.optimizer.step

    def timed_step(*args, **kwargs):  # the host AdamW step (parameters and state live on the host)
        t0 = time.perf_counter()
        result = step(*args, **kwargs)
        host_steps.append(time.perf_counter() - t0)
        return result

    trainer.optimizer.step = timed_step
    batches = trainer.task.batches()
    trainer.model.train()
    step_times, shapes = [], []
    for _ in range(recipe.train.max_steps):
        _sync(device)
        t0 = time.perf_counter()
        trainer._step(batches)  # the trainer's own optimizer step: micro-batches, clipping, AdamW
        _sync(device)
        step_times.append(time.perf_counter() - t0)
        shapes.append(trainer.last_shape.__dict__ if trainer.last_shape is not None else None)

    accum_measured = recipe.train.grad_accum_steps
    recipe_accum = load_recipe(str(REPO / "recipes" / f"{name}.yaml")).train.grad_accum_steps
    last, adamw = step_times[-1], host_steps[-1] if host_steps else float("nan")
    micro = (last - adamw) / accum_measured
    full_step = recipe_accum * micro + adamw
    shape = planner.recipe_shape(recipe)
    frames = recipe.data.frames_per_gpu
    predicted = planner.plan(shape.model_cfg, recipe.parallel, 1, frames, shape.image_hw,
                             "cpu" if smoke else "cuda", frames_range=planner.clip_range(shape.frames_range, frames),
                             freeze=shape.freeze, gpus_per_node=1)
    units = planner.unit_layout(shape.model_cfg, recipe.parallel, shape.freeze)
    from vggt_fsdp.train.optim import resolve_fused

    host = offload.host_plan(units, 1, fused=resolve_fused(recipe.optim, "cpu"), pinned=not smoke,
                             num_workers=recipe.data.num_workers)
    result = {
        "recipe": name, "overrides": overrides, "cap": cap, "build_s": round(build_s, 2),
        "frames_per_step": frames, "batch": shapes[-1], "grad_accum_measured": accum_measured,
        "step_s": [round(t, 3) for t in step_times], "host_adamw_s": [round(t, 3) for t in host_steps],
        "micro_batch_s": round(micro, 3),
        "recipe_grad_accum_steps": recipe_accum,
        "optimizer_step_s_at_recipe_accum": round(full_step, 2),
        "host_optimizer_share_at_recipe_accum": round(adamw / full_step, 4),
        "host_optimizer_share_note": (f"extrapolated: {recipe_accum} x the measured micro-batch + the measured "
                                      "host AdamW step (the gradient adds of micro-batches 2.. are in the micro-batch)"),
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "host_planned_bytes": host.total_bytes,
        "planned_peak_bytes": predicted.peak_bytes,
        "planned_device_bytes": predicted.device_bytes,
        "planned_batch": [predicted.scenes, predicted.frames_per_scene],
    }
    if device.type == "cuda":
        result["device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        result["device_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        result["planner_error"] = round(predicted.peak_bytes / result["device_peak_bytes"] - 1, 4)
        result["device"] = torch.cuda.get_device_name(device)
    else:
        result["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return result


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ======================================================================================== the stage
def run_stage(out: Path, budget_s: float, smoke: bool) -> dict:
    import torch

    from benchmarks import session_ledger as ledger

    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    runs = {}
    report = {"smoke": smoke, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
              "commit": git_commit(), "command": "python -m benchmarks.single_gpu " + " ".join(sys.argv[1:]),
              "runs": runs}
    for name, cap, need in RUNS:
        if ledger.skip_if_measured(out, name):
            runs[name] = {"skipped": "measured in an earlier session at this code (ledger)"}
            continue
        left = deadline - time.monotonic()
        if not smoke and left < need:
            runs[name] = {"skipped": f"{left:.0f} s of budget left, a run needs about {need} s"}
            ledger.record(out, name, ledger.OWED, runs[name]["skipped"])
            continue
        log = out / f"{name}.log"
        result_file = out / f"{name}.json"
        command = [sys.executable, "-m", "benchmarks.single_gpu", str(out), "--one", name, "--cap", str(cap)]
        command += ["--smoke"] if smoke else []
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        with open(log, "w") as f:
            try:
                code = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                      timeout=max(left, 1)).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        if code == 0 and result_file.is_file():
            runs[name] = json.loads(result_file.read_text())
            ledger.record(out, name, ledger.MEASURED)
        else:
            runs[name] = {"failed": f"exit {code}", "log_tail": log.read_text()[-2000:]}
            ledger.record(out, name, ledger.FAILED, runs[name]["failed"])
        _write(report, out)  # now: a kill keeps the runs that finished
    _write(report, out)
    return report


def _write(report: dict, out: Path) -> None:
    (out / "single_gpu.json").write_text(json.dumps(report, indent=1))
    (out / "summary.md").write_text(summary(report))


def summary(report: dict) -> str:
    lines = ["# Single-GPU recipes with CPU offload" + (" — CPU smoke run (tiny model; no GPU figure)"
                                                         if report["smoke"] else ""), "",
             f"- command: `{report['command']}`; date {report['date']}; torch {report['torch']}; commit {report['commit']}",
             "", "| recipe | device (cap) | frames | peak GiB (planned, error) | micro-batch s | host AdamW s | "
             "host AdamW share at recipe accum | host RSS GiB (planned) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in report["runs"].items():
        if "skipped" in run or "failed" in run:
            lines.append(f"| {name} | {run.get('skipped') or 'FAILED ' + run['failed']} | | | | | | |")
            continue
        cap = run["cap"]
        device = run["device"] + (f" ({cap['cap_bytes'] / GIB:.0f} GiB)" if cap else "")
        peak = run.get("device_peak_bytes")
        peak_text = (f"{peak / GIB:.2f} ({run['planned_peak_bytes'] / GIB:.2f}, {run['planner_error']:+.1%})"
                     if peak is not None else f"- ({run['planned_peak_bytes'] / GIB:.3f})")
        lines.append(f"| {name} | {device} | {run['frames_per_step']} | {peak_text} | {run['micro_batch_s']} | "
                     f"{run['host_adamw_s'][-1]} | {run['host_optimizer_share_at_recipe_accum']:.1%} "
                     f"({run['recipe_grad_accum_steps']} micro-batches) | {run['host_peak_rss_bytes'] / GIB:.1f} "
                     f"({run['host_planned_bytes'] / GIB:.1f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget-s", type=float, default=80)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: measure this recipe only
    parser.add_argument("--cap", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        result = measure_one(args.one, args.cap, args.smoke)
        (args.out / f"{args.one}.json").write_text(json.dumps(result, indent=1))
        return 0
    report = run_stage(args.out, args.budget_s, args.smoke)
    print(summary(report))
    return 0 if all("failed" not in run for run in report["runs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
