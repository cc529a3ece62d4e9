"""Plug hfx's PEFT methods into peft's method tables.

peft 0.21's public ``peft.utils.register_peft_method`` accepts only names already in its closed ``PeftType``
enum. Its dispatch, though, is a plain dict lookup on the config's type string (``get_peft_model``,
``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained``), so a method is added by writing its own key,
a ``str`` enum member owned by hfx, into the four tables of ``peft.mapping``. The key compares and hashes
equal to the string saved in ``adapter_config.json`` (``"peft_type": "RELORA"``), which is what loading looks up.
"""

from __future__ import annotations

import enum


class HfxPeftType(str, enum.Enum):
    """PEFT types defined by hfx (the value is what ``adapter_config.json`` stores as ``peft_type``)."""

    RELORA = "RELORA"
    BOTTLENECK_ADAPTER = "BOTTLENECK_ADAPTER"

    def __str__(self) -> str:  # json/str round trip gives the bare value, like peft's own PeftType
        return self.value


def register_peft_method(peft_type: HfxPeftType, config_cls: type, model_cls: type, prefix: str) -> None:
    """Make ``peft_type`` known to peft (config, tuner and parameter prefix). Idempotent.

    Raises:
        ValueError: the type is already registered to different classes (two packages claiming one name).
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    for table, value in (
        (PEFT_TYPE_TO_CONFIG_MAPPING, config_cls),
        (PEFT_TYPE_TO_TUNER_MAPPING, model_cls),
        (PEFT_TYPE_TO_PREFIX_MAPPING, prefix),
    ):
        existing = table.get(peft_type)
        if existing is not None and existing != value:
            raise ValueError(f"PEFT type {peft_type.value!r} is already registered to {existing!r}, not {value!r}")
        table[peft_type] = value
