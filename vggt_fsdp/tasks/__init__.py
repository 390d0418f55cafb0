"""What the trainer trains: the built-in VGGT task and any task a recipe names (`task: MODULE:CALLABLE`)."""
from .base import Started, TaskError, TrainingTask
from .load import build_task, preflight

__all__ = ["Started", "TaskError", "TrainingTask", "build_task", "preflight"]
