"""Tasks: one file each, registered by name with :func:`register_task`. A new built-in task is a module
here plus its name in the import line below; a task of your own registers wherever it is imported."""

from hfx.trainers.tasks.base import TASKS, NoOptions, Task, TaskData, get_task, register_task, with_weights

# Built-in tasks register themselves on import: one name per task.
from hfx.trainers.tasks import causal_lm, contrastive, cyclegan, diffusion, dino, gan, image_classification, mae, moco, noisy_classifier, simclr, text_classification, text_to_image, vae  # noqa: E402,F401  isort: skip

__all__ = ["TASKS", "NoOptions", "Task", "TaskData", "get_task", "register_task", "with_weights"]
