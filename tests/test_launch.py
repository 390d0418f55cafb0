"""Every recipe in recipes/ is at once a YAML recipe and a Python script that trains it, so launchers run
it as they run a training script: `accelerate launch RECIPE.yaml`, `torchrun ... RECIPE.yaml`,
`python RECIPE.yaml` (vggt_fsdp/recipe_script.py describes the layout)."""
from __future__ import annotations

import ast
import json
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vggt_fsdp import recipe_script
from vggt_fsdp.recipe import RecipeError, _RecipeLoader, dump_recipe, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))  # globbed: a recipe added later is checked too
TINY_RECIPE = REPO / "recipes" / "cpu_tiny.yaml"


def test_recipes_are_found():
    assert {p.stem for p in RECIPES} >= {"cpu_tiny", "a100_40g", "a100_80g"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_yaml_for_every_loader_and_the_script_key_is_not_in_the_typed_recipe(path):
    text = path.read_text()
    for loader in (yaml.SafeLoader, _RecipeLoader):
        raw = yaml.load(text, Loader=loader)
        assert next(iter(raw)) == recipe_script.SCRIPT_KEY, (
            f"{path.name}: a bundled recipe must be runnable: its first key is `{recipe_script.SCRIPT_KEY}: "
            f"{recipe_script.OPENING}` and its last line is\n{recipe_script.LAST_LINE}")
        assert raw[recipe_script.SCRIPT_KEY] == recipe_script.OPENING
    dumped = dump_recipe(load_recipe(path))
    assert recipe_script.SCRIPT_KEY not in dumped and recipe_script.SCRIPT_KEY not in yaml.safe_load(dumped)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_python_reads_the_recipe_as_a_string_and_a_call_to_the_trainer(path):
    text = path.read_text()
    module = ast.parse(path.read_bytes(), filename=str(path))
    annotated, *calls = module.body
    assert isinstance(annotated, ast.AnnAssign) and annotated.target.id == recipe_script.SCRIPT_KEY
    swallowed = annotated.annotation.value  # the raw string: the whole recipe, untouched by Python
    assert "\nmodel:" in swallowed and "\ntrain:" in swallowed
    assert swallowed == text[text.index(recipe_script.OPENING) + 4: text.rindex('"""')]
    assert "\n".join(map(ast.unparse, calls)) == ("import sys\nfrom vggt_fsdp.train.__main__ import run_recipe_script\n"
                                  "run_recipe_script(__file__, sys.argv)")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_header_says_how_to_run_the_recipe_first(path):
    header = path.read_text().splitlines()[:8]
    run = [line for line in header if "launch" in line or "train" in line]
    assert any(line.startswith("# Run:") for line in header), f"{path.name}: no `# Run:` line in the first 8"
    assert any(f"recipes/{path.name}" in line for line in run) and any(path.stem in line for line in run)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_running_the_file_trains_it_with_the_command_line_as_overrides(path, monkeypatch):
    """What `python RECIPE.yaml ARGS` (and so accelerate launch / torchrun) executes, in-process."""
    import vggt_fsdp.train.__main__ as entry
    from vggt_fsdp.train import faults

    calls = []
    monkeypatch.setattr(entry, "main", lambda argv, prog, script: calls.append((argv, prog, script)) or 7)
    monkeypatch.setattr(faults, "_exit", sys.exit)  # the process ends with os._exit (faults.end_process)
    monkeypatch.setattr(sys, "argv", ["ignored", "train.max_steps=2", "train.output_dir=OUT"])  # run_path sets [0]
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(path), run_name="__main__")
    assert exit_info.value.code == 7  # the trainer's exit status is the process's
    assert calls == [(["train.max_steps=2", "train.output_dir=OUT"], f"python {path}", str(path))]


def test_a_recipe_run_as_a_script_takes_only_overrides(capsys):
    from vggt_fsdp.train.__main__ import parse_args

    args = parse_args(["train.max_steps=2"], "python my.yaml", script="/abs/my.yaml")
    assert (args.recipe, args.overrides) == ("/abs/my.yaml", ["train.max_steps=2"])
    with pytest.raises(SystemExit):
        parse_args(["--help"], "python my.yaml", script="/abs/my.yaml")
    assert capsys.readouterr().out.startswith("usage: python my.yaml [-h] [key=value ...]")


# ----------------------------------------------------------------------------- the loader guards the layout
def _broken(text: str, case: str) -> str:
    lines = text.splitlines(keepends=True)
    if case == "key after the last line":
        return text + "extra: 1\n"
    if case == "triple quotes in a value":
        return text.replace("\nmodel:\n", '\nmodel:\n  init_weights: \'a"""b\'\n', 1)
    if case == "script key not first":
        first = next(i for i, line in enumerate(lines) if line.startswith(recipe_script.SCRIPT_KEY))
        lines.insert(first, "loss: {}\n")
        return "".join(lines)
    if case == "last line missing":
        return "".join(lines[:-1])
    if case == "encoding cookie in the header":
        return "# this header names an encoding: 8 frames\n" + text
    if case == "other value":
        return text.replace(f"{recipe_script.SCRIPT_KEY}: {recipe_script.OPENING}", f"{recipe_script.SCRIPT_KEY}: yes", 1)
    raise AssertionError(case)


@pytest.mark.parametrize("case, message", [
    ("key after the last line", "must end with the line that closes it"),
    ("triple quotes in a value", 'may hold """ only on its first key'),
    ("script key not first", "first key must be"),
    ("last line missing", "must end with the line that closes it"),
    ("encoding cookie in the header", "Python cannot read this recipe as a script (unknown encoding"),
    ("other value", f"first key must be `{recipe_script.SCRIPT_KEY}: {recipe_script.OPENING}`"),
])
def test_loader_rejects_a_layout_python_cannot_run_and_names_the_fix(case, message, tmp_path):
    path = tmp_path / "edited.yaml"
    path.write_text(_broken(TINY_RECIPE.read_text(), case))
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(path)


def test_the_script_key_holds_nothing_else():
    with pytest.raises(RecipeError, match="is reserved for the line that makes a recipe runnable"):
        recipe_from_dict({recipe_script.SCRIPT_KEY: "anything"})


def test_a_recipe_without_the_script_key_is_a_plain_yaml_recipe(tmp_path):
    text = TINY_RECIPE.read_text()
    plain = "\n".join(line for line in text.splitlines()
                      if not line.startswith((recipe_script.SCRIPT_KEY, '# """'))) + "\n"
    (tmp_path / "plain.yaml").write_text(plain)
    assert load_recipe(tmp_path / "plain.yaml") == load_recipe(TINY_RECIPE)


# ----------------------------------------------------------------------------- a real launch
@pytest.mark.parametrize("launch", [
    # Accelerate starts the 2 processes (FSDP launches go through torchrun)
    ["--use_fsdp", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
     "--dynamo_backend", "no"],
    # Accelerate starts 1 process; the recipe script starts the 2 asked for (train/cpu_launch.py)
    ["--cpu", "--num_processes", "2"],
], ids=["use_fsdp", "cpu"])
def test_accelerate_launch_of_the_recipe_file_trains_on_two_processes(launch, tmp_path):
    """`accelerate launch --use_fsdp|--cpu --num_processes 2 recipes/cpu_tiny.yaml key=value ...`, literally."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "recipes/cpu_tiny.yaml",
               "train.max_steps=2", f"train.output_dir={out}", "train.log_every=1", "train.progress_bar=false",
               "train.export_final=false", "data.image_width=56", "data.frames_range=[2,2]",
               "data.frames_per_gpu=2", "data.num_workers=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"timed out: {' '.join(command)}\n{err[-4000:]}")
    assert proc.returncode == 0, err[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert {r["world_size"] for r in records} == {2}
    assert "launched with" not in err  # the launcher's topology is the recipe's: no notice
