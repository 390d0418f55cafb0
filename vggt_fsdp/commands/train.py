"""`vggt-fsdp train RECIPE [key=value ...]`: start the processes the recipe asks for and train.

The recipe's `accelerate:` section is written out as an Accelerate config file and handed to
`accelerate launch -m vggt_fsdp.train RECIPE [key=value ...]`, which starts num_processes training
processes on this machine (one node of num_machines; override accelerate.machine_rank and
accelerate.main_process_ip per node). SIGTERM/SIGINT are passed on to the launcher, whose processes
save a checkpoint at the next step boundary and exit.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
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
        return _run_forwarding_signals(command, dict(os.environ))


def _run_forwarding_signals(command: list[str], env: dict[str, str]) -> int:
    child = subprocess.Popen(command, env=env)

    def forward(signum, frame):
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
