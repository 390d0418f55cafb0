"""What the trainer does when things go wrong: preemption, non-finite losses, out of memory.

- SIGTERM (preemption, `scancel`, a launcher stopping the job): during start-up (imports, building,
  loading weights, resuming) it ends the process at once with code 0: nothing was trained, so nothing
  is saved. Once training runs, the handler only sets a flag; at the next step boundary all ranks
  agree (a MAX over a CPU gloo group, which never waits for the GPU), save a checkpoint and exit with
  code 0. A second SIGTERM during that save is ignored.
- A non-finite loss or gradient norm: the optimizer update is skipped on every rank. With fused AdamW
  the skip happens on the device (the optimizer's `found_inf` input), so no host sync is needed and the
  count of skipped steps in a row is checked at the next log step; the run aborts with
  `NonFiniteLossError` when it reaches `train.max_nonfinite_in_row`.
- Out of memory: the step's frames, tokens and the recipe settings that reduce memory are printed,
  then the error is re-raised (the run ends; nothing is retried behind the user's back).
- Any error: the rank that raised it prints it at once (`report_failure`), so a peer's later
  "connection closed" in a collective is never the only message; decisions taken on rank 0 (lock,
  preflight, checkpoint choice) reach every rank as the same error (`rank0_decides`).
"""
from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 0  # a preempted run that saved its checkpoint ended as intended
T = TypeVar("T")


class NonFiniteLossError(RuntimeError):
    pass


class StartupInterrupted(BaseException):
    """A stop signal arrived before training began (BaseException: no `except Exception` swallows it)."""


# The stop signal received during start-up. The exception the handler raises can be swallowed when it
# lands in code that ignores exceptions (a __del__, a weakref callback); StopSignal then honours it.
_startup_signal: int | None = None


def _raise_startup(signum, frame) -> None:
    global _startup_signal
    _startup_signal = signum
    raise StartupInterrupted(signum)


def stop_during_startup(signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
    """Until `StopSignal` takes over, `signals` raise StartupInterrupted. A process that blocked them
    first (`signal.pthread_sigmask`, before its slow imports) receives a pending one now."""
    global _startup_signal
    _startup_signal = None
    for sig in signals:
        signal.signal(sig, _raise_startup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(signals))


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def report_failure(err: BaseException) -> None:
    """This rank's error on stderr at once: when it leaves a collective, its peers fail with a
    connection error, which must not be the only message. An error that `rank0_decides` passed on is
    reported by rank 0 alone."""
    if getattr(err, "decided_by_rank0", False) and _rank() != 0:
        return
    print(f"[vggt-fsdp rank {_rank()}] error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)


def rank0_decides(decide: Callable[[], T], errors: tuple[type[Exception], ...]) -> T:
    """Collective: rank 0 calls `decide()`; its result, or the error of one of `errors` it raised, reaches
    every rank (which raises it too: none is left waiting in a collective)."""
    box: list[Any] = [None, None]
    if _rank() == 0:
        try:
            box[0] = decide()
        except errors as err:
            box[1] = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        box[1].decided_by_rank0 = True
        raise box[1]
    return box[0]


class StopSignal:
    """`signals` (SIGTERM by default; SIGINT keeps its KeyboardInterrupt) -> stop at the next step
    boundary, agreed across ranks. Creating it ends the start-up handling of `stop_during_startup`."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.received: int | None = None
        self._group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            # A CPU group: agreeing on the flag must not wait for queued GPU work.
            self._group = dist.new_group(backend="gloo")
        for sig in signals:
            signal.signal(sig, self._handle)
        if _startup_signal is not None:  # received during start-up, its exception swallowed: stop now
            raise StartupInterrupted(_startup_signal)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            print(f"[vggt-fsdp] received signal {signum}: saving a checkpoint at the next step boundary",
                  file=sys.stderr, flush=True)

    def should_stop(self) -> bool:
        """Collective over all ranks: True when any rank was signalled."""
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())


class NonFiniteGuard:
    """Device-side bookkeeping of skipped (non-finite) steps.

    `flag(loss, grad_norm)` returns a float tensor 1.0/0.0 on the device, identical on every rank
    (the loss is summed over ranks first, the norm already is global); the caller feeds it to the
    optimizer as `found_inf`. Counters stay on the device until `check()` reads them at a log step.
    """

    def __init__(self, max_in_row: int, device: torch.device):
        self.max_in_row = max_in_row
        self.run = torch.zeros((), device=device)  # current run of consecutive skipped steps
        self.worst_run = torch.zeros((), device=device)  # longest run since the last check
        self.total = torch.zeros((), device=device)

    def flag(self, global_loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
        bad = (~torch.isfinite(global_loss.detach().float())).to(self.run.device)
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm.detach().float()).to(self.run.device)
        bad = bad.float()
        self.run.mul_(bad).add_(bad)  # run = (run + 1) if bad else 0
        torch.maximum(self.worst_run, self.run, out=self.worst_run)
        self.total.add_(bad)
        return bad

    def check(self, step: int) -> int:
        """Host sync (log steps only). Raises after too many skipped steps in a row; returns the total."""
        worst, total = int(self.worst_run.item()), int(self.total.item())
        if worst >= self.max_in_row:
            raise NonFiniteLossError(
                f"{worst} steps in a row had a non-finite loss or gradient norm (up to step {step}; "
                f"{total} skipped in all); train.max_nonfinite_in_row={self.max_in_row}. Their updates "
                "were skipped. Usual causes: learning rate too high (optim.lr, schedule.warmup_*), "
                "bf16 overflow (parallel.precision.param_dtype=fp32 to check), or bad data "
                "(run `vggt-fsdp data preview` on the recipe)")
        self.worst_run.copy_(self.run)
        return total


@dataclass
class StepShape:
    """What one step fed the model on this rank, for memory reports."""

    scenes: int
    frames_per_scene: int
    height: int
    width: int
    tokens: int

    @property
    def frames(self) -> int:
        return self.scenes * self.frames_per_scene


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def oom_report(step: int, shape: StepShape | None, recipe) -> str:
    """A message naming the step's size and the recipe settings that would lower peak memory, skipping
    the ones already at their memory-saving value."""
    lines = [f"out of memory at step {step}"]
    if shape is not None:
        lines[0] += (f": {shape.scenes} scenes x {shape.frames_per_scene} frames = {shape.frames} frames of "
                     f"{shape.height}x{shape.width} per rank, {shape.tokens} tokens")
    lines.append("settings that reduce memory (try them in this order):")
    for setting, why in memory_advice(recipe):
        lines.append(f"  {setting}: {why}")
    lines.append("`vggt-fsdp plan RECIPE` predicts the peak for a recipe before launching it.")
    return "\n".join(lines)


def memory_advice(recipe) -> list[tuple[str, str]]:
    advice = []
    data, par, model = recipe.data, recipe.parallel, recipe.model
    if data.frames_per_gpu == "auto" or data.frames_per_gpu > data.frames_range[0]:
        advice.append((f"data.frames_per_gpu (now {data.frames_per_gpu})",
                       "fewer frames per step; raise train.grad_accum_steps to keep the batch"))
    if par.checkpoint.policy in ("none", "attention", "every_n"):
        advice.append((f"parallel.checkpoint.policy=block (now {par.checkpoint.policy})",
                       "recompute whole blocks instead of keeping their activations"))
    if par.checkpoint.heads != "chunks":
        advice.append(("parallel.checkpoint.heads=chunks", "recompute the DPT heads' frame chunks"))
    if not par.sharding.reshard_after_forward:
        advice.append(("parallel.sharding.reshard_after_forward=true",
                       "free gathered parameters after forward"))
    if model.heads.point or model.heads.track:
        advice.append(("model.heads.point/track=false", "each dense head costs activations per frame"))
    if not model.freeze:
        advice.append(("model.freeze=[aggregator.patch_embed.*]",
                       "frozen parameters need no gradients or optimizer state"))
    if not par.sharding.cpu_offload:
        advice.append(("parallel.sharding.cpu_offload=true",
                       "keep sharded parameters and optimizer state in host memory (slower)"))
    advice.append((f"data.image_width (now {data.image_width})",
                   "tokens per frame grow with the square of the width"))
    return advice
