"""The training engine: one Accelerate loop for every task (see :mod:`hfx.trainers.engine`).

Public API::

    from hfx.trainers import train, load_config, register_task, register_schedule, register_callback
    result = train("classify-digits", ["train.max_steps=100", "output_dir=outputs/try"])
"""

from hfx.trainers.callbacks import CALLBACKS, Callback, register_callback
from hfx.trainers.config import ConfigError, TrainConfig, load_config
from hfx.trainers.ema import EMA
from hfx.trainers.engine import NonFiniteLossError, Trainer, TrainResult, train
from hfx.trainers.schedules import SCHEDULES, register_schedule
from hfx.trainers.tasks import TASKS, Task, TaskData, get_task, register_task

__all__ = [
    "CALLBACKS", "EMA", "SCHEDULES", "TASKS", "Callback", "ConfigError", "NonFiniteLossError", "Task", "TaskData",
    "TrainConfig", "TrainResult", "Trainer", "get_task", "load_config", "register_callback", "register_schedule",
    "register_task", "train",
]
