"""The trainer's first CUDA run (GPU stage 10_trainer_cuda): the real entry points, on one GPU.

    python -m benchmarks.trainer_cuda OUT_DIR --budget-s 100 [--smoke]

Three checks, cheapest first, each skipped (and said so) when the budget left cannot hold it:
1. fused_skip: fused AdamW given a non-finite step by the trainer's NonFiniteGuard leaves parameters,
   moments and step counts untouched, with the decision on the device (run under CUDA's sync debug
   mode: a host sync in flag + step is reported).
2. vggt1b: `vggt-fsdp train` (accelerate launch, 1 process) trains VGGT-1B, all states on one card
   (fp32 master weights, gradients and AdamW moments: 16 bytes a parameter), 4 steps of synthetic
   scenes, a checkpoint (checksummed), the export; metrics.jsonl's CUDA peaks and step times reported.
3. resume_exact: vggt-mid in fp32 with the 80GB recipe's checkpoint policies (selective in the DINO,
   frame and global blocks), in deterministic mode (the trainer's main() with CUDA's deterministic
   kernels: the fused SDPA kernels off, so SDPA runs its math kernel, which the selective policy
   recognises): a straight run against one stopped by SIGTERM after step 2 (the process is paused
   first, so the signal lands in the step after it) and resumed from its preemption checkpoint;
   exported weights and the re-run losses compared.

Run directories (a VGGT-1B checkpoint is about 15 GB) go to a scratch directory (GPU_SESSION_SCRATCH,
else a temporary one), never OUT_DIR, and each check deletes its own when it has read them. Every
check's result is written to OUT_DIR/trainer_cuda.json as it completes (a kill keeps the finished ones)
and recorded in the GPU session's ledger (benchmarks/session_ledger.py); a check an earlier session at
the same code completed is skipped.

`--smoke` runs the same code paths on the CPU with the tiny model and tiny shapes (the test of this
stage), the resume check with the same checkpoint policies and the same deterministic switches. Writes
OUT_DIR/trainer_cuda.json and summary.md; exits 1 when a check that ran failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]

# What each run trains (overrides of a bundled recipe). GPU: VGGT-1B at 8 frames of 252 px (18x18
# patches), the a100_80g recipe's sharding, precision and checkpointing policy on one process.
GPU_1B = ["accelerate.num_processes=1", "parallel.sharding.mode=full", "data.source=synthetic", "data.root=null",
          "data.frames_range=[2,8]", "data.frames_per_gpu=8", "data.image_width=252", "data.num_workers=4",
          "train.val_every=0", "train.keep_last=1"]
SMOKE_1B = ["accelerate.num_processes=1", "data.frames_range=[2,3]", "data.frames_per_gpu=3",
            "data.image_width=56", "train.val_every=0", "train.keep_last=1"]
GPU_MID = ["model.preset=vggt-mid", "parallel.precision.param_dtype=fp32", "accelerate.mixed_precision=no",
           "data.source=synthetic", "data.root=null", "data.frames_range=[2,6]", "data.frames_per_gpu=6",
           "data.image_width=196", "data.num_workers=2", "train.val_every=0", "accelerate.num_processes=1"]
SMOKE_MID = ["parallel.precision.param_dtype=fp32", "accelerate.mixed_precision=no", "data.frames_range=[2,3]",
             "data.frames_per_gpu=3", "data.image_width=56", "data.num_workers=0", "accelerate.num_processes=1"]
COMMON = ["train.log_every=1", "train.progress_bar=false", "schedule.warmup_steps=2"]
# The recipe whose checkpoint policies the resume check runs with, on the GPU and in the smoke run alike.
RESUME_POLICY_RECIPE = REPO / "recipes" / "a100_80g.yaml"


def checkpoint_overrides(recipe: Path) -> list[str]:
    """`parallel.checkpoint` of `recipe` as overrides of another recipe (its groups' selective policies
    included), so the smoke run checkpoints exactly as the GPU run does."""
    import dataclasses

    from vggt_fsdp.recipe import load_recipe

    section = dataclasses.asdict(load_recipe(recipe).parallel.checkpoint)
    # JSON is YAML's flow style: what an override's value is parsed as.
    return [f"parallel.checkpoint.{key}={json.dumps(value)}" for key, value in section.items()]
# The trainer's own entry point with CUDA's deterministic kernels (math attention, deterministic
# scatter/index ops and cuBLAS workspace), so that a straight run and a resumed one can be compared
# bitwise: with the default kernels two straight runs already differ in the last bits.
DETERMINISTIC_TRAIN = ("import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                       "torch.backends.cuda.enable_flash_sdp(False); torch.backends.cuda.enable_mem_efficient_sdp(False); "
                       "torch.backends.cuda.enable_cudnn_sdp(False); "
                       "from vggt_fsdp.train.__main__ import main; sys.exit(main(sys.argv[1:]))")


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run(command: list[str], timeout: float, log: Path) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -9
    return code, time.perf_counter() - started


# ------------------------------------------------------------------------------------- 1. fused skip
def check_fused_skip(device_type: str) -> dict:
    import torch
    from torch import nn

    from vggt_fsdp.train.config import OptimConfig
    from vggt_fsdp.train.faults import NonFiniteGuard
    from vggt_fsdp.train.optim import build_optimizer

    device = torch.device(device_type)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8)).to(device)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2), device_type)
    fused = bool(optimizer.defaults["fused"])
    guard = NonFiniteGuard(max_in_row=3, device=device)
    x = torch.randn(16, 64, device=device)

    def gradients(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        loss = model(x).pow(2).mean() * scale
        loss.backward()
        return loss, torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))

    def update(loss: torch.Tensor, norm: torch.Tensor) -> None:
        # Exactly what Trainer._train_step and _optimizer_step do with fused AdamW.
        optimizer.found_inf = guard.flag(loss, norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    update(*gradients(1.0))  # one finite step: moments exist
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state_before = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
    grads = gradients(float("nan"))
    syncs = []
    if device.type == "cuda":  # the skip decision must not make the host wait for the device
        import warnings

        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            update(*grads)
        torch.cuda.set_sync_debug_mode("default")
        syncs = sorted({str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)})
    else:
        update(*grads)
    unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    state_unchanged = all(torch.equal(a[k], b[k]) for a, b in zip(optimizer.state.values(), state_before) for k in a)
    update(*gradients(1.0))
    moved = any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return {"device": device_type, "fused": fused, "params_unchanged_after_nan_step": unchanged,
            "optimizer_state_unchanged": state_unchanged, "finite_step_after_moves_params": moved,
            "skipped_counted": int(guard.total.item()), "host_syncs_in_flag_and_step": syncs,
            "passed": fused and unchanged and state_unchanged and moved and int(guard.total.item()) == 1
            and not syncs}


# ------------------------------------------------------------------------------------- 2. VGGT-1B
def run_1b(out: Path, scratch: Path, smoke: bool, budget: Budget) -> dict:
    recipe = REPO / "recipes" / ("cpu_tiny.yaml" if smoke else "a100_80g.yaml")
    run_dir = scratch / "vggt1b"
    steps = 3 if smoke else 4
    command = [sys.executable, "-m", "vggt_fsdp.cli", "train", str(recipe), *(SMOKE_1B if smoke else GPU_1B),
               *COMMON, f"train.max_steps={steps}", "train.checkpoint_every=0", f"train.output_dir={run_dir}"]
    code, seconds = _run(command, budget.left() - 5, out / "vggt1b.log")
    records = [r for r in _records(run_dir) if "val" not in r]
    from vggt_fsdp.train import checkpoint as ckpt

    checkpoints = [s for s, _ in ckpt.complete_checkpoints(run_dir / "checkpoints")]
    problems = ckpt.checkpoint_problems(run_dir / "checkpoints" / ckpt.step_dir_name(steps)) if checkpoints else None
    export = run_dir / "model.safetensors"
    last = records[-1] if records else {}
    result = {
        "command": " ".join(command[1:]), "exit_code": code, "wall_s": round(seconds, 1),
        "steps_logged": [r["step"] for r in records], "checkpoints": checkpoints,
        "checkpoint_problems": problems,
        "checkpoint_gib": round(sum(p.stat().st_size for p in (run_dir / "checkpoints").rglob("*") if p.is_file())
                                / 2**30, 2) if checkpoints else None,
        "export_gib": round(export.stat().st_size / 2**30, 2) if export.is_file() else None,
        "loss_first_last": [records[0]["loss"], last["loss"]] if records else None,
        "skipped_steps": last.get("skipped_steps"),
        "step_time_s_last": last.get("step_time_s"), "frames_per_s_last": last.get("frames_per_s"),
        "peak_allocated_gib_max": max((r["peak_allocated_gib"] or 0) for r in records) if records else None,
        "peak_reserved_gib_max": max((r["peak_reserved_gib"] or 0) for r in records) if records else None,
        "device_in_metrics": last.get("device"),
        "step_times_s": [r.get("step_time_s") for r in records],
    }
    result["passed"] = (code == 0 and result["steps_logged"] == list(range(1, steps + 1)) and checkpoints == [steps]
                        and problems == [] and export.is_file() and result["skipped_steps"] == 0
                        and (smoke or (result["device_in_metrics"] == "cuda" and result["peak_allocated_gib_max"])))
    shutil.rmtree(run_dir, ignore_errors=True)  # 15 GB of checkpoint on a GPU: nothing large leaves the machine
    return result


# ------------------------------------------------------------------------------------- 3. exact resume
def _stop_after(command: list[str], run_dir: Path, step: int, timeout: float, log: Path) -> tuple[int, int | None]:
    """Run `command`; once metrics.jsonl shows `step`, pause it, send SIGTERM, resume it (so the signal
    lands within the next step whatever the polling delay); returns (exit code, step signalled at)."""
    deadline = time.monotonic() + timeout
    signalled = None
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                seen = [r["step"] for r in _records(run_dir) if "step" in r]
                if signalled is None and seen and max(seen) >= step:
                    proc.send_signal(signal.SIGSTOP)
                    signalled = max(seen)
                    proc.send_signal(signal.SIGTERM)
                    proc.send_signal(signal.SIGCONT)
                time.sleep(0.02)
            code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -9
    return code, signalled


def run_resume(out: Path, scratch: Path, smoke: bool, budget: Budget) -> dict:
    import torch
    from safetensors.torch import load_file

    recipe = REPO / "recipes" / ("cpu_tiny.yaml" if smoke else "a100_80g.yaml")
    steps = 6
    policies = checkpoint_overrides(RESUME_POLICY_RECIPE)
    base = [sys.executable, "-c", DETERMINISTIC_TRAIN, str(recipe), *(SMOKE_MID if smoke else GPU_MID), *policies,
            *COMMON, f"train.max_steps={steps}", "train.checkpoint_every=0"]
    straight, resumed = scratch / "mid_straight", scratch / "mid_resumed"
    code_a, seconds_a = _run([*base, f"train.output_dir={straight}"], budget.left() / 3, out / "mid_straight.log")
    code_b1, at = _stop_after([*base, f"train.output_dir={resumed}"], resumed, 2, budget.left() / 2,
                              out / "mid_stopped.log")
    preempted = json.loads((resumed / "preempted.json").read_text()) if (resumed / "preempted.json").is_file() else None
    code_b2, _ = _run([*base, f"train.output_dir={resumed}"], budget.left() - 3, out / "mid_resumed.log")
    result = {"straight_exit": code_a, "straight_wall_s": round(seconds_a, 1), "stopped_exit": code_b1,
              "signalled_after_step": at, "preempted": preempted, "resumed_exit": code_b2,
              "checkpoint_policies": policies, "deterministic": "math SDPA kernel, deterministic algorithms"}
    exports = [straight / "model.safetensors", resumed / "model.safetensors"]
    if all(p.is_file() for p in exports):
        a, b = (load_file(str(p)) for p in exports)
        result["weights_bitwise_equal"] = all(torch.equal(a[k], b[k]) for k in a)
        result["weights_max_abs_diff"] = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        la = {r["step"]: r["loss"] for r in _records(straight)}
        lb = {r["step"]: r["loss"] for r in _records(resumed)}
        result["losses_straight"] = [la.get(s) for s in range(1, steps + 1)]
        result["losses_resumed"] = [lb.get(s) for s in range(1, steps + 1)]
        result["loss_max_abs_diff"] = max(abs(la[s] - lb[s]) for s in la if s in lb)
        result["metrics_steps_resumed"] = sorted(lb)
    result["passed"] = (code_a == code_b1 == code_b2 == 0 and preempted is not None and preempted["step"] < steps
                        and result.get("metrics_steps_resumed") == list(range(1, steps + 1))
                        and result.get("weights_max_abs_diff", 1.0) <= 1e-6
                        and result.get("loss_max_abs_diff", 1.0) <= 1e-6)
    for run_dir in (straight, resumed):
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------- the stage
# GPU estimates, to skip what cannot finish: VGGT-1B's launch and init, 4 steps, a 15 GB save and its
# checksum, the export; three vggt-mid runs of 6 steps in the math SDPA kernel.
NEEDS_S = {"fused_skip": 10, "vggt1b": 75, "resume_exact": 45}


def main(argv: list[str] | None = None) -> int:
    from benchmarks import session_ledger as ledger

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget-s", type=float, default=100.0)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: the same code paths")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    import torch

    device_type = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on the CPU", file=sys.stderr)
        return 2
    scratch_root = os.environ.get("GPU_SESSION_SCRATCH")
    scratch = Path(scratch_root) if scratch_root else Path(tempfile.mkdtemp(prefix="trainer_cuda-"))
    scratch.mkdir(parents=True, exist_ok=True)
    checks = {"fused_skip": lambda: check_fused_skip(device_type),
              "vggt1b": lambda: run_1b(args.out, scratch, args.smoke, budget),
              "resume_exact": lambda: run_resume(args.out, scratch, args.smoke, budget)}
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "smoke": args.smoke, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device_type == "cuda" else platform.processor() or "cpu",
              "commit": git_commit(),
              "budget_s": args.budget_s, "checks": {}}
    for name, check in checks.items():
        if ledger.skip_if_measured(args.out, name):
            report["checks"][name] = {"skipped": "passed in an earlier session at this code (ledger)"}
            continue
        if not args.smoke and budget.left() < NEEDS_S[name]:
            why = f"{budget.left():.0f} s of budget left, needs about {NEEDS_S[name]}"
            report["checks"][name] = {"skipped": why}
            ledger.record(args.out, name, ledger.OWED, why)
            continue
        started = time.perf_counter()
        try:
            report["checks"][name] = check()
        except Exception as err:  # a check's failure is recorded; the others still run
            report["checks"][name] = {"error": f"{type(err).__name__}: {err}", "passed": False}
        report["checks"][name]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"[trainer_cuda] {name}: {json.dumps(report['checks'][name])}", flush=True)
        _write(report, args.out)  # now: a kill keeps the checks that finished
        passed = report["checks"][name].get("passed")
        ledger.record(args.out, name, ledger.MEASURED if passed else ledger.FAILED,
                      None if passed else report["checks"][name].get("error", "check failed"))
    _write(report, args.out)
    if not scratch_root:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if any(c.get("passed") is False for c in report["checks"].values()) else 0


def _write(report: dict, out: Path) -> None:
    (out / "trainer_cuda.json").write_text(json.dumps(report, indent=2))
    (out / "summary.md").write_text(summary(report))


def summary(report: dict) -> str:
    kind = "CPU smoke run (tiny model; no GPU figure)" if report["smoke"] else f"GPU run on {report['device']}"
    lines = [f"### Trainer on CUDA: {kind}", "",
             f"{report['date']}, torch {report['torch']}, commit {report['commit']}; "
             "`python -m benchmarks.trainer_cuda` (benchmarks/gpu_stages/10_trainer_cuda.sh)", "",
             "| check | result | figures |", "| --- | --- | --- |"]
    for name, c in report["checks"].items():
        status = "skipped: " + c["skipped"] if "skipped" in c else ("passed" if c.get("passed") else "FAILED")
        if name == "fused_skip":
            figures = (f"fused={c.get('fused')}, NaN step left params {'un' if c.get('params_unchanged_after_nan_step') else ''}"
                       f"changed, host syncs: {c.get('host_syncs_in_flag_and_step') or 'none'}")
        elif name == "vggt1b":
            figures = (f"exit {c.get('exit_code')}, steps {c.get('steps_logged')}, checkpoint {c.get('checkpoint_gib')} GiB, "
                       f"export {c.get('export_gib')} GiB, peak allocated {c.get('peak_allocated_gib_max')} GiB, "
                       f"reserved {c.get('peak_reserved_gib_max')} GiB, last step {c.get('step_time_s_last')} s, "
                       f"{c.get('frames_per_s_last')} frames/s, {c.get('wall_s')} s in all")
        else:
            figures = (f"selective policies of a100_80g, deterministic (math SDPA); "
                       f"SIGTERM after step {c.get('signalled_after_step')}, saved at {(c.get('preempted') or {}).get('step')}; "
                       f"weights bitwise equal: {c.get('weights_bitwise_equal')} (max |dw| {c.get('weights_max_abs_diff')}), "
                       f"max |dloss| {c.get('loss_max_abs_diff')}")
        if "error" in c:
            figures = c["error"]
        lines.append(f"| {name} | {status} | {figures} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
