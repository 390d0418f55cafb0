"""`vggt-fsdp train RECIPE [key=value ...]`: start the processes the recipe asks for and train.

The recipe's `accelerate:` section is written out as an Accelerate config file and handed to
`accelerate launch -m vggt_fsdp.train RECIPE [key=value ...]`, which starts num_processes training
processes on this machine (one node of num_machines; override accelerate.machine_rank and
accelerate.main_process_ip per node). SIGTERM is passed on to the launcher, whose processes save a
checkpoint at the next step boundary and exit; this command then exits 0 (see faults.py).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.max_steps=50 train.output_dir=runs/try1")
    parser.add_argument("--dry-run", action="store_true", help="print the launch command and exit")


def launch_command(config_file: Path, recipe: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "-m", "vggt_fsdp.train", recipe, *overrides]


def run(args: argparse.Namespace) -> int:
    from vggt_fsdp.parallel.accelerate import accelerate_config_yaml
    from vggt_fsdp.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)  # fail here, before starting any process
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="vggt-fsdp-") as tmp:
        config_file = Path(tmp) / "accelerate_config.yaml"
        config_file.write_text(accelerate_config_yaml(recipe))
        command = launch_command(config_file, args.recipe, list(args.overrides))
        acc = recipe.accelerate
        print(f"[vggt-fsdp] launching {acc.get('num_processes')} process(es) "
              f"({'cpu' if acc.get('use_cpu') else 'gpu'}, {acc.get('num_machines', 1)} machine(s)): "
              + " ".join(command), file=sys.stderr, flush=True)
        if args.dry_run:
            print(config_file.read_text(), file=sys.stderr)
            return 0
        started = time.time()
        env = dict(os.environ)
        # After a SIGTERM the launcher's agent SIGKILLs its workers once this many seconds pass; they
        # need a step and a checkpoint save (torch's default is 30 s). A user's own value wins. Read by
        # torch.distributed.launcher.api.LaunchConfig in torch 2.13; older releases (before 2.12, by
        # one public report) ignore it and keep 30 s.
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
        code, signalled = _run_forwarding_signals(command, env)
    return _exit_code(code, signalled, Path(recipe.train.output_dir), started)


def _exit_code(code: int, signalled: bool, output_dir: Path, started: float) -> int:
    """The launcher's code, except after a forwarded SIGTERM that every rank answered by saving a
    checkpoint (the agent then exits 1 although nothing failed): 0, as for a direct run."""
    from vggt_fsdp.train.build import PREEMPTED_MARKER
    from vggt_fsdp.train.faults import PREEMPTED_EXIT_CODE

    marker = output_dir / PREEMPTED_MARKER
    if code != 0 and signalled and marker.is_file() and marker.stat().st_mtime >= started:
        info = json.loads(marker.read_text())
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
