"""From a recipe to a ready `Trainer`: accelerator, sharded model, weights, optimizer, data.

Order matters and is the point of this module:
1. the Accelerator (it creates the process group), the output directory's lock (rank 0, lock.py) and
   the seed;
2. the recipe's task (vggt_fsdp/tasks: the built-in VGGT one or `task: MODULE:CALLABLE`) and its model,
   built on the meta device (no memory); rank 0's preflight checks the recipe against it and the
   filesystem (preflight.py, and the task's own checks); the task's pre-sharding step (VGGT: freezing);
3. `prepare_model`: checkpoint wrappers and FSDP2 sharding, still on meta;
4. the task materialises only each rank's shards on the device and initialises them, then loads its
   initial weights, if any (VGGT: rank 0 reads the file and streams it to the other ranks' shards with
   `set_model_state_dict(broadcast_from_rank0=True)`, so no other rank ever holds the full model);
5. optimizer over the sharded parameters, then `prepare_optimizer` (the Accelerate bridge);
6. the task's data, loss and validation. The trainer knows no particular model.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vggt_fsdp.parallel import prepare_optimizer
from vggt_fsdp.train.loop import Trainer, log
from vggt_fsdp.train.optim import build_optimizer, build_scheduler, clip_groups


PREEMPTED_MARKER = "preempted.json"  # in output_dir after a run stopped by SIGTERM saved its checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


@dataclass
class Built:
    trainer: Trainer
    accelerator: Any
    model: nn.Module
    notices: list[str]


def build_trainer(recipe, lock=None) -> Built:
    """`lock`: a lock.RunLock on train.output_dir, taken by rank 0 before anything is written there."""
    from vggt_fsdp.parallel import build_accelerator, prepare_model
    from vggt_fsdp.parallel.accelerate import topology_notice
    from vggt_fsdp.tasks import build_task, preflight
    from vggt_fsdp.train.faults import rank0_decides
    from vggt_fsdp.train.lock import LockError
    from vggt_fsdp.train.preflight import PreflightError, check

    cfg = recipe.train
    # Prints the topology notice (launcher's process count against the recipe's) on rank 0.
    accelerator = build_accelerator(recipe, gradient_accumulation_steps=cfg.grad_accum_steps)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if lock is not None:
        rank0_decides(lambda: lock.acquire().took_over, (LockError, OSError))
        if lock.took_over:
            log(lock.took_over)
    notices = [n for n in (topology_notice(recipe.accelerate, world),) if n]
    seed_everything(cfg.seed)  # identical on every rank: the same initial model everywhere

    task = build_task(recipe)  # its model on the meta device (or, built on the CPU, the same on every rank)
    model = task.model
    rank0_decides(lambda: check(preflight(recipe, task, cuda=device.type == "cuda", check_lock=False)),
                  (PreflightError,))
    task.before_sharding()
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    plan = prepare_model(accelerator, model, recipe.parallel)
    task.materialize(model, device)  # each rank's shards allocated, initialised, initial weights loaded

    optimizer = build_optimizer(model, recipe.optim, device.type)
    fused = bool(optimizer.defaults["fused"])  # as built: the trainer's skip path must match it
    scheduler = build_scheduler(optimizer, recipe.schedule, recipe.optim.lr, cfg.max_steps)
    model, optimizer = prepare_optimizer(accelerator, model, optimizer)
    seed_everything(cfg.seed + rank)  # per-rank streams from here on (saved in checkpoints)

    started = task.start(model, device, rank, world)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    static = {
        "sharding": recipe.parallel.sharding.mode,
        "reshard_after_forward": recipe.parallel.sharding.reshard_after_forward,
        "param_dtype": recipe.parallel.precision.param_dtype,
        "checkpoint_policy": recipe.parallel.checkpoint.policy,
        "checkpoint_groups": {k: v.policy for k, v in recipe.parallel.checkpoint.groups.items()},
        "fsdp_units": len(plan.units),
        **started.static,
        "grad_accum_steps": cfg.grad_accum_steps,
    }
    log(f"{task.name}: {trainable:,} trainable parameters ({frozen:,} frozen), "
        f"{len(plan.units)} FSDP units over {world} {device.type} process(es), "
        f"{'fused' if fused else 'foreach'} AdamW, output {cfg.output_dir}")
    trainer = Trainer(cfg, accelerator, model, optimizer, scheduler, started.task,
                      clip_groups(model, recipe.optim.clip_groups), device, fused,
                      static_metrics=static, recipe=recipe, validate=started.validate)
    return Built(trainer, accelerator, model, notices)


def run(recipe) -> int:
    """Train a recipe in this process (one rank of whatever the launcher started); returns the exit code.

    Every rank reports the error it meets itself (faults.report_failure). The expected failures (a
    refused recipe, a directory in use, a damaged checkpoint, non-finite weights or losses, bad data)
    end with code 1 and no traceback; a stop signal before training began ends the process with code 0
    (faults.stop_during_startup), an error after such a signal too (it is the stop's consequence).
    """
    from vggt_fsdp.data import DataError
    from vggt_fsdp.train.checkpoint import CheckpointError
    from vggt_fsdp.tasks import TaskError
    from vggt_fsdp.train.faults import (EXIT_FAILED, STOPPED, NonFiniteLossError, forget_early_exit,
                                        on_early_exit, report_failure, stop_during_startup, stop_if_signalled)
    from vggt_fsdp.train.lock import LockError, RunLock
    from vggt_fsdp.train.preflight import PreflightError

    stop_during_startup()  # until the training loop takes SIGTERM over
    lock = RunLock(recipe.train.output_dir)

    def early_exit(why: str) -> None:  # faults ends the process: a start-up stop, or the launcher gone
        said = (lambda: _report_preempted(recipe, lock, step=None, checkpoint=None)) if why == STOPPED else None
        lock.close(last_words=said)

    on_early_exit(early_exit)
    try:
        return _train(recipe, lock)
    except (PreflightError, LockError, CheckpointError, NonFiniteLossError, DataError, TaskError) as err:
        stop_if_signalled()
        report_failure(err)
        return EXIT_FAILED
    except Exception as err:
        stop_if_signalled()
        report_failure(err)
        raise
    finally:
        forget_early_exit(early_exit)
        lock.release()


def _report_preempted(recipe, lock, step: int | None, checkpoint: Path | None) -> None:
    """Rank 0: preempted.json in output_dir, only while holding its lock."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    if lock.holder is not None:
        info = json.dumps({"step": step, "checkpoint": str(checkpoint) if checkpoint else None})
        (Path(recipe.train.output_dir) / PREEMPTED_MARKER).write_text(info)


def _train(recipe, lock) -> int:
    from vggt_fsdp.train import checkpoint as ckpt
    from vggt_fsdp.train import faults
    from vggt_fsdp.train.faults import FINISHED, PREEMPTED, write_status

    built = build_trainer(recipe, lock)
    trainer = built.trainer
    out = Path(recipe.train.output_dir)
    if trainer.rank == 0:
        with faults.early_exit_held():  # an early exit's own marker (written by another thread) must stay
            (out / PREEMPTED_MARKER).unlink(missing_ok=True)  # only this run's preemption may be reported
    trainer.resume()
    if trainer.rank == 0:  # after the resume: the recipe in effect, and what changed (resume_check.py)
        from vggt_fsdp.recipe import dump_recipe
        from vggt_fsdp.train.resume_check import record_recipe
        record_recipe(out, dump_recipe(recipe), trainer.resumed_from, trainer.state.step, trainer.state.recipe_changes)
    outcome = trainer.fit()
    if outcome.preempted:
        _report_preempted(recipe, lock, outcome.step, outcome.last_checkpoint)
        write_status(PREEMPTED, outcome.step, outcome.last_checkpoint)
    if not outcome.preempted and recipe.train.export_final and outcome.last_checkpoint is not None:
        if trainer.rank == 0:
            # Just written and checksummed, weights checked finite: export_safetensors checks them again.
            count = ckpt.export_safetensors(outcome.last_checkpoint, out / "model.safetensors", verify=False)
            log(f"exported {count} tensors to {out / 'model.safetensors'}")
    if dist.is_initialized():
        dist.barrier()
    if not outcome.preempted:  # for `vggt-fsdp train`: a signal that came during the export stopped nothing
        write_status(FINISHED, outcome.step, outcome.last_checkpoint)
    built.accelerator.end_training()
    return outcome.exit_code
