"""Recipes are part of the package: the wheel carries recipes/ (and the SLURM script), `vggt-fsdp recipe
list | copy` work on them, and every command takes a bundled recipe's name where it takes a file."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import vggt_fsdp
from vggt_fsdp import bundled, cli
from vggt_fsdp.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel` builds from a copy of the sources (no build/ or egg-info in the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    src.mkdir()
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("vggt_fsdp", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(root / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (found,) = (root / "dist").glob("vggt_fsdp-*.whl")
    return found


def test_wheel_carries_every_recipe_and_the_slurm_script(wheel):
    assert wheel.name.startswith(f"vggt_fsdp-{vggt_fsdp.__version__}-")  # one version: the package's
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"vggt_fsdp/recipes/{p.name}" for p in RECIPES} | {f"vggt_fsdp/recipes/{bundled.SLURM_SCRIPT}"}
    expected |= {"vggt_fsdp/tasks/own_model.yaml", "vggt_fsdp/tasks/own_model.py"}  # `recipe copy own_model`
    assert expected <= names, sorted(expected - names)
    assert not any(name.startswith("recipes/") for name in names)  # inside the package, not top-level


def test_installed_wheel_lists_and_resolves_its_own_recipes(wheel, tmp_path):
    """Unpacked into a directory on PYTHONPATH and run elsewhere: the recipes come from the wheel."""
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = ("import vggt_fsdp.bundled as b; print(b.recipe_dir()); print(sorted(b.bundled_recipes())); "
            "print(b.slurm_script().is_file()); print(b.resolve_recipe('a100_40g'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(target)), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    where, names, has_slurm, resolved = result.stdout.splitlines()
    assert Path(where) == target / "vggt_fsdp" / "recipes"
    assert names == str(sorted(p.stem for p in RECIPES)) and has_slurm == "True"
    assert Path(resolved) == target / "vggt_fsdp" / "recipes" / "a100_40g.yaml"


# ----------------------------------------------------------------------------- one resolver
def test_source_checkout_uses_its_recipes_directory():
    assert bundled.recipe_dir() == REPO / "recipes"
    assert list(bundled.bundled_recipes()) == [p.stem for p in RECIPES]


@pytest.mark.parametrize("given, expected", [
    ("cpu_tiny", "recipes/cpu_tiny.yaml"),
    ("cpu_tiny.yaml", "recipes/cpu_tiny.yaml"),
    ("recipes/a100_40g.yaml", "recipes/a100_40g.yaml"),
])
def test_a_recipe_is_a_file_or_a_bundled_name(given, expected, monkeypatch):
    monkeypatch.chdir(REPO)
    assert bundled.resolve_recipe(given).resolve() == REPO / expected


def test_an_existing_file_wins_over_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (REPO / "recipes" / "cpu_tiny.yaml").read_text()
    (tmp_path / "cpu_tiny").write_text(text.replace("  max_steps: 200\n", "  max_steps: 3\n"))
    assert bundled.resolve_recipe("cpu_tiny") == Path("cpu_tiny")
    assert load_recipe("cpu_tiny").train.max_steps == 3


@pytest.mark.parametrize("given", ["nothere", "sub/cpu_tiny", "nothere.yaml"])
def test_an_unknown_recipe_names_the_bundled_ones(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    every_recipe = ", ".join(sorted(p.stem for p in (REPO / "recipes").glob("*.yaml")))
    assert every_recipe.startswith("a100_40g, ")  # the listing below is the recipes directory, sorted
    with pytest.raises(RecipeError, match=r"neither a file nor a bundled recipe's name; bundled recipes: "
                                          + re.escape(every_recipe) + r" \(`vggt-fsdp recipe list`\)"):
        load_recipe(given)


@pytest.mark.parametrize("argv", [
    ["recipe", "show", "cpu_tiny", "--plan-only"],
    ["accelerate-config", "cpu_tiny"],
    ["plan", "cpu_tiny", "--gpu-memory", "24"],
    ["data", "preview", "cpu_tiny", "--out", "preview"],
    ["train", "cpu_tiny", "--dry-run"],
], ids=lambda argv: " ".join(argv[:2]))
def test_commands_take_a_bundled_name(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: only the name can find it
    assert cli.main(argv) == 0, capsys.readouterr().err


# ----------------------------------------------------------------------------- recipe list / copy
@pytest.mark.parametrize("width", [80, 100])
def test_recipe_list_names_each_recipe_with_its_card_processes_frames_and_purpose(width, capsys, monkeypatch):
    """Within the terminal's width (it was hundreds of columns wide), and no recipe's card "unstated"."""
    from vggt_fsdp.hardware import card

    monkeypatch.setenv("COLUMNS", str(width))
    assert cli.main(["recipe", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= width
    rows = {line.split()[0]: line for line in lines[1:] if not line.startswith(("#", " "))}
    assert sorted(rows) == [p.stem for p in RECIPES]
    assert not [name for name, row in rows.items() if "unstated" in row]
    purposes = {line.split()[0]: lines[i + 1] for i, line in enumerate(lines) if line.split()[0] in rows}
    a100_40g = f"a100_40g, {card('a100_40g').memory_gib:g} GiB"
    assert re.fullmatch(rf"a100_40g +{a100_40g} +8 GPU +24", rows["a100_40g"])
    assert purposes["a100_40g"].startswith("    train VGGT-1B (trainable aggregator")
    assert re.fullmatch(r"cpu_tiny +cpu, 4 GiB a process +2 CPU +4", rows["cpu_tiny"])
    assert purposes["cpu_tiny"].startswith("    the tiny VGGT on built-in synthetic scenes")
    assert re.fullmatch(r"gpu24g_single +gpu, 22 GiB \(any CUDA card\) +1 GPU +59", rows["gpu24g_single"])


def test_recipe_copy_writes_a_recipe_that_loads_and_the_slurm_script_on_request(tmp_path, capsys):
    dest = tmp_path / "mine" / "train.yaml"
    assert cli.main(["recipe", "copy", "a100_40g", str(dest)]) == 0
    assert dest.read_bytes() == (REPO / "recipes" / "a100_40g.yaml").read_bytes()
    assert not (dest.parent / "train_multinode.sbatch").exists()
    assert cli.main(["recipe", "show", str(dest), "--plan-only"]) == 0
    assert cli.main(["recipe", "copy", "a100_40g", str(dest)]) == 2  # no silent overwrite
    assert "pass --force" in capsys.readouterr().err
    assert cli.main(["recipe", "copy", "cpu_tiny", str(tmp_path / "mine"), "--slurm"]) == 0
    assert (tmp_path / "mine" / "cpu_tiny.yaml").is_file()
    copied = (tmp_path / "mine" / "train_multinode.sbatch").read_text()  # with cpu_tiny's resources (test_slurm.py)
    assert "#SBATCH --cpus-per-task=2\n" in copied and copied.startswith(bundled.slurm_script().read_text()[:200])


# ----------------------------------------------------------------------------- a clone stands alone
CITED = re.compile(r"(?<![\w./-])((?:benchmarks|docs|examples|recipes|tests|vggt_fsdp|\.ci)/[\w./-]*[\w/])")
IN_THE_WHEEL_ONLY = {"vggt_fsdp/recipes/"}  # where a wheel puts recipes/


def test_every_repository_path_the_docs_and_recipes_cite_exists():
    documents = [REPO / "README.md", REPO / "tests" / "fixtures" / "README.md", *RECIPES,
                 REPO / "recipes" / bundled.SLURM_SCRIPT]
    missing = {(doc.name, path) for doc in documents for path in CITED.findall(doc.read_text())
               if path not in IN_THE_WHEEL_ONLY and not (REPO / path).exists()}
    assert not missing
