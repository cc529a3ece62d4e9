"""ReLoRA as a peft method: config, tuner, restart logic, jagged schedule, Trainer callback."""

from hfx.peft.relora.callback import ReLoraCallback
from hfx.peft.relora.config import ReLoraConfig
from hfx.peft.relora.layer import ReLoraLinear
from hfx.peft.relora.model import ReLoraModel
from hfx.peft.relora.restart import (
    ReLoraRestartStats,
    prune_optimizer_state,
    relora_config_of,
    relora_layers,
    relora_restart,
)
from hfx.peft.relora.schedule import (
    get_jagged_cosine_schedule,
    get_relora_schedule,
    is_restart_step,
    jagged_cosine_multiplier,
    relora_multiplier,
)

__all__ = [
    "ReLoraCallback",
    "ReLoraConfig",
    "ReLoraLinear",
    "ReLoraModel",
    "ReLoraRestartStats",
    "get_jagged_cosine_schedule",
    "get_relora_schedule",
    "relora_multiplier",
    "is_restart_step",
    "jagged_cosine_multiplier",
    "prune_optimizer_state",
    "relora_config_of",
    "relora_layers",
    "relora_restart",
]
