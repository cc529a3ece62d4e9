"""Tasks: one file each, registered by name. A new task is a module here (or anywhere imported before the
run) with a :class:`Task` subclass decorated by :func:`register_task`."""

from hfx.trainers.tasks.base import TASKS, NoOptions, Task, TaskData, get_task, register_task

# Built-in tasks register themselves on import.
from hfx.trainers.tasks import causal_lm, diffusion, image_classification, vae  # noqa: E402,F401  isort: skip

__all__ = ["TASKS", "NoOptions", "Task", "TaskData", "get_task", "register_task"]
