"""The `vggt-fsdp` command.

Each subcommand lives in its own module under `vggt_fsdp.commands` and is imported only when it is
called, so `vggt-fsdp summary` does not pay for the trainer's imports and a broken optional
dependency of one command cannot break the others. A command module provides
`build_parser(parser: argparse.ArgumentParser) -> None` and `run(args: argparse.Namespace) -> int`;
one that takes a recipe declares it with `add_recipe_arguments`, so every command takes a recipe the same
way (a path or a bundled recipe's name, then positional `key=value` overrides), and `key=value` overrides
may come before or after the command's flags (`parse_command`). A module's `EXAMPLES` (text) ends its
`--help`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

# name -> (module under vggt_fsdp.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "launch training of a recipe (starts the processes its accelerate: section asks for)"),
    "export": ("export", "consolidate a sharded checkpoint into one .safetensors with upstream names"),
    "recipe": ("recipe", "the bundled recipes and any recipe: `recipe list`, `recipe show RECIPE`, `recipe copy NAME DEST`"),
    "accelerate-config": ("accelerate_config", "print a recipe's accelerate: section as an Accelerate config"),
    "plan": ("plan", "one GPU's peak memory and step time for a recipe; --optimize: the fastest that fits"),
    "data": ("data", "inspect data: `data preview RECIPE --out DIR`, `data check RECIPE` (every file read once)"),
    "summary": ("summary", "parameter counts of a model preset (--json: the state-dict manifest)"),
    "parity": ("parity", "check the model against an upstream parity fixture directory"),
    "env": ("env", "versions, devices, CPUs, memory and git commit: what a bug report needs"),
}

# A `key=value` override as a command line holds it: a dotted key (list items by index allowed), `=`.
OVERRIDE = re.compile(r"^[A-Za-z_][\w\[\]-]*(?:\.[\w\[\]-]+)*=")


def add_recipe_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """The recipe positional and its `key=value` overrides (`example`: one such override)."""
    parser.add_argument("recipe", help="recipe file, or a bundled recipe's name (`vggt-fsdp recipe list`)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")


def version() -> str:
    """This package's version and the versions of what it runs on (read without importing them)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from vggt_fsdp import __version__

    def of(name: str) -> str:
        try:
            return installed(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"vggt-fsdp {__version__} (torch {of('torch')}, accelerate {of('accelerate')}, "
            f"python {sys.version.split()[0]})")


def _top_parser() -> argparse.ArgumentParser:
    import vggt_fsdp

    parser = argparse.ArgumentParser(prog="vggt-fsdp", description=vggt_fsdp.__doc__)
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except BrokenPipeError:
        # The reader went away (`vggt-fsdp summary --json | head`): stop quietly, as a command killed by
        # SIGPIPE would. stdout now points at nothing, so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # 128 + SIGPIPE, the status a shell reports for such a command


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        if not argv:
            parser.print_help()
            return 2
        if argv[0] not in ("-h", "--help", "--version"):
            parser.error(f"unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}")
        parser.parse_args(argv[:1])  # prints the help or the version, and exits 0
    module, args = parse_command(argv[0], argv[1:])
    return int(module.run(args) or 0)


def command_parser(name: str) -> tuple[object, argparse.ArgumentParser]:
    """A command's module and its parser (its examples as the help's epilog)."""
    module = importlib.import_module(f"vggt_fsdp.commands.{COMMANDS[name][0]}")
    examples = getattr(module, "EXAMPLES", "")
    parser = argparse.ArgumentParser(prog=f"vggt-fsdp {name}", description=COMMANDS[name][1],
                                     epilog=f"examples:\n{examples}" if examples else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.build_parser(parser)
    for action in parser._actions:  # `recipe show --help`, `data check --help`: their own examples
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                own = [line for line in examples.splitlines() if f"vggt-fsdp {name} {sub_name} " in line + " "]
                if own:
                    sub.epilog, sub.formatter_class = "examples:\n" + "\n".join(own), parser.formatter_class
    return module, parser


def parse_command(name: str, rest: list[str]) -> tuple[object, argparse.Namespace]:
    """Parse a command's arguments with `key=value` overrides anywhere among its flags.

    argparse fills the recipe and the overrides from the first run of positionals only, so an override
    after a flag (`train cpu_tiny --dry-run train.output_dir=X`) comes back unrecognised; those are
    appended to the overrides in the order given (a later one still wins). Anything else unrecognised
    is the usual error. (`parse_intermixed_args` would do this, but refuses parsers with sub-commands.)
    """
    module, parser = command_parser(name)
    args, extras = parser.parse_known_args(rest)
    late = [item for item in extras if OVERRIDE.match(item)]
    if late and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late]
        extras = [item for item in extras if item not in late]
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return module, args


if __name__ == "__main__":
    sys.exit(main())
