"""The process count `accelerate launch --cpu --num_processes N RECIPE.yaml` asked for.

Accelerate 1.x starts several CPU processes only through mpirun: without `--mpirun_hostfile` its
simple launcher runs ONE `python RECIPE.yaml ...` and passes the process count nowhere (not in the
environment, not in the arguments). A recipe running itself as that lone process would then train
alone while the user asked for N. So the recipe script reads the count from the command line of
the `accelerate launch` that started it, parsed by Accelerate's own argument parser, and starts the N
processes itself, as `vggt-fsdp train` does (see `run_recipe_script`); the user is told so.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

# Set by Accelerate's simple launcher in the process it starts; a distributed launcher sets WORLD_SIZE.
SIMPLE_LAUNCHER_ENV = "ACCELERATE_USE_CPU"


def launch_arguments(cmdline: Sequence[str]) -> list[str] | None:
    """The arguments after `launch` in an `accelerate launch` command line, in each of its spellings
    (`accelerate launch`, `accelerate-launch`, `python -m accelerate.commands.launch`); None for any
    other command."""
    for i, token in enumerate(cmdline):
        name = Path(token).name
        if name == "accelerate" and i + 1 < len(cmdline) and cmdline[i + 1] == "launch":
            return list(cmdline[i + 2:])
        if name == "accelerate-launch":
            return list(cmdline[i + 1:])
        if token == "-m" and i + 1 < len(cmdline) and cmdline[i + 1] == "accelerate.commands.launch":
            return list(cmdline[i + 2:])
    return None


def cpu_processes_asked(script: str | Path, env: Mapping[str, str], parent_cmdline: Sequence[str]) -> int | None:
    """N when this process is the single one that `accelerate launch --cpu --num_processes N` (N > 1,
    one machine) started to run `script`; None otherwise (a distributed launcher, plain python, another
    script, or no count asked)."""
    if "WORLD_SIZE" in env or env.get(SIMPLE_LAUNCHER_ENV, "").lower() != "true":
        return None
    arguments = launch_arguments(parent_cmdline)
    if arguments is None:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        args, _ = launch_command_parser().parse_known_args(arguments)
    except SystemExit:  # not a command line Accelerate would have run; then it did not start us
        return None
    if args.mpirun_hostfile or (args.num_machines or 1) > 1 or not args.num_processes or args.num_processes < 2:
        return None
    if Path(args.training_script).resolve() != Path(script).resolve():
        return None
    return int(args.num_processes)


def parent_cmdline() -> list[str]:
    """The command line of this process's parent ([] when it cannot be read)."""
    import psutil

    try:
        parent = psutil.Process(os.getpid()).parent()
        return parent.cmdline() if parent is not None else []
    except psutil.Error:
        return []
