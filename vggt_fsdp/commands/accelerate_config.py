"""`vggt-fsdp accelerate-config RECIPE [key=value ...] [--output FILE]`: the recipe's `accelerate:`
section as an Accelerate config file, e.g. for `accelerate launch --config_file FILE ...`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser(parser: argparse.ArgumentParser) -> None:
    from vggt_fsdp.cli import add_recipe_arguments

    add_recipe_arguments(parser, "accelerate.num_machines=2")
    parser.add_argument("--output", "-o", type=Path, help="write the config here instead of stdout")


def run(args: argparse.Namespace) -> int:
    from vggt_fsdp.parallel.accelerate import accelerate_config_yaml
    from vggt_fsdp.recipe import load_recipe_or_exit

    recipe = load_recipe_or_exit(args.recipe, args.overrides)
    text = accelerate_config_yaml(recipe)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0
