"""`python -m vggt_fsdp.train RECIPE [key=value ...]`: one training process.

Run it under a launcher for several processes (`accelerate launch -m vggt_fsdp.train ...`,
`torchrun --nproc-per-node N -m vggt_fsdp.train ...`); it trains with the topology the launcher gives
and says so when that differs from the recipe's `accelerate:` section. `vggt-fsdp train` is the
launcher that starts what the recipe asks for. A bundled recipe runs itself the same way
(`accelerate launch RECIPE.yaml ...`): its last line calls `run_recipe_script`.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import NoReturn, Sequence

PROG = "python -m vggt_fsdp.train"


def parse_args(argv: list[str] | None = None, prog: str = PROG, script: str | None = None) -> argparse.Namespace:
    """`script`: the recipe file that is running itself; argv then holds only its overrides."""
    if script is None:
        parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
        parser.add_argument("recipe", help="recipe file, or a bundled recipe's name")
    else:
        parser = argparse.ArgumentParser(prog=prog, description="Train this recipe with the processes the "
                                         "launcher started (one, without a launcher).")
        parser.set_defaults(recipe=script)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.max_steps=5 train.output_dir=runs/x")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = PROG, script: str | None = None) -> int:
    # A SIGTERM during the slow imports below is held until stop_during_startup() installs the
    # handler that ends start-up cleanly (exit 0), instead of killing the process mid-import.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    launcher = os.getppid()  # before the imports: the launcher may be gone by their end
    args = parse_args(argv, prog, script)
    # As upstream trains: fewer fragmentation OOMs with varying batch shapes; the memory planner
    # assumes it. Must be set before CUDA's allocator starts; a user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from vggt_fsdp.train.faults import EXIT_REFUSED, exit_with_launcher, stop_during_startup

    stop_during_startup()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a worker of torch elastic's agent (torchrun, accelerate launch)
        exit_with_launcher(launcher)
    from vggt_fsdp.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        _launcher_hint()
        return EXIT_REFUSED
    if refused_by_this_machine(recipe):
        return EXIT_REFUSED
    from vggt_fsdp.train.build import run

    return run(recipe)


def refused_by_this_machine(recipe) -> bool:
    """Whether this machine cannot run the recipe at all (a GPU recipe without CUDA, frames planned for
    a GPU that is not there): rank 0 prints each problem as one line, and every rank stops before the
    Accelerator is built, which would fail on every rank with a traceback. `vggt-fsdp train` refuses
    these before launching; this is the same check for a recipe a launcher started directly."""
    from vggt_fsdp.train.preflight import device_problems

    problems = device_problems(recipe, None)
    if problems and os.environ.get("RANK", "0") == "0":
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        _launcher_hint()
    return bool(problems)


def _launcher_hint() -> None:
    """Under `accelerate launch`, say that the launcher's traceback after a refusal adds nothing."""
    from vggt_fsdp.train.cpu_launch import parent_cmdline

    launcher = parent_cmdline()
    if (os.environ.get("RANK", "0") == "0" and any("accelerate" in part for part in launcher[:3])
            and not {"-q", "--quiet"} & set(launcher)):
        print("[vggt-fsdp] refused before training: the launcher's traceback that follows only repeats this "
              "exit status (`accelerate launch --quiet` leaves it out)", file=sys.stderr, flush=True)


def run_recipe_script(path: str, argv: Sequence[str]) -> NoReturn:
    """Train the recipe file at `path`, which is being run as a script (`python RECIPE.yaml key=value ...`,
    as `accelerate launch` and `torchrun` run it); `argv` is that process's sys.argv. A recipe's last line
    calls this (vggt_fsdp/recipe_script.py), so keep its signature.

    Started as the one process of `accelerate launch --cpu --num_processes N` (train/cpu_launch.py),
    it becomes `vggt-fsdp train` with N CPU processes, which starts them."""
    from vggt_fsdp.train import cpu_launch

    overrides = list(argv[1:])
    asked = cpu_launch.cpu_processes_asked(path, os.environ, cpu_launch.parent_cmdline())
    if asked is not None:
        print(f"[vggt-fsdp] accelerate launch --cpu started 1 process for --num_processes {asked} (Accelerate "
              f"starts several CPU processes only through mpirun); this process now starts the {asked} as "
              f"`vggt-fsdp train` does", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "vggt_fsdp.cli", "train", path, *overrides,
                   f"accelerate.num_processes={asked}", "accelerate.use_cpu=true"]
        os.execv(sys.executable, command)  # same pid: the launcher waits for it and signals reach it
    from vggt_fsdp.train.faults import end_process

    end_process(lambda: main(overrides, prog=f"python {argv[0]}", script=path))


if __name__ == "__main__":
    from vggt_fsdp.train.faults import end_process

    end_process(main)
