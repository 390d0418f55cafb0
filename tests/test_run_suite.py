"""`make test` runs the suite as two pytest processes (tests/run_suite.py). Single-node launchers
rendezvous on a default port, so every module that starts one must be in the LAUNCHING group, whose
modules run one at a time; the groups together hold every module once."""
from __future__ import annotations

import re
from pathlib import Path

import run_suite

TESTS = Path(__file__).resolve().parent
# How a test starts a launcher: Accelerate's, torch's or `vggt-fsdp train` (which runs Accelerate's) as a
# subprocess, or a GPU stage script or the GPU session (which run them).
STARTS_A_LAUNCHER = re.compile(r'sys\.executable, "-m", "(accelerate\.commands\.launch|torch\.distributed\.run'
                               r'|vggt_fsdp\.cli", "train)"|"gpu_stages" /|gpu_session\.sh"')


def test_the_groups_hold_every_module_once():
    groups = run_suite.groups()
    every = sorted(TESTS.glob("test_*.py"))
    assert sorted(groups["launching"] + groups["in-process"]) == every
    assert not set(groups["launching"]) & set(groups["in-process"])
    assert {m.stem for m in groups["launching"]} == run_suite.LAUNCHING  # no stale name


def test_every_module_that_starts_a_launcher_is_in_the_launching_group():
    starting = {m.stem for m in TESTS.glob("test_*.py")
                if m.name != Path(__file__).name and STARTS_A_LAUNCHER.search(m.read_text())}
    assert {"test_launch", "test_train_e2e", "test_gpu_stages_smoke"} <= starting  # the pattern finds them
    assert starting <= run_suite.LAUNCHING, starting - run_suite.LAUNCHING
