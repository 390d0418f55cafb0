"""The recipes that ship with the package, and the one rule by which a command finds a recipe.

The repository keeps them in its top-level `recipes/` (so a clone runs `accelerate launch
recipes/a100_40g.yaml`); a wheel carries that same directory as `vggt_fsdp/recipes/` (setup.py maps
it). `recipe_dir()` is where this installation has them: inside the package when it was installed from
a wheel, else the checkout's `recipes/` when the package is imported from a source checkout (`pip
install -e .`, PYTHONPATH).

Every command that takes a recipe takes a path or a bundled recipe's name: `resolve_recipe` is called by
`vggt_fsdp.recipe.load_recipe`, which all of them use. An existing file always wins; otherwise a bare
name (`a100_40g` or `a100_40g.yaml`) means the bundled recipe.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SLURM_SCRIPT = "slurm/train_multinode.sbatch"  # relative to the recipe directory
SUFFIX = ".yaml"


def recipe_dir() -> Path:
    installed = PACKAGE_DIR / "recipes"
    if installed.is_dir():
        return installed
    checkout = PACKAGE_DIR.parent
    if (checkout / "setup.cfg").is_file() and (checkout / "recipes").is_dir():
        return checkout / "recipes"
    raise FileNotFoundError(f"this installation of vggt_fsdp has no bundled recipes (neither {installed} nor "
                            f"a source checkout's recipes/ beside {PACKAGE_DIR}); reinstall the package")


def bundled_recipes() -> dict[str, Path]:
    """name -> file, sorted by name."""
    return {path.stem: path for path in sorted(recipe_dir().glob(f"*{SUFFIX}"))}


def slurm_script() -> Path:
    return recipe_dir() / SLURM_SCRIPT


def resolve_recipe(recipe: str | Path) -> Path:
    """The recipe file `recipe` names: an existing file, or a bundled recipe's name. FileNotFoundError
    names both and lists the bundled recipes."""
    path = Path(recipe)
    if path.is_file():
        return path
    text = str(recipe)
    if "/" not in text and "\\" not in text:
        found = bundled_recipes().get(text.removesuffix(SUFFIX))
        if found is not None:
            return found
    names = ", ".join(bundled_recipes())
    raise FileNotFoundError(f"recipe {text!r} is neither a file nor a bundled recipe's name; bundled recipes: "
                            f"{names} (`vggt-fsdp recipe list`)")
