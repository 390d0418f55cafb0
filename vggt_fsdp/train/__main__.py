"""`python -m vggt_fsdp.train RECIPE [key=value ...]`: one training process.

Run it under a launcher for several processes (`accelerate launch -m vggt_fsdp.train ...`,
`torchrun --nproc-per-node N -m vggt_fsdp.train ...`); it trains with the topology the launcher gives
and says so when that differs from the recipe's `accelerate:` section. `vggt-fsdp train` is the
launcher that starts what the recipe asks for.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vggt_fsdp.train", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.max_steps=5 train.output_dir=runs/x")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # As upstream trains: fewer fragmentation OOMs with varying batch shapes; the memory planner
    # assumes it. Must be set before CUDA's allocator starts; a user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from vggt_fsdp.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from vggt_fsdp.train.build import run

    return run(recipe)


if __name__ == "__main__":
    sys.exit(main())
