"""One trainer per output directory: `<output_dir>/trainer.lock`.

Two trainers writing one directory interleave metrics.jsonl, overwrite recipe.yaml and prune each
other's checkpoints. The trainer's rank 0 takes the lock before it writes anything there and holds it
until the process ends; a second trainer stops at once, naming the directory and the holder.

The lock file holds the holder's host, PID, the PID's start time (so a reused PID is not taken for
the holder), the SLURM job and restart count, and a random token. It is created complete and
atomically with link(2) from a temporary file (atomic on NFS too). A lock is stale, and is taken over,
when its holder is known to be gone: on this host, no process with that PID and start time; on any
host, an earlier incarnation of this SLURM job (a requeued job runs again with the same job id and a
higher restart count). A lock from another host cannot be checked from here: the message says so and
how to remove it.

A trainer that ends itself early (a stop signal during start-up, its launcher gone: faults.py) releases
the lock from another thread, possibly while the main thread is taking it: acquire and release exclude
each other, and after `close()` the lock is never taken again by this object. A trainer killed outright
(kill -9) leaves its lock, which the next trainer finds stale (no process with that PID and start time)
and takes over.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import psutil

LOCK_NAME = "trainer.lock"


class LockError(RuntimeError):
    """The output directory is held by another trainer (or its lock cannot be read)."""


@dataclass
class Holder:
    host: str
    pid: int
    pid_started: float  # psutil create_time of the PID: tells a reused PID from the holder
    since: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    slurm_job: str | None = None
    slurm_restart: str | None = None

    @classmethod
    def this_process(cls) -> Holder:
        return cls(host=socket.gethostname(), pid=os.getpid(), pid_started=psutil.Process().create_time(),
                   since=time.time(), slurm_job=os.environ.get("SLURM_JOB_ID"),
                   slurm_restart=os.environ.get("SLURM_RESTART_COUNT", "0") if "SLURM_JOB_ID" in os.environ
                   else None)

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"PID {self.pid} on host {self.host}{job}, since {started}"


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in a lock file; None when there is no lock file."""
    try:
        data = json.loads(path.read_text())
        return Holder(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as err:
        raise LockError(f"lock file {path} is unreadable ({err}); if no trainer uses {path.parent}, "
                        f"remove it: rm {path}") from None


def holder_gone(holder: Holder) -> str | None:
    """Why `holder` certainly no longer runs (the lock is stale), or None when it may still run."""
    me = Holder.this_process()
    if holder.slurm_job and holder.slurm_job == me.slurm_job and holder.slurm_restart != me.slurm_restart:
        return f"SLURM job {holder.slurm_job} was requeued (restart {holder.slurm_restart} -> {me.slurm_restart})"
    if holder.host != me.host:
        return None
    try:
        started = psutil.Process(holder.pid).create_time()
    except psutil.NoSuchProcess:
        return f"no process {holder.pid} runs on {holder.host}"
    if abs(started - holder.pid_started) > 1.0:
        return f"PID {holder.pid} on {holder.host} is now another process"
    return None


def busy_message(path: Path, holder: Holder) -> str:
    text = (f"train.output_dir {path.parent} is in use by another trainer ({holder.describe()}; lock file "
            f"{path}). Use another train.output_dir, or wait for that run to end")
    if holder.host != socket.gethostname():
        text += (f". The holder runs on another host, which cannot be checked from {socket.gethostname()}: if "
                 f"no trainer runs there any more, remove the lock (rm {path})")
    return text


class RunLock:
    """`with RunLock(output_dir):` or acquire()/release(); raises LockError when held by another
    trainer. Creates output_dir."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.holder: Holder | None = None  # set while this process holds the lock
        self.took_over: str | None = None  # why a stale lock was replaced, for the log
        self._mutex = threading.Lock()  # acquire/release from different threads (see the module's doc)
        self._closed = False

    def acquire(self) -> RunLock:
        with self._mutex:
            if self._closed:
                raise LockError(f"{self.path}: this trainer is stopping; the lock is not taken again")
            return self._acquire()

    def _acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = Holder.this_process()
        for _ in range(3):  # a race with another starter or a stale-lock removal: look again
            if self._create(me):
                self.holder = me
                return self
            current = read_holder(self.path)
            if current is None:
                continue
            if (current.host, current.pid, current.pid_started) == (me.host, me.pid, me.pid_started):
                raise LockError(f"{self.path} is already held by this process")
            reason = holder_gone(current)
            if reason is None:
                raise LockError(busy_message(self.path, current))
            self._remove_stale(current)
            self.took_over = f"replaced the stale lock {self.path} of {current.describe()}: {reason}"
        raise LockError(f"could not take {self.path}: other trainers kept taking and releasing it")

    def _create(self, me: Holder) -> bool:
        """Atomically create the lock file with complete contents; False when it exists."""
        tmp = self.path.with_name(f".{LOCK_NAME}.{me.token}")
        tmp.write_text(json.dumps(asdict(me)))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _remove_stale(self, stale: Holder) -> None:
        """Move the stale lock aside (one process wins the rename) and drop it, unless a live trainer
        replaced it meanwhile."""
        aside = self.path.with_name(f".{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another starter removed it first
        moved = read_holder(aside)
        if moved is not None and moved.token != stale.token:  # not the lock we judged: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if this process holds it (never another trainer's)."""
        with self._mutex:
            self._release()

    def close(self, last_words: Callable[[], None] | None = None) -> None:
        """Release, and refuse to acquire from now on: the process is ending. `last_words` runs first, and
        only while this process holds the lock (what it writes in output_dir is then this trainer's): under
        the mutex, so an acquire in flight on another thread (the lock file made, the holder not yet
        recorded) finishes before it is judged."""
        with self._mutex:
            self._closed = True
            if last_words is not None and self.holder is not None:
                last_words()
            self._release()

    def _release(self) -> None:
        if self.holder is None:
            return
        try:
            current = read_holder(self.path)
        except LockError:
            current = None
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        self.holder = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(output_dir: str | Path) -> str | None:
    """For preflight: a message when a live (or unverifiable) trainer holds output_dir, else None."""
    path = Path(output_dir) / LOCK_NAME
    holder = read_holder(path)
    if holder is None or holder_gone(holder) is not None:
        return None
    return busy_message(path, holder)
