"""Child processes of the tests: each starts in a process group of its own, so that a timeout kills a
launcher together with every process it started (none is left to load the machine), and the test fails
with the tail of what the child printed."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

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
