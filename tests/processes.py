"""Child processes of the tests: each starts in a process group of its own, so that a timeout kills a
launcher together with every process it started (none is left to load the machine), and the test fails
with the tail of what the child printed. Tests wait on conditions (`wait_for`), never for a time."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def start(command: Sequence[str], env: Mapping[str, str], merge_output: bool = False) -> subprocess.Popen:
    """`command` in the repository, with `env` as its whole environment; stderr joins stdout when
    `merge_output`."""
    return subprocess.Popen(list(command), cwd=REPO, env=dict(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_output else subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for `proc`; past `timeout` seconds kill its process group and fail the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, proc.args))}\n{(err or out)[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(condition: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen | None = None,
             interval: float = 0.01) -> object:
    """Poll `condition` until it returns a true value (returned) or `timeout` seconds pass (the test
    fails naming `what`); fails at once when `proc` ended first. Waiting on a condition, not for a time,
    keeps a test right on a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process ended first (exit {proc.returncode})")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(interval)


def trainers(root: int) -> list[psutil.Process]:
    """The training processes (`-m vggt_fsdp.train`) among `root`'s descendants."""
    try:
        found = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in found if _is_trainer(p)]


def _is_trainer(proc: psutil.Process) -> bool:
    try:
        command = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "vggt_fsdp.train" in command and "accelerate.commands.launch" not in command


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `procs` still running (a zombie has ended)."""
    running = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc)
        except psutil.NoSuchProcess:
            pass
    return running
