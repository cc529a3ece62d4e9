"""hfx's additions to peft: ReLoRA (config, tuner, restart logic, jagged schedule, Trainer callback) and
bottleneck adapters (Houlsby).

Importing this package (``import hfx`` does) registers the methods with peft, so ``get_peft_model``,
``PeftConfig.from_pretrained`` and ``PeftModel.from_pretrained`` know them. Registration is idempotent.
Saved adapters spell their type as a sentence that tells a process without hfx to install and import it (the
text of peft's ``KeyError`` there); see :mod:`hfx.peft._registration`.
"""

from hfx.peft._registration import HfxPeftType, register_peft_method
from hfx.peft.bottleneck import BottleneckAdapterConfig, BottleneckAdapterLayer, BottleneckAdapterModel
from hfx.peft.relora import (
    ReLoraCallback,
    ReLoraConfig,
    ReLoraLinear,
    ReLoraModel,
    ReLoraRestartStats,
    get_jagged_cosine_schedule,
    get_relora_schedule,
    is_restart_step,
    jagged_cosine_multiplier,
    prune_optimizer_state,
    relora_config_of,
    relora_layers,
    relora_multiplier,
    relora_restart,
)

register_peft_method(HfxPeftType.RELORA, ReLoraConfig, ReLoraModel, prefix="lora_")
register_peft_method(HfxPeftType.BOTTLENECK_ADAPTER, BottleneckAdapterConfig, BottleneckAdapterModel, prefix="bottleneck_")

__all__ = [
    "BottleneckAdapterConfig",
    "BottleneckAdapterLayer",
    "BottleneckAdapterModel",
    "HfxPeftType",
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
