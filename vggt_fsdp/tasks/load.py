"""The recipe's task, built: the built-in VGGT one (tasks/vggt.py) or `task: MODULE:CALLABLE` (tasks/base.py)."""
from __future__ import annotations

import torch

from vggt_fsdp.recipe import VGGT_SECTIONS
from vggt_fsdp.tasks.base import TaskError, TrainingTask, UserTask, import_callable
from vggt_fsdp.tasks.vggt import VGGTBuiltin
from vggt_fsdp.train.preflight import Problem


def build_task(recipe) -> TrainingTask:
    """The recipe's task: the built-in VGGT one, or CALLABLE(recipe) wrapped for the trainer. Raises
    TaskError (one line) for a task that cannot be loaded or lacks what the trainer needs."""
    if recipe.vggt_task:
        return VGGTBuiltin(recipe)
    try:
        factory, _ = import_callable(recipe.task)
    except ValueError as err:
        raise TaskError(str(err)) from None
    try:
        task = factory(recipe)
    except Exception as err:  # the user's code: one line that says where, not a traceback into ours
        raise TaskError(f"task {recipe.task!r}: calling it raised {type(err).__name__}: {err}") from err
    if isinstance(task, VGGTBuiltin):
        return task  # a task that extends VGGT (examples/vggt_rgb_head.py): it reads the VGGT sections
    if recipe.vggt_sections:
        raise TaskError(f"task {recipe.task!r} returned a {type(task).__name__}, which does not read the recipe's "
                        f"{', '.join(VGGT_SECTIONS)} sections (the built-in VGGT task's): remove them from the recipe "
                        "(a task's own settings go in task_config:)")
    return UserTask(task, recipe)


def preflight(recipe, task: TrainingTask | None = None, **kwargs) -> list[Problem]:
    """Every problem of the recipe and its task before launch (train/preflight.py's checks of the world
    and the layout against the task's model, after the task's own); a task that cannot be built is one."""
    from vggt_fsdp.train import preflight as checks

    if task is None:
        try:
            task = build_task(recipe)
        except TaskError as err:
            return [Problem("task", str(err).removeprefix("task "))]
    cuda = kwargs.get("cuda")
    if cuda is None:
        cuda = not recipe.accelerate.get("use_cpu", False) and torch.cuda.is_available()
    return task.problems(cuda) + checks.preflight(recipe, task.model, **kwargs)
