"""`accelerate launch --cpu --num_processes N RECIPE.yaml` trains on N processes.

Accelerate's simple launcher starts one process and passes the count nowhere; the recipe script reads
it from the launcher's command line (train/cpu_launch.py). These cases pin down when it does so: only
for the lone process Accelerate's CPU launch started for this very recipe, with more than one process
asked, on one machine. (The real launch, end to end: tests/test_launch.py.)
"""
from __future__ import annotations

from pathlib import Path

import pytest

from vggt_fsdp.train import cpu_launch

RECIPE = "recipes/cpu_tiny.yaml"
LONE = {"ACCELERATE_USE_CPU": "True"}  # what Accelerate's simple launcher sets in its one process


@pytest.mark.parametrize("cmdline, expected", [
    (["/usr/bin/python3", "/venv/bin/accelerate", "launch", "--cpu", "x.py", "a=1"], ["--cpu", "x.py", "a=1"]),
    (["/venv/bin/accelerate-launch", "--cpu", "x.py"], ["--cpu", "x.py"]),
    (["python", "-m", "accelerate.commands.launch", "x.py"], ["x.py"]),
    (["python", "-m", "torch.distributed.run", "x.py"], None),
    (["/venv/bin/accelerate", "config"], None),
    ([], None),
])
def test_the_launch_arguments_are_found_in_each_spelling_of_the_command(cmdline, expected):
    assert cpu_launch.launch_arguments(cmdline) == expected


@pytest.mark.parametrize("env, parent, expected", [
    (LONE, ["accelerate", "launch", "--cpu", "--num_processes", "2", RECIPE, "train.max_steps=2"], 2),
    (LONE, ["accelerate", "launch", "--cpu", "--num-processes=4", RECIPE], 4),
    (LONE, ["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "3", RECIPE], 3),
    # one process asked, or none: Accelerate's one process is what was asked for
    (LONE, ["accelerate", "launch", "--cpu", "--num_processes", "1", RECIPE], None),
    (LONE, ["accelerate", "launch", "--cpu", RECIPE], None),
    # a distributed launcher already started the processes
    ({**LONE, "WORLD_SIZE": "2"}, ["accelerate", "launch", "--cpu", "--num_processes", "2", RECIPE], None),
    # not started by Accelerate's simple launcher
    ({}, ["accelerate", "launch", "--cpu", "--num_processes", "2", RECIPE], None),
    (LONE, ["bash", "-c", f"python {RECIPE}"], None),
    # the launch ran another script (which then ran this recipe some other way)
    (LONE, ["accelerate", "launch", "--cpu", "--num_processes", "2", "other.py", RECIPE], None),
    # mpirun or several machines: Accelerate's own multi-CPU launch, not a lone process
    (LONE, ["accelerate", "launch", "--cpu", "--num_processes", "2", "--mpirun_hostfile", "h", RECIPE], None),
    (LONE, ["accelerate", "launch", "--cpu", "--num_processes", "4", "--num_machines", "2", RECIPE], None),
    # a command line Accelerate itself would refuse
    (LONE, ["accelerate", "launch", "--cpu", "--num_processes", "two", RECIPE], None),
])
def test_the_count_is_taken_only_from_the_cpu_launch_of_this_recipe(env, parent, expected, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert cpu_launch.cpu_processes_asked(RECIPE, env, parent) == expected


def test_the_parent_command_line_is_readable():
    import os

    import psutil

    assert cpu_launch.parent_cmdline() == psutil.Process(os.getppid()).cmdline()
