"""The `vggt-fsdp` command as a whole: one way to pass a recipe and overrides, --version, help and
errors, and a quiet end when the reader of its output goes away."""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from importlib.metadata import version

import pytest

import vggt_fsdp
from vggt_fsdp import cli

# Every command that takes a recipe, with the arguments it needs besides the recipe and overrides.
RECIPE_COMMANDS = [
    (["train"], []),
    (["recipe", "show"], []),
    (["accelerate-config"], []),
    (["plan"], []),
    (["data", "preview"], ["--out", "preview"]),
]


def _parse(argv: list[str]) -> argparse.Namespace:
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(f"vggt_fsdp.commands.{cli.COMMANDS[name][0]}")
    parser = argparse.ArgumentParser(prog=f"vggt-fsdp {name}")
    module.build_parser(parser)
    return parser.parse_args(rest)


@pytest.mark.parametrize("command, extra", RECIPE_COMMANDS, ids=[" ".join(c) for c, _ in RECIPE_COMMANDS])
def test_every_recipe_command_takes_positional_key_value_overrides(command, extra):
    args = _parse([*command, "cpu_tiny", "train.max_steps=5", "data.frames_range=[2, 4]", *extra])
    assert args.recipe == "cpu_tiny"
    assert args.overrides == ["train.max_steps=5", "data.frames_range=[2, 4]"]


def test_version_names_the_package_and_what_it_runs_on(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"vggt-fsdp {vggt_fsdp.__version__} (torch {version('torch')}, accelerate {version('accelerate')}, "
        f"python {sys.version.split()[0]})")


def test_help_lists_every_command_and_no_command_is_an_error(capsys):
    assert cli.main([]) == 2
    listing = capsys.readouterr().out
    assert all(name in listing for name in cli.COMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tarin"])
    assert exit_info.value.code == 2
    assert "unknown command 'tarin'; valid commands: train, " in capsys.readouterr().err


def test_a_closed_pipe_ends_the_command_quietly():
    """`vggt-fsdp summary --json | head`: no BrokenPipeError traceback, the status of a SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "vggt_fsdp.cli", "summary", "vggt-tiny", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write: that write fails, whatever its size
    _, err = proc.communicate(timeout=120)
    assert err.decode() == ""
    assert proc.returncode == 128 + 13
