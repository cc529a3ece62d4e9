"""The training engine: one Accelerate loop for every task (see :mod:`hfx.trainers.engine`).

Public API::

    from hfx.trainers import train, load_config, register_task, register_schedule, register_callback
    result = train("classify-digits", ["train.max_steps=100", "output_dir=outputs/try"])
"""

from hfx.trainers.callbacks import CALLBACKS, Callback, register_callback
from hfx.trainers.config import TrainConfig, bounded
from hfx.trainers.ema import EMA
from hfx.trainers.engine import Trainer, TrainResult, train
from hfx.trainers.errors import ConfigError, NonFiniteLossError, ResumeError
from hfx.trainers.recipe import load_config
from hfx.trainers.schedules import SCHEDULES, register_schedule
from hfx.trainers.state import RunState, TrainerControl
from hfx.trainers.tasks import TASKS, Task, TaskData, get_task, register_task, with_weights

__all__ = [
    "CALLBACKS", "EMA", "SCHEDULES", "TASKS", "Callback", "ConfigError", "NonFiniteLossError", "ResumeError", "RunState",
    "Task", "TaskData", "TrainConfig", "TrainResult", "Trainer", "TrainerControl", "bounded", "get_task", "load_config",
    "register_callback", "register_schedule", "register_task", "train", "with_weights",
]
