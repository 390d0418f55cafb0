"""What the trainer does when things go wrong: stop signals, a launcher that is gone, non-finite
losses, out of memory; and the exit codes that say how a run ended (EXIT_CODES, README's table).

- SIGTERM (preemption, `scancel`, a launcher stopping the job) during start-up (imports, building,
  loading weights, resuming): the handler only records it. A watchdog thread then ends the process
  with code 0 (nothing was trained, nothing is saved): it runs the registered clean-up (rank 0 releases
  the output directory's lock) and calls os._exit. Nothing is raised in the main thread, so no
  exception can land in whatever code it runs at that moment (an import callback, a __del__, a
  library's `finally`), and no traceback is printed. An error the main thread meets after such a
  signal (a peer that stopped first) ends the process the same way (`stop_if_signalled`).
- Once training runs (`StopSignal`), the handler only sets a flag; at the next step boundary all
  ranks agree (a MAX over a CPU gloo group, which never waits for the GPU), save a checkpoint and exit
  with code 0. A second SIGTERM during that save is ignored.
- A training process started by a launcher (torch elastic runs each in a session of its own, so a
  kill of the launcher's process group does not reach it) watches its parent: when the launcher is
  gone (kill -9, the OOM killer) it releases the lock and exits within a second (`exit_with_launcher`).
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

import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class NonFiniteLossError(RuntimeError):
    pass

# ------------------------------------------------------------------------------------------ exit codes
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2
SIGNAL_EXIT_BASE = 128  # a process ended by signal N exits 128+N (as a shell reports it)
PREEMPTED_EXIT_CODE = EXIT_OK  # a preempted run that saved its checkpoint ended as intended

# The one table of exit codes of `vggt-fsdp train` and of each training process. README.md holds it
# verbatim (tests/test_integrity.py compares them); `exit_code_table()` prints it.
EXIT_CODES: dict[str, str] = {
    str(EXIT_OK): "finished; or stopped cleanly by SIGTERM: a checkpoint saved (`preempted.json` names it), "
                  "or still starting, so nothing was trained and nothing saved",
    str(EXIT_FAILED): "failed: an error during start-up or training, printed by the rank that met it "
                      "(a busy output directory, a damaged checkpoint, non-finite weights or losses, bad data)",
    str(EXIT_REFUSED): "refused before any training process started: the recipe does not load or fails "
                       "its checks (one `error:` line each)",
    f"{SIGNAL_EXIT_BASE}+N": "ended by signal N before the processes could stop cleanly (137: SIGKILL; 143: "
                             "SIGTERM while training, the processes killed before they saved)",
}


def exit_code_table() -> str:
    """EXIT_CODES as README's Markdown table."""
    rows = [f"| {code} | {meaning} |" for code, meaning in EXIT_CODES.items()]
    return "\n".join(["| exit code | meaning |", "|---|---|", *rows])


def signal_exit_code(returncode: int) -> int:
    """A subprocess's returncode as an exit code: -N (ended by signal N) becomes 128+N."""
    return SIGNAL_EXIT_BASE - returncode if returncode < 0 else returncode


# ---------------------------------------------------------------------------- the launcher's status file
# `vggt-fsdp train` sets STATUS_ENV to a file; rank 0 records there how far the run got, so that the
# command can tell a clean stop from a failure after it forwarded a signal (torch elastic's agent exits
# non-zero when signalled, although every rank stopped cleanly).
STATUS_ENV = "VGGT_FSDP_STATUS"
STARTING, TRAINING, STOPPED, PREEMPTED, FINISHED = "starting", "training", "stopped", "preempted", "finished"


def _rank() -> int:
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def write_status(state: str, step: int | None = None, checkpoint: Path | None = None) -> None:
    """Rank 0: `state` (STARTING ... FINISHED) in the launcher's status file, when there is one."""
    path = os.environ.get(STATUS_ENV)
    if not path or _rank() != 0:
        return
    tmp = Path(f"{path}.tmp")
    try:
        tmp.write_text(json.dumps({"state": state, "step": step,
                                   "checkpoint": str(checkpoint) if checkpoint else None}))
        os.replace(tmp, path)
    except OSError:  # the launcher is gone (its agent can exit before its workers): nobody to tell
        pass


def read_status(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ ending the process early
# Clean-up run (once, in order) before the process ends itself early: at a stop signal during start-up
# (why=STOPPED) or when its launcher is gone (why=ORPHANED). Rank 0 releases the lock here.
ORPHANED = "orphaned"
_cleanups: list[Callable[[str], None]] = []
_exit_lock = threading.RLock()  # one early exit at a time; held while the clean-up runs
_exit: Callable[[int], Any] = os._exit  # tests replace it


@contextlib.contextmanager
def early_exit_held():
    """Run the block wholly before an early exit's clean-up (which another thread may start at any moment)
    or not at all: the process ends while the block waits."""
    with _exit_lock:
        yield


def on_early_exit(callback: Callable[[str], None]) -> None:
    """Run `callback(why)` before the process ends itself early (why: STOPPED or ORPHANED)."""
    _cleanups.append(callback)


def forget_early_exit(callback: Callable[[str], None]) -> None:
    if callback in _cleanups:
        _cleanups.remove(callback)


def _exit_now(code: int, why: str, message: str) -> None:
    """Clean up, say why and end the process, from any thread, without raising anywhere. os._exit: the
    main thread may sit in a collective or in a library's code, which must not run on."""
    with _exit_lock:
        for callback in list(_cleanups):
            try:
                callback(why)
            except Exception as err:  # the exit must happen; say what could not be cleaned up
                print(f"[vggt-fsdp rank {_rank()}] while stopping: {type(err).__name__}: {err}",
                      file=sys.stderr)
        print(message, file=sys.stderr)
        _flush_and_exit(code)


def _flush_and_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    _exit(code)


def end_process(main: Callable[[], int]) -> NoReturn:
    """Run a training process's `main` and end the process with its code, skipping the interpreter's
    teardown. Torch keeps gloo process groups alive past destroy_process_group (DTensor's caches hold
    the device mesh): their worker threads run while the interpreter and C++ statics are torn down in
    no fixed order, which can abort a process that trained, saved and exported ("terminate called
    without an active exception", SIGABRT: the launcher then reports a failure). By now every file is
    written and closed, the data loader's workers are joined (the trainer was freed when `main`
    returned) and the process group destroyed, so nothing is lost. An unexpected error is printed with
    its traceback and ends the process with code 1, as Python would."""
    try:
        code = main()
    except SystemExit as exit_:  # argparse: --help, a usage error
        code = exit_.code if isinstance(exit_.code, int) else EXIT_FAILED
    except KeyboardInterrupt:
        code = SIGNAL_EXIT_BASE + signal.SIGINT
    except BaseException:
        import traceback

        traceback.print_exc()
        code = EXIT_FAILED
    _flush_and_exit(code)


@dataclass
class _StartUp:
    signum: int | None = None  # the stop signal received, recorded by the handler
    over: bool = False  # StopSignal took over
    signals: tuple[int, ...] = ()


_startup: _StartUp | None = None
WATCH_INTERVAL_S = 0.05  # how often the start-up watchdog looks for a recorded signal


def _record_startup(signum, frame) -> None:
    if _startup is not None and _startup.signum is None:
        _startup.signum = signum


def _stop_startup(state: _StartUp) -> None:
    """The stop during start-up: status, clean-up (lock, preempted.json), message, exit 0."""
    with _exit_lock:
        if state.over:
            return
        state.over = True  # once (the exit does not return, but tests replace it)
        write_status(STOPPED)
        message = f"stopped by signal {state.signum} during start-up: nothing was trained, nothing saved"
        _exit_now(EXIT_OK, STOPPED, f"[vggt-fsdp rank {_rank()}] {message}")


def _startup_watchdog(state: _StartUp, wakeup: int) -> None:
    """Also reads the signal numbers Python's C-level handler writes to `wakeup` at once: the Python
    handler runs only when the main thread returns to the interpreter, which a thread blocked in C++
    (a rendezvous, a collective waiting for a peer) may not do for minutes."""
    import select

    while not state.over:
        if state.signum is not None:
            _stop_startup(state)
            return
        ready, _, _ = select.select([wakeup], [], [], WATCH_INTERVAL_S)
        if ready:
            try:
                received = os.read(wakeup, 64)
            except OSError:
                return
            stop = [sig for sig in received if sig in state.signals]
            if stop and state.signum is None:
                state.signum = stop[0]


def stop_during_startup(signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
    """Until `StopSignal` takes over, `signals` end the process with code 0 (see the module's doc). A
    process that blocked them first (`signal.pthread_sigmask`, before its slow imports) receives a
    pending one now. Calling it again during the same start-up changes nothing."""
    global _startup
    if _startup is None or _startup.over:
        _startup = _StartUp(signals=tuple(signals))
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=_startup_watchdog, args=(_startup, read), name="vggt-fsdp-startup-stop",
                         daemon=True).start()
        write_status(STARTING)
    for sig in signals:
        signal.signal(sig, _record_startup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(signals))


def stop_if_signalled() -> None:
    """Called on an error during start-up: when a stop signal came first, the error is its consequence
    (a peer that stopped left a collective), and the process ends as the signal asks, without the error."""
    state = _startup
    if state is not None and state.signum is not None:
        _stop_startup(state)


def end_startup() -> None:
    """Start-up is over (StopSignal installed its handler): a signal recorded until now still stops."""
    state = _startup
    if state is None:
        return
    with _exit_lock:
        if state.signum is not None:
            _stop_startup(state)
        state.over = True
    signal.set_wakeup_fd(-1)
    write_status(TRAINING)


def _adopted_by_init(parent: int) -> bool:
    """The launcher died before this process noted its PID: init adopted it. (A launcher can be PID 1
    itself, in a container: then PID 1 is a Python process.)"""
    if parent != 1:
        return False
    import psutil

    try:
        name = psutil.Process(1).name()
    except psutil.Error:
        return False
    return not name.startswith(("python", "torchrun", "accelerate"))


def exit_with_launcher(parent: int, poll_s: float = 0.5) -> threading.Thread:
    """Watch `parent` (the launcher's agent, its PID taken before the slow imports); when it is gone,
    clean up (rank 0 releases the lock) and exit. torch elastic starts each training process in a session of its own, so a kill -9 of the
    launcher or of its process group never reaches them, and they would train on unseen. A thread that
    polls the parent PID, not PR_SET_PDEATHSIG: that signal's handler would run on the main thread,
    which may wait in a collective for minutes, and it would fire when the launcher's forking thread
    ends; the thread works on every POSIX system and can release the lock."""

    def watch() -> None:
        while os.getppid() == parent and not _adopted_by_init(parent):
            time.sleep(poll_s)
        _exit_now(EXIT_FAILED, ORPHANED, f"[vggt-fsdp rank {_rank()}] error: the launcher (PID {parent}) is "
                  "gone: this training process stops now (steps after the last checkpoint are lost)")

    thread = threading.Thread(target=watch, name="vggt-fsdp-launcher-watch", daemon=True)
    thread.start()
    return thread


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
    boundary, agreed across ranks. Creating it ends the start-up handling of `stop_during_startup`.
    The handler only records the signal: it says so at the step boundary (a print from a handler can
    land inside another print to the same stream, which raises)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.received: int | None = None
        self._said = False
        self._group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            # A CPU group: agreeing on the flag must not wait for queued GPU work.
            self._group = dist.new_group(backend="gloo")
        for sig in signals:  # first: a signal from here on is this handler's, none is lost in between
            signal.signal(sig, self._handle)
        end_startup()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def should_stop(self) -> bool:
        """Collective over all ranks: True when any rank was signalled."""
        if self.received is not None and not self._said:
            self._said = True
            print(f"[vggt-fsdp rank {_rank()}] received signal {self.received}: saving a checkpoint at this "
                  "step boundary", file=sys.stderr, flush=True)
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
