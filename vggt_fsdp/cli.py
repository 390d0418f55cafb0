"""The `vggt-fsdp` command.

Each subcommand lives in its own module under `vggt_fsdp.commands` and is imported only when it is
called, so `vggt-fsdp summary` does not pay for the trainer's imports and a broken optional
dependency of one command cannot break the others. A command module provides
`build_parser(parser: argparse.ArgumentParser) -> None` and `run(args: argparse.Namespace) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module under vggt_fsdp.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "launch training of a recipe (starts the processes its accelerate: section asks for)"),
    "export": ("export", "consolidate a sharded checkpoint into one .safetensors with upstream names"),
    "recipe": ("recipe", "inspect recipes: `recipe show RECIPE`"),
    "accelerate-config": ("accelerate_config", "print a recipe's accelerate: section as an Accelerate config"),
    "plan": ("plan", "predict one GPU's peak memory for a recipe and fit frames per GPU"),
    "data": ("data", "inspect data: `data preview RECIPE --out DIR`"),
    "summary": ("summary", "parameter counts of a model preset (--json: the state-dict manifest)"),
    "parity": ("parity", "check the model against an upstream parity fixture directory"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vggt-fsdp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = _top_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(f"vggt_fsdp.commands.{COMMANDS[name][0]}")
    parser = argparse.ArgumentParser(prog=f"vggt-fsdp {name}", description=COMMANDS[name][1])
    module.build_parser(parser)
    return int(module.run(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
