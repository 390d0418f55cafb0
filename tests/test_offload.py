"""CPU offload on one process: the single-GPU recipes' settings trained with the trainer, resumed exactly,
and the planner's host and device terms against FSDPMemTracker.

On the CPU, FSDP2's CPUOffloadPolicy runs the same code as on a GPU (sharding, the unshard copies, the
gradients' copy to the host and their accumulation there, the optimizer on the host's tensors, DCP
checkpoints of host tensors); only the copies cost nothing, since host and device are one memory.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from processes import finish, start

from vggt_fsdp.memory import offload, planner
from vggt_fsdp.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "gpu24g_single.yaml")
# gpu24g_single's settings (one process, CPU offload, its precision, checkpointing, heads, freezing and
# gradient accumulation) on the tiny model, the synthetic source and small shapes, on the CPU.
TINY = ["model.preset=vggt-tiny", "accelerate.use_cpu=true", "hardware.device=null", "data.source=synthetic",
        "data.root=null", "data.image_width=56", "data.frames_range=[2,3]", "data.frames_per_gpu=3", "data.num_workers=0",
        "train.grad_accum_steps=2", "train.log_every=1", "train.progress_bar=false", "train.val_every=0",
        "schedule.warmup_steps=1", "train.checkpoint_every=2", "train.keep_last=3"]


def _start(out: Path, *overrides: str, **extra_env: str) -> subprocess.Popen:
    """One training process (one core: OMP_NUM_THREADS=1), so two can run side by side."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra_env)
    return start([sys.executable, "-m", "vggt_fsdp.train", RECIPE, *TINY, f"train.output_dir={out}", *overrides],
                 env)


def _finish(proc: subprocess.Popen, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    result = finish(proc, timeout)
    assert result.returncode == 0 or not check, result.stderr[-4000:]
    return result


def test_recipe_offloads_on_one_process():
    recipe = load_recipe(RECIPE, TINY)
    assert recipe.parallel.sharding.cpu_offload and recipe.accelerate["num_processes"] == 1
    assert recipe.train.grad_accum_steps == 2  # the recipe's own count is overridden for the test


def test_offloaded_training_resumes_exactly(tmp_path):
    """4 optimizer steps of 2 micro-batches straight, against a run killed while saving step 4 and
    resumed from its step-2 checkpoint: the same losses and the same exported weights (the offloaded
    parameters and AdamW state, the RNG and the sampler all come back from the checkpoint)."""
    from safetensors.torch import load_file

    from vggt_fsdp.train.metrics import read_metrics

    straight = _start(tmp_path / "a", "train.max_steps=4")
    killing = _start(tmp_path / "b", "train.max_steps=4", VGGT_FSDP_CRASH_IN_SAVE="4")
    _finish(straight)
    assert _finish(killing, check=False).returncode != 0
    resumed = _finish(_start(tmp_path / "b", "train.max_steps=4"))
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "val" not in r}
    b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "val" not in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a == b  # bitwise: one process, the same operations in the same order
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_host_and_device_terms_match_fsdp_mem_tracker():
    """The host plan's states are exactly FSDPMemTracker's sharded parameters, gradients and optimizer
    state of a step with the recipe's settings; the device plan holds none of them, and offloading
    lowers every phase before the optimizer step by exactly those bytes."""
    from vggt_fsdp.memory.measure import measure_step

    recipe = load_recipe(RECIPE, TINY)
    shape = planner.recipe_shape(recipe, image_hw=(56, 56))
    measured = measure_step(shape.model_cfg, recipe.parallel, 1, 1, 3, (56, 56), "cpu", freeze=shape.freeze)
    state = measured.model_state
    units = planner.unit_layout(shape.model_cfg, recipe.parallel, shape.freeze)
    host = {t.name: t.bytes for t in offload.host_plan(units, 1, fused=True, pinned=False, num_workers=0).terms}
    assert host["sharded parameters (fp32)"] == state.sharded_params
    assert host["sharded gradients (fp32)"] == state.sharded_grads
    assert host["AdamW state (fp32 exp_avg, exp_avg_sq, step)"] == state.optimizer_state

    kwargs = dict(frames_range=(3, 3), freeze=shape.freeze, gpus_per_node=1)
    offloaded = planner.plan(shape.model_cfg, recipe.parallel, 1, 3, (56, 56), "cuda", **kwargs)
    import dataclasses
    on_device = dataclasses.replace(recipe.parallel, sharding=dataclasses.replace(recipe.parallel.sharding,
                                                                                  cpu_offload=False))
    resident = planner.plan(shape.model_cfg, on_device, 1, 3, (56, 56), "cuda", **kwargs)
    assert offloaded.total("state") == resident.total("state") - state.sharded_params - state.optimizer_state
    assert offloaded.total("grads") == 0
    states = state.sharded_params + state.optimizer_state
    for phase in ("end of forward", "first head backward"):
        assert resident.phases[phase] - offloaded.phases[phase] == states, phase
