"""Starter tasks `vggt-fsdp recipe copy NAME DIR` writes: a recipe and its task module, to edit into your own.

The files ship inside the package (setup.cfg's package data); the recipe's `task:` names the module by
a path relative to the recipe, so the copy trains from any working directory with no edits.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> files copied, the recipe first
STARTERS: dict[str, tuple[Path, ...]] = {
    "own_model": (HERE / "own_model.yaml", HERE / "own_model.py"),
}
