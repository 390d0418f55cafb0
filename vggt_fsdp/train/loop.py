"""The training loop: steps, accumulation, clipping, skipping, logging, checkpoints, validation.

`Trainer` is model-agnostic: it receives a prepared model, optimizer, scheduler and a `Task` (how to
draw a batch, compute the loss and describe the batch's size); `vggt_fsdp.train.build` assembles these
from a recipe. One optimizer step = `train.grad_accum_steps` micro-batches. The step keeps the host
ahead of the device: losses, norms and the non-finite flag stay on the device until a log step.

Nothing broken is kept: a checkpoint that falls due during a run of non-finite steps is postponed to the
first finite step, weights are checked finite before every save, and a run that ends inside a run of
non-finite steps saves and exports nothing and names the last good checkpoint (NonFiniteLossError).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn

from vggt_fsdp.train import checkpoint as ckpt
from vggt_fsdp.train.config import TrainConfig
from vggt_fsdp.train.faults import (PREEMPTED_EXIT_CODE, NonFiniteGuard, NonFiniteLossError, StepShape, StopSignal,
                                    is_oom)
from vggt_fsdp.train.integrity import NonFiniteWeightsError
from vggt_fsdp.train.metrics import (MetricsAccumulator, MetricsWriter, ProgressLine, memory_stats, peak_flops,
                                     sum_counts, truncate_metrics)
from vggt_fsdp.train.optim import ClipGroup, clip_grad_norms, total_norm


def log(text: str) -> None:
    """A line on stderr from rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[vggt-fsdp] {text}", file=sys.stderr, flush=True)


class Task(Protocol):
    """What the trainer needs to know about the data and the loss."""

    sampler: Any  # has state_dict()/load_state_dict(); saved in checkpoints (None: stateless)

    def batches(self) -> Iterator[Any]:
        """Training batches from the sampler's current position (called again after a resume)."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss to minimise, its terms for logging); the batch is already on the device."""

    def shape(self, batch: Any) -> StepShape:
        """Scenes, frames, image size and tokens of a batch (host-side, from shapes only)."""

    def to_device(self, batch: Any, device: torch.device) -> Any: ...

    # Optional: data_counts() -> {counter: {source: n}} since the run began on this rank (summed over
    # ranks into metrics.jsonl's "data"), e.g. frames served and bad frames skipped per source;
    # oom_report(step, shape) -> text: what to change after an out-of-memory error.


@dataclass
class RunOutcome:
    step: int
    preempted: bool = False
    last_checkpoint: Path | None = None

    @property
    def exit_code(self) -> int:
        return PREEMPTED_EXIT_CODE if self.preempted else 0


class Trainer:
    def __init__(self, cfg: TrainConfig, accelerator, model: nn.Module, optimizer, scheduler,
                 task: Task, clip: list[ClipGroup], device: torch.device, fused: bool,
                 static_metrics: dict[str, Any] | None = None, recipe=None,
                 validate: Callable[[int], dict[str, float]] | None = None):
        if accelerator.gradient_accumulation_steps != cfg.grad_accum_steps:
            # The Accelerator scales the loss and skips gradient syncs by its own count.
            raise ValueError(f"train.grad_accum_steps={cfg.grad_accum_steps} but the Accelerator was built "
                             f"with gradient_accumulation_steps={accelerator.gradient_accumulation_steps}")
        self.cfg = cfg
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer  # as prepared by the Accelerator
        self.scheduler = scheduler  # plain: stepped once per optimizer step by us
        self.task = task
        self.clip = clip
        self.device = device
        self.fused = fused
        self.recipe = recipe
        self.validate_fn = validate
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.state = ckpt.TrainState(step=0, scheduler=scheduler, sampler=getattr(task, "sampler", None),
                                     max_steps=cfg.max_steps, recipe=recipe)
        # Where the sharded parameters (and so the optimizer's found_inf input) live: the host with
        # parallel.sharding.cpu_offload, the compute device otherwise.
        state_device = next(model.parameters()).device
        self.guard = NonFiniteGuard(cfg.max_nonfinite_in_row, state_device)
        # With CPU offload every micro-batch's gradients go to the host, where FSDP2 adds them to the
        # offloaded ones: Accelerate's no_sync would keep the whole model's unsharded gradients on the
        # device between micro-batches, the memory offloading frees (memory/offload.py).
        self.sync_each_micro_batch = bool(recipe is not None and recipe.parallel.sharding.cpu_offload)
        self.acc = MetricsAccumulator(device)
        # MFU, an estimate: 6 FLOPs per trainable parameter and token (forward 2, backward 4; attention's
        # quadratic term and recompute left out) against the card's published bf16 peak, where known.
        self.flops_per_token = 6 * sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.peak_flops = peak_flops(device)
        self.static_metrics = {"world_size": self.world, **(static_metrics or {})}
        self.writer: MetricsWriter | None = None
        self.progress = ProgressLine(cfg.max_steps, cfg.progress_bar and self.rank == 0)
        self.last_shape: StepShape | None = None
        self.last_lr: float | None = None  # the lr of the latest optimizer step, for the log
        self.resumed_from: Path | None = None
        self.last_good: Path | None = None  # newest checkpoint written (or resumed) outside a non-finite run
        self._save_due = False  # a periodic checkpoint postponed by a run of non-finite steps

    # ------------------------------------------------------------------------------------ public
    def resume(self) -> Path | None:
        """Collective. Load the newest intact checkpoint `train.resume` allows (if any), then drop the
        metrics.jsonl records of steps after it: those steps run again."""
        path = ckpt.agreed_resume(self.cfg.resume, self.ckpt_root)
        if path is not None:
            notices = ckpt.load_checkpoint(path, self.model, self.optimizer_inner, self.state, self.device)
            self.resumed_from = self.last_good = path
            log(f"resumed from {path} at step {self.state.step}")
            for notice in notices:
                log(notice)
        if self.rank == 0:
            dropped = truncate_metrics(self.output_dir, self.state.step)
            if dropped:
                log(f"metrics.jsonl: {dropped} record(s) of steps after {self.state.step}, which run again, moved "
                    "to metrics-discarded.jsonl")
        return path

    @property
    def optimizer_inner(self) -> torch.optim.Optimizer:
        opt = self.optimizer
        while hasattr(opt, "optimizer"):  # AcceleratedOptimizer wraps the torch optimizer
            opt = opt.optimizer
        return opt

    def fit(self, stop: StopSignal | None = None) -> RunOutcome:
        cfg = self.cfg
        stop = stop or StopSignal()
        outcome = RunOutcome(step=self.state.step)
        if self.state.step >= cfg.max_steps:
            log(f"already at step {self.state.step} >= train.max_steps={cfg.max_steps}: nothing to train "
                "(raise train.max_steps, or train.resume=none / another train.output_dir to start over)")
            outcome.last_checkpoint = self.resumed_from
            return outcome
        if self.rank == 0:
            self.writer = MetricsWriter(self.output_dir, cfg.tensorboard, self.static_metrics, cfg.log_with)
        batches = self.task.batches()
        self.model.train()
        self.acc.reset()
        try:
            while self.state.step < cfg.max_steps:
                self._step(batches)
                step = self.state.step
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    self._log_step(step)
                if self.validate_fn is not None and cfg.val_every and step % cfg.val_every == 0:
                    with self.acc.excluded():
                        self._validate(step)
                if stop.should_stop():
                    outcome.last_checkpoint = self.save()
                    outcome.preempted = True
                    log(f"stopped by signal at step {step}; checkpoint {outcome.last_checkpoint}")
                    break
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                    self._save_due = True
                if self._save_due and step < cfg.max_steps:
                    if self._nonfinite_run() == 0:
                        with self.acc.excluded():
                            outcome.last_checkpoint = self.save()
                        self._save_due = False
                    elif step % cfg.checkpoint_every == 0:
                        log(f"checkpoint of step {step} postponed: the step was non-finite; it is written after "
                            "the next finite step")
            else:
                self._refuse_nonfinite_end()
                outcome.last_checkpoint = self.save()
        finally:
            self.progress.close()
            if self.writer is not None:
                self.writer.close()
        outcome.step = self.state.step
        return outcome

    def save(self) -> Path:
        """Collective. A checkpoint of the current state; raises NonFiniteLossError (nothing written)
        when the weights hold NaN or Inf."""
        in_row = self._nonfinite_run()
        try:
            path = ckpt.save_checkpoint(self.ckpt_root, self.model, self.optimizer_inner, self.state,
                                        self.device, self.cfg.keep_last, info={"nonfinite_in_row": in_row})
        except NonFiniteWeightsError as err:
            raise NonFiniteLossError(f"{err}. {self.last_good_text()}") from None
        if in_row == 0:
            self.last_good = path
        log(f"checkpoint {path}" + (f" (saved inside a run of {in_row} non-finite steps)" if in_row else ""))
        return path

    def last_good_text(self) -> str:
        if self.last_good is None:
            return "No good checkpoint exists from this run (train.checkpoint_every sets how often they are written)"
        return (f"The last good checkpoint is {self.last_good}; after fixing the cause, resume from it with "
                f"train.resume={self.last_good}")

    def _nonfinite_run(self) -> int:
        """Host sync: the current run of consecutive non-finite steps (save time only)."""
        return int(self.guard.run.item())

    def _refuse_nonfinite_end(self) -> None:
        in_row = self._nonfinite_run()
        if in_row:
            first = self.state.step - in_row + 1
            raise NonFiniteLossError(
                f"the run ended inside {in_row} non-finite step(s) in a row (steps {first}-{self.state.step}; "
                f"train.max_nonfinite_in_row={self.cfg.max_nonfinite_in_row}): their updates were skipped, and "
                f"the final state is neither saved nor exported. {self.last_good_text()}")

    # ------------------------------------------------------------------------------------ one step
    def _step(self, batches: Iterator[Any]) -> None:
        try:
            self._train_step(batches)
        except RuntimeError as err:
            report = getattr(self.task, "oom_report", None)  # the task's advice (VGGT: the recipe's)
            if is_oom(err) and report is not None:
                print(f"[vggt-fsdp rank {self.rank}] " + report(self.state.step + 1, self.last_shape),
                      file=sys.stderr, flush=True)
            raise

    def _train_step(self, batches: Iterator[Any]) -> None:
        accel, task = self.accelerator, self.task
        loss_sum = torch.zeros((), device=self.device)
        term_sums: dict[str, torch.Tensor] = {}
        frames = tokens = 0
        data_wait = 0.0
        for _ in range(self.cfg.grad_accum_steps):
            t0 = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t0
            self.last_shape = shape = task.shape(batch)
            frames, tokens = frames + shape.frames, tokens + shape.tokens
            batch = task.to_device(batch, self.device)
            with contextlib.nullcontext() if self.sync_each_micro_batch else accel.accumulate(self.model):
                loss, terms = task.loss(self.model, batch)
                accel.backward(loss)
            loss_sum += loss.detach().float()
            for key, value in terms.items():
                term_sums[key] = term_sums.get(key, 0) + value.detach().float()

        norms = clip_grad_norms(self.clip, accel.clip_grad_norm_)
        grad_norm = total_norm(norms)
        global_loss = loss_sum / self.cfg.grad_accum_steps
        if self.world > 1:
            # Every rank must take the same skip decision; the all-reduce runs on the device stream.
            dist.all_reduce(global_loss)
            global_loss /= self.world
        skip = self.guard.flag(global_loss, grad_norm)
        self._optimizer_step(skip)
        self.last_lr = self.scheduler.get_last_lr()[0]  # the lr this step used
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

        values = {"loss": global_loss}
        values.update({f"loss_terms.{k}": v / self.cfg.grad_accum_steps for k, v in term_sums.items()})
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
            values.update({f"grad_norm.{k}": v for k, v in norms.items()})
        self.acc.add_step(values, frames * self.world, tokens * self.world, data_wait)

    def _optimizer_step(self, skip: torch.Tensor) -> None:
        if self.fused:
            # Fused AdamW leaves parameters, moments and step counts untouched where found_inf is 1,
            # deciding on the device: no host sync.
            self.optimizer_inner.found_inf = skip
            self.optimizer.step()
        elif not bool(skip.item()):  # the unfused path must ask the host (one sync per step)
            self.optimizer.step()

    # ------------------------------------------------------------------------------------ logging
    def _log_step(self, step: int) -> None:
        try:
            total_skipped = self.guard.check(step)  # raises after too many non-finite steps in a row
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"{err}. {self.last_good_text()}") from None
        means = self.acc.means(reduce_keys=tuple(k for k in self.acc.sums if k.startswith("loss_terms.")))
        elapsed = time.perf_counter() - self.acc.started
        n = max(self.acc.steps, 1)
        record: dict[str, Any] = {
            "step": step,
            "loss": means.get("loss"),
            "loss_terms": {k.split(".", 1)[1]: v for k, v in means.items() if k.startswith("loss_terms.")},
            "lr": self.last_lr,
            "grad_norm": means.get("grad_norm"),
            "grad_norm_groups": {k.split(".", 1)[1]: v for k, v in means.items() if k.startswith("grad_norm.")},
            "skipped_steps": total_skipped,
            "step_time_s": elapsed / n,
            "data_wait_s": self.acc.data_wait / n,
            "frames_per_s": self.acc.frames / elapsed,
            "tokens_per_s": self.acc.tokens / elapsed,
            "mfu": (self.flops_per_token * self.acc.tokens / elapsed / self.world / self.peak_flops
                    if self.peak_flops else None),
            **memory_stats(self.device),
        }
        counts = getattr(self.task, "data_counts", None)
        if counts is not None:
            record["data"] = sum_counts(counts(), self.device)
        self.acc.reset()
        if self.rank == 0:
            self.writer.write(record)
            self.progress.update(record)

    def _validate(self, step: int) -> None:
        self.model.eval()
        try:
            results = self.validate_fn(step)
        finally:
            self.model.train()
        if self.rank == 0 and results:
            self.writer.write({"step": step, "val": results})
            log("validation at step {}: {}".format(
                step, ", ".join(f"{k} {v:.4f}" for k, v in results.items())))
