"""From a recipe to a ready `Trainer`: accelerator, sharded model, weights, optimizer, data.

Order matters and is the point of this module:
1. the Accelerator (it creates the process group), the output directory's lock (rank 0, lock.py) and
   the seed;
2. the model built on the meta device (no memory); rank 0's preflight checks the recipe against it
   and the filesystem (preflight.py); frozen parameters marked;
3. `prepare_model`: checkpoint wrappers and FSDP2 sharding, still on meta;
4. materialise only each rank's shards on the device and initialise them;
5. initial weights, if any: rank 0 reads the file and streams it to the other ranks' shards
   (`set_model_state_dict(broadcast_from_rank0=True)`), so no other rank ever holds the full model;
6. optimizer over the sharded parameters, then `prepare_optimizer` (the Accelerate bridge).
"""
from __future__ import annotations

import fnmatch
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vggt_fsdp.parallel import prepare_optimizer
from vggt_fsdp.train.faults import StepShape
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


def freeze(model: nn.Module, patterns: list[str]) -> int:
    """requires_grad=False for parameters whose name matches any fnmatch pattern; returns how many.
    A pattern that matches nothing is an error (a typo would otherwise train what it meant to freeze),
    unless it names a disabled head."""
    from vggt_fsdp.train.preflight import disabled_modules, names_disabled

    names = [name for name, _ in model.named_parameters()]
    frozen = 0
    for pattern in patterns:
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits and not names_disabled(pattern, disabled_modules(model)):
            prefixes = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"model.freeze: pattern {pattern!r} matches no parameter; parameter names "
                             f"start with {prefixes} (e.g. 'aggregator.patch_embed.*')")
        for name, param in model.named_parameters():
            if name in hits and param.requires_grad:
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen


class InitWeightsError(RuntimeError):
    pass


def load_initial_weights(model: nn.Module, path: str) -> None:
    """Load an upstream .pt/.safetensors into the already sharded model.

    Only rank 0 reads the file; `set_model_state_dict(full_state_dict, broadcast_from_rank0)` sends
    each tensor to the other ranks, which keep just their shard. Names are checked strictly on rank 0
    first (a disabled head's tensors in the file are dropped and reported), then that the tensors are
    finite, and every rank raises the same error when either fails.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from vggt_fsdp.model.weights import compare_state_dict, read_state_dict
    from vggt_fsdp.train.integrity import describe_names, nonfinite_names

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    state, message, ignored = {}, None, 0
    if rank0:
        report, state = compare_state_dict(model, read_state_dict(path), ignore_disabled_heads=True)
        message = None if report.ok else f"weights {path} do not match the model: {report.describe()}"
        bad = nonfinite_names(state.items(), collective=False) if report.ok else []
        if bad:
            message = (f"model.init_weights {path} holds NaN or Inf in {describe_names(bad)}; training from it "
                       "would only produce non-finite losses: use an intact file")
        ignored = len(report.ignored)
    if dist.is_initialized():
        box = [message, ignored]
        dist.broadcast_object_list(box, src=0)
        message, ignored = box
    if message is not None:  # raised on every rank, so none waits in the broadcast below
        raise InitWeightsError(message)
    set_model_state_dict(model, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=dist.is_initialized(), strict=True))
    log(f"initial weights from {path}" + (f" ({ignored} tensors of disabled heads ignored)" if ignored else ""))


class VGGTTask:
    """Batches from helper D's loader, VGGT forward and `compute_loss`."""

    def __init__(self, loader, loss_cfg, patch_size: int, special_tokens: int, tracks: bool):
        self.sampler = loader  # SceneLoader: state_dict() is the position after the last batch consumed
        self.loader, self.loss_cfg = loader, loss_cfg
        # No autocast here: the sharded model's forward carries the recipe's precision (input casts, and
        # autocast where parallel.precision.autocast asks for it: parallel/precision.py). The loss runs
        # outside it, in fp32.
        self.patch_size, self.special_tokens, self.tracks = patch_size, special_tokens, tracks

    def batches(self):
        return iter(self.loader)

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        query = batch.get("query_points") if self.tracks else None
        return model(batch["images"], query_points=query)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        from vggt_fsdp.losses import compute_loss

        return compute_loss(self.predict(model, batch), batch, self.loss_cfg)

    def shape(self, batch: dict[str, torch.Tensor]) -> StepShape:
        b, s, _, h, w = batch["images"].shape
        per_frame = (h // self.patch_size) * (w // self.patch_size) + self.special_tokens
        return StepShape(scenes=b, frames_per_scene=s, height=h, width=w, tokens=b * s * per_frame)

    def to_device(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        from vggt_fsdp.data import move_batch

        return move_batch(batch, device)

    def data_counts(self) -> dict[str, dict[str, int]]:
        return self.loader.data_counts()


def fit_frames_per_gpu(recipe, world: int, device_bytes: int, gpus_per_node: int) -> int:
    """The largest frames per GPU the memory planner fits in `device_bytes` (worst scene split of
    data.frames_range at the tallest aspect); raises when not even the largest scene fits."""
    from vggt_fsdp.memory.planner import resolve_frames_per_gpu

    return resolve_frames_per_gpu(recipe, device_bytes, "cuda", gpus=world, gpus_per_node=gpus_per_node)


def frames_per_gpu(recipe, device: torch.device, world: int) -> int:
    value = recipe.data.frames_per_gpu
    if value != "auto":
        return value
    if device.type != "cuda":
        raise ValueError("data.frames_per_gpu=auto plans GPU memory and needs a CUDA device; on "
                         f"{device.type} set data.frames_per_gpu=N")
    gpus_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
    total = torch.cuda.get_device_properties(device).total_memory
    frames = torch.tensor(fit_frames_per_gpu(recipe, world, total, gpus_per_node), device=device)
    if dist.is_initialized():  # every rank must take the same batch shapes: the smallest GPU decides
        dist.all_reduce(frames, op=dist.ReduceOp.MIN)
    log(f"data.frames_per_gpu=auto: the memory planner fits {int(frames)} frames per GPU")
    return int(frames)


@dataclass
class Built:
    trainer: Trainer
    accelerator: Any
    model: nn.Module
    notices: list[str]


def build_trainer(recipe, lock=None) -> Built:
    """`lock`: a lock.RunLock on train.output_dir, taken by rank 0 before anything is written there."""
    from vggt_fsdp.data import build_dataloader
    from vggt_fsdp.model import build_model, materialize
    from vggt_fsdp.parallel import build_accelerator, prepare_model
    from vggt_fsdp.parallel.accelerate import topology_notice
    from vggt_fsdp.parallel.materialize import one_process_init
    from vggt_fsdp.recipe import model_config
    from vggt_fsdp.train import preflight
    from vggt_fsdp.train.faults import rank0_decides
    from vggt_fsdp.train.lock import LockError

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

    model_cfg = model_config(recipe.model)
    model = build_model(model_cfg, device="meta")
    rank0_decides(lambda: preflight.check(recipe, model, cuda=device.type == "cuda", check_lock=False),
                  (preflight.PreflightError,))
    frozen = freeze(model, recipe.model.freeze)
    plan = prepare_model(accelerator, model, recipe.parallel)
    # As one process would with rank 0's random state, each rank keeping its shards (on the CPU, DTensor
    # alone draws every shard of a weight from the same local generator state: repeated rows).
    with one_process_init(device):
        materialize(model, device)
    if recipe.model.init_weights:
        load_initial_weights(model, recipe.model.init_weights)

    optimizer = build_optimizer(model, recipe.optim, device.type)
    fused = bool(optimizer.defaults["fused"])  # as built: the trainer's skip path must match it
    scheduler = build_scheduler(optimizer, recipe.schedule, recipe.optim.lr, cfg.max_steps)
    model, optimizer = prepare_optimizer(accelerator, model, optimizer)
    seed_everything(cfg.seed + rank)  # per-rank streams from here on (saved in checkpoints)

    budget = frames_per_gpu(recipe, device, world)
    loader = build_dataloader(recipe.data, rank=rank, world_size=world, split="train",
                              frames_per_gpu=budget, pin_memory=device.type == "cuda")
    agg = model_cfg.aggregator
    task = VGGTTask(loader, recipe.loss, agg.patch_size, 1 + agg.num_register_tokens,
                    tracks=bool(recipe.model.heads.track))

    validate = None
    if cfg.val_every:
        from vggt_fsdp.train.validation import Validator

        validate = Validator(recipe, model, task, device, rank, world, budget)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    static = {
        "sharding": recipe.parallel.sharding.mode,
        "reshard_after_forward": recipe.parallel.sharding.reshard_after_forward,
        "param_dtype": recipe.parallel.precision.param_dtype,
        "checkpoint_policy": recipe.parallel.checkpoint.policy,
        "checkpoint_groups": {k: v.policy for k, v in recipe.parallel.checkpoint.groups.items()},
        "checkpoint_heads": recipe.parallel.checkpoint.heads,
        "fsdp_units": len(plan.units),
        "frames_per_gpu": budget,
        "grad_accum_steps": cfg.grad_accum_steps,
    }
    log(f"{model_cfg_name(recipe)}: {trainable:,} trainable parameters ({frozen:,} frozen), "
        f"{len(plan.units)} FSDP units over {world} {device.type} process(es), "
        f"{'fused' if fused else 'foreach'} AdamW, output {cfg.output_dir}")
    trainer = Trainer(cfg, accelerator, model, optimizer, scheduler, task,
                      clip_groups(model, recipe.optim.clip_groups), device, fused,
                      static_metrics=static, recipe=recipe, validate=validate)
    return Built(trainer, accelerator, model, notices)


def model_cfg_name(recipe) -> str:
    return recipe.model.preset + (" (+overrides)" if recipe.model.overrides else "")


def run(recipe) -> int:
    """Train a recipe in this process (one rank of whatever the launcher started); returns the exit code.

    Every rank reports the error it meets itself (faults.report_failure). The expected failures (a
    refused recipe, a directory in use, a damaged checkpoint, non-finite weights or losses, bad data)
    end with code 1 and no traceback; a stop signal before training began ends the process with code 0
    (faults.stop_during_startup), an error after such a signal too (it is the stop's consequence).
    """
    from vggt_fsdp.data import DataError
    from vggt_fsdp.train.checkpoint import CheckpointError
    from vggt_fsdp.train.faults import (EXIT_FAILED, STOPPED, NonFiniteLossError, forget_early_exit,
                                        on_early_exit, report_failure, stop_during_startup, stop_if_signalled)
    from vggt_fsdp.train.lock import LockError, RunLock
    from vggt_fsdp.train.preflight import PreflightError

    stop_during_startup()  # until the training loop takes SIGTERM over
    lock = RunLock(recipe.train.output_dir)

    def early_exit(why: str) -> None:  # faults ends the process: a start-up stop, or the launcher gone
        if why == STOPPED:
            _report_preempted(recipe, lock, step=None, checkpoint=None)
        lock.close()

    on_early_exit(early_exit)
    try:
        return _train(recipe, lock)
    except (PreflightError, LockError, CheckpointError, NonFiniteLossError, InitWeightsError, DataError) as err:
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
    from vggt_fsdp.train.faults import FINISHED, PREEMPTED, write_status

    built = build_trainer(recipe, lock)
    trainer = built.trainer
    out = Path(recipe.train.output_dir)
    if trainer.rank == 0:
        from vggt_fsdp.recipe import dump_recipe
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
        (out / PREEMPTED_MARKER).unlink(missing_ok=True)  # only this run's preemption may be reported
    trainer.resume()
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
