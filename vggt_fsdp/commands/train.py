"""`vggt-fsdp train RECIPE [key=value ...]`: start the processes the recipe asks for and train.

First the recipe is loaded and checked (train/preflight.py: paths, initial weights, patterns against
the model built on the meta device, the output directory and its lock): every problem is printed as one
`error: key: ...` line and nothing starts. Then the recipe's `accelerate:` section is written out as
an Accelerate config file and handed to `accelerate launch -m vggt_fsdp.train RECIPE [key=value ...]`,
which starts num_processes training processes on this machine (one node of num_machines; override
accelerate.machine_rank and accelerate.main_process_ip per node). SIGTERM is passed on to the
launcher, whose processes save a checkpoint at the next step boundary (or, still starting, just stop)
and exit; this command then exits 0 (see faults.py).

When the launcher ends the run normally, this command prints a summary: the loss of the first and the
last steps logged, the time, and where the metrics, checkpoints and weights are (run_summary.py).

`--dry-run` does the checks, writes the config file where it stays (OUTPUT_DIR/accelerate_config.yaml
or --config-file) and prints the command that trains the recipe; it starts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


EXAMPLES = """  vggt-fsdp train cpu_tiny                                 2 CPU processes, the bundled tiny recipe
  vggt-fsdp train recipes/a100_80g.yaml data.root=/data/co3d train.output_dir=runs/try1
  vggt-fsdp train cpu_tiny --dry-run train.max_steps=5     check, write the Accelerate config, print the command
  vggt-fsdp train runs/try1/recipe.yaml train.resume=auto  continue a run from its latest checkpoint
"""

def build_parser(parser: argparse.ArgumentParser) -> None:
    from vggt_fsdp.cli import add_recipe_arguments

    add_recipe_arguments(parser, "train.max_steps=50 train.output_dir=runs/try1")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the recipe, write the Accelerate config file and print the launch command; "
                             "start nothing")
    parser.add_argument("--config-file", type=Path, default=None,
                        help="where --dry-run writes the Accelerate config (default: "
                             "OUTPUT_DIR/accelerate_config.yaml)")


def launch_command(config_file: Path, recipe: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "-m", "vggt_fsdp.train", recipe, *overrides]


def run(args: argparse.Namespace) -> int:
    from vggt_fsdp.parallel.accelerate import accelerate_config_yaml
    from vggt_fsdp.recipe import RecipeError, load_recipe
    from vggt_fsdp.train.build import STATUS_ENV
    from vggt_fsdp.tasks import preflight

    try:
        recipe = load_recipe(args.recipe, args.overrides)  # fail here, before starting any process
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problems = preflight(recipe)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 2
    acc = recipe.accelerate
    where = (f"{acc.get('num_processes')} process(es) ({'cpu' if acc.get('use_cpu') else 'gpu'}, "
             f"{acc.get('num_machines', 1)} machine(s))")
    if args.dry_run:
        config_file = args.config_file or Path(recipe.train.output_dir) / "accelerate_config.yaml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(accelerate_config_yaml(recipe))
        print(f"[vggt-fsdp] recipe checked; would launch {where} with {config_file}:", file=sys.stderr)
        print(shlex.join(launch_command(config_file, args.recipe, list(args.overrides))))
        return 0
    with tempfile.TemporaryDirectory(prefix="vggt-fsdp-") as tmp:
        config_file = Path(tmp) / "accelerate_config.yaml"
        config_file.write_text(accelerate_config_yaml(recipe, main_process_port=rendezvous_port(acc)))
        command = launch_command(config_file, args.recipe, list(args.overrides))
        print(f"[vggt-fsdp] launching {where}: {shlex.join(command)}", file=sys.stderr, flush=True)
        env = dict(os.environ)
        # After a SIGTERM the launcher's agent SIGKILLs its workers once this many seconds pass; they
        # need a step and a checkpoint save (torch's default is 30 s). A user's own value wins. Read by
        # torch.distributed.launcher.api.LaunchConfig in torch 2.13; older releases (before 2.12, by
        # one public report) ignore it and keep 30 s.
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
        status = Path(tmp) / "status.json"  # rank 0 writes it when a signal stopped the run cleanly
        env[STATUS_ENV] = str(status)
        started = time.monotonic()
        code, signalled = _run_forwarding_signals(command, env)
        if code == 0 and not signalled:
            from vggt_fsdp.commands.run_summary import summarize

            print(summarize(recipe.train.output_dir, time.monotonic() - started), file=sys.stderr)
        return _exit_code(code, signalled, status)


def rendezvous_port(acc: dict) -> int | None:
    """The port a one-machine launch rendezvous on: the recipe's `accelerate.main_process_port`, else
    MASTER_PORT, else a free port of this machine, so two runs on one machine (two users, two tests, two
    jobs on one node) never meet on torch's default 29500. None for several machines: all of them must
    agree on one port, which the recipe or the launcher's environment names."""
    if acc.get("main_process_port") is not None or acc.get("num_machines", 1) > 1:
        return None
    if os.environ.get("MASTER_PORT"):
        return int(os.environ["MASTER_PORT"])
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _exit_code(code: int, signalled: bool, status: Path) -> int:
    """The launcher's code, except after a forwarded SIGTERM that every rank answered by saving a
    checkpoint or, still starting, by stopping (the agent then exits 1 although nothing failed): 0, as
    for a direct run."""
    from vggt_fsdp.train.faults import PREEMPTED_EXIT_CODE

    if code != 0 and signalled and status.is_file():
        info = json.loads(status.read_text())
        if info["checkpoint"] is None:
            print("[vggt-fsdp] stopped during start-up: nothing was trained. Run the same command again to "
                  "start.", file=sys.stderr)
        else:
            print(f"[vggt-fsdp] preempted at step {info['step']}; checkpoint {info['checkpoint']} saved. "
                  "Run the same command again to resume.", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return code


def _run_forwarding_signals(command: list[str], env: dict[str, str]) -> tuple[int, bool]:
    child = subprocess.Popen(command, env=env)
    signalled = False

    def forward(signum, frame):
        nonlocal signalled
        signalled = True
        child.send_signal(signum)

    # SIGTERM only: a Ctrl-C (SIGINT) already reaches every process of the terminal's group.
    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return child.wait(), signalled
    except KeyboardInterrupt:
        return child.wait(), False
    finally:
        signal.signal(signal.SIGTERM, previous)
