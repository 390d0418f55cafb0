"""The `vggt-fsdp` command as a whole: one way to pass a recipe and overrides, --version, help and
errors, and a quiet end when the reader of its output goes away."""
from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path
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
    return cli.parse_command(argv[0], argv[1:])[1]


@pytest.mark.parametrize("command, extra", RECIPE_COMMANDS, ids=[" ".join(c) for c, _ in RECIPE_COMMANDS])
def test_every_recipe_command_takes_positional_key_value_overrides(command, extra):
    args = _parse([*command, "cpu_tiny", "train.max_steps=5", "data.frames_range=[2, 4]", *extra])
    assert args.recipe == "cpu_tiny"
    assert args.overrides == ["train.max_steps=5", "data.frames_range=[2, 4]"]


# (arguments after the command's recipe; a flag of that command, with its value)
FLAGS = {"train": ["--dry-run"], "recipe show": ["--plan-only"], "accelerate-config": ["-o", "acc.yaml"],
         "plan": ["--json"], "data preview": ["--out", "preview"]}


@pytest.mark.parametrize("command, extra", RECIPE_COMMANDS, ids=[" ".join(c) for c, _ in RECIPE_COMMANDS])
def test_overrides_and_flags_mix_in_any_order(command, extra):
    """`train cpu_tiny --dry-run train.output_dir=X` failed with `unrecognized arguments` before: argparse
    fills the overrides from the first run of positionals only."""
    flags = FLAGS[" ".join(command)]
    args = _parse([*command, "cpu_tiny", "train.max_steps=5", *flags, "data.seed=-1", "train.max_steps=7", *extra])
    assert args.recipe == "cpu_tiny"
    assert args.overrides == ["train.max_steps=5", "data.seed=-1", "train.max_steps=7"]  # in order: the last wins
    assert _parse([*command, *flags, "cpu_tiny", "a.b=1", *extra]).overrides == ["a.b=1"]


@pytest.mark.parametrize("stray", ["--no-such-flag", "not_an_override", "=5"])
def test_anything_else_left_over_is_still_an_error(stray, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(["train", "cpu_tiny", "--dry-run", "train.max_steps=5", stray])
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {stray}" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_commands_help_ends_with_examples_of_it(name):
    _, parser = cli.command_parser(name)
    examples = parser.format_help().split("examples:\n", 1)[1].splitlines()
    assert examples and all(line.startswith(("  vggt-fsdp ", "  accelerate launch ")) for line in examples)
    assert any(line.startswith(f"  vggt-fsdp {name}") for line in examples)


@pytest.mark.parametrize("argv", [["recipe", "show"], ["recipe", "list"], ["data", "check"]])
def test_a_sub_commands_help_has_its_own_examples(argv, capsys):
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    examples = capsys.readouterr().out.split("examples:\n", 1)[1].splitlines()
    assert examples and all(line.startswith(f"  vggt-fsdp {' '.join(argv)}") for line in examples)


def test_env_reports_what_a_bug_report_needs(capsys):
    import json

    import torch

    assert cli.main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == version("torch") and info["accelerate"] == version("accelerate")
    assert info["vggt_fsdp"].startswith(vggt_fsdp.__version__) and info["python"].startswith(sys.version.split()[0])
    assert info["torch built with"].startswith("CUDA" if torch.version.cuda else "no CUDA")
    assert len(info["devices"]) == max(torch.cuda.device_count(), 1)
    assert info["CPUs"].startswith(str(os.cpu_count())) and info["memory"].endswith("GiB available")
    # This test runs from a checkout (a clean clone in CI); an installed copy reports no commit.
    assert info["git commit"] == "not a git checkout" or len(info["git commit"].split("+")[0]) == 12
    assert info["accelerate default config"] == "none" or os.path.isfile(info["accelerate default config"])
    assert cli.main(["env"]) == 0
    assert "torch " in capsys.readouterr().out


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


def test_a_recipe_this_machine_cannot_run_is_one_line_under_accelerate_launch(tmp_path):
    """`accelerate launch recipes/a100_40g.yaml` without a GPU buried its one clear line in 69 lines with two
    tracebacks; now the trainer's part is that line and a note on the launcher's own traceback."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "a100_40g.yaml"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", str(recipe),
                           f"train.output_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    line = ("error: accelerate.use_cpu: false, but this machine has no CUDA device; run on a GPU machine, or set "
            "accelerate.use_cpu=true with a CPU recipe")
    assert line in proc.stderr.splitlines()
    assert "`accelerate launch --quiet` leaves it out" in proc.stderr
    assert "vggt_fsdp" not in "".join(l for l in proc.stderr.splitlines() if l.lstrip().startswith("File "))
    assert not (tmp_path / "run").exists()
