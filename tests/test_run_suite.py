"""`make test` runs the suite as pytest processes side by side (tests/run_suite.py). Single-node
launchers rendezvous on a default port, so every module that starts one must be in the LAUNCHING group,
whose modules run one at a time; a module that starts a real SLURM cluster is in the CLUSTER group, a
process of its own; the groups together hold every module once."""
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
    assert list(groups) == ["launching", "cluster", "in-process"]
    every = sorted(TESTS.glob("test_*.py"))
    assert sorted(sum(groups.values(), [])) == every  # each module in exactly one group
    assert {m.stem for m in groups["launching"]} == run_suite.LAUNCHING  # no stale name
    assert {m.stem for m in groups["cluster"]} == run_suite.CLUSTER
    assert not run_suite.LAUNCHING & run_suite.CLUSTER


def test_every_module_that_starts_a_slurm_cluster_runs_in_the_cluster_group():
    starting = {m.stem for m in TESTS.glob("test_*.py") if re.search(r"^import slurm_cluster$|^from slurm_cluster ",
                                                                     m.read_text(), re.M)}
    assert "test_slurm_cluster" in starting
    assert starting == run_suite.CLUSTER


def test_every_module_that_starts_a_launcher_is_in_the_launching_group():
    starting = {m.stem for m in TESTS.glob("test_*.py")
                if m.name != Path(__file__).name and STARTS_A_LAUNCHER.search(m.read_text())}
    assert {"test_launch", "test_train_e2e", "test_gpu_stages_smoke"} <= starting  # the pattern finds them
    assert starting <= run_suite.LAUNCHING, starting - run_suite.LAUNCHING
