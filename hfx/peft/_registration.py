"""Plug hfx's PEFT methods into peft's method tables.

peft 0.21's public ``peft.utils.register_peft_method`` accepts only names already in its closed ``PeftType``
enum. Its dispatch, though, is a plain dict lookup on the config's type string (``get_peft_model``,
``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained``), so a method is added by writing its own key,
a ``str`` enum member owned by hfx, into the tables of ``peft.mapping``.

Loading where hfx is not imported. peft looks the ``peft_type`` string of ``adapter_config.json`` up in those
tables, and a string it does not know fails with ``KeyError: '<that string>'`` before anything else is read:
the saved string is the only text such a user sees, and nothing hfx could run is running. So hfx saves the type
as a sentence (:class:`SavedPeftType`, e.g. ``"RELORA (a PEFT method of the hfx package: install hfx, then
import hfx before loading)"``) and registers both spellings: adapters saved with the bare name (``"RELORA"``,
hfx 0.1) still load, and a process without hfx now fails with ``KeyError`` naming what to install and import.
In memory a config's ``peft_type`` stays the bare member (``HfxPeftType.RELORA``).
"""

from __future__ import annotations

import enum

#: What a saved hfx type says to a process that does not know it (the text of peft's ``KeyError``).
LOADING_HINT = "a PEFT method of the hfx package: install hfx, then import hfx before loading"


class HfxPeftType(str, enum.Enum):
    """PEFT types defined by hfx (the value is the type's name; ``saved_name`` what ``adapter_config.json`` stores)."""

    RELORA = "RELORA"
    BOTTLENECK_ADAPTER = "BOTTLENECK_ADAPTER"

    def __str__(self) -> str:  # json/str round trip gives the bare value, like peft's own PeftType
        return self.value

    @property
    def saved_name(self) -> SavedPeftType:
        return SavedPeftType(self)


class SavedPeftType(str):
    """The spelling of an hfx type in ``adapter_config.json``: ``"<NAME> (<LOADING_HINT>)"``.

    It compares and hashes as that string (what peft looks up when loading); ``value`` is the type's name, as on
    peft's enum members, so code that lists methods by ``key.value`` sees each hfx method once.
    """

    value: str

    def __new__(cls, peft_type: HfxPeftType) -> SavedPeftType:
        saved = super().__new__(cls, f"{peft_type.value} ({LOADING_HINT})")
        saved.value = peft_type.value
        return saved


class HfxPeftConfigMixin:
    """For hfx's PEFT configs: ``to_dict`` (what ``save_pretrained`` writes) spells ``peft_type`` as its
    :class:`SavedPeftType`."""

    def to_dict(self) -> dict:
        values = super().to_dict()
        values["peft_type"] = str(HfxPeftType(self.peft_type).saved_name)  # a plain str for json
        return values


def register_peft_method(peft_type: HfxPeftType, config_cls: type, model_cls: type, prefix: str) -> None:
    """Make ``peft_type`` known to peft (config, tuner and parameter prefix), under its name and under its saved
    spelling. Idempotent.

    Raises:
        ValueError: the type is already registered to different classes (two packages claiming one name).
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    tables = ((PEFT_TYPE_TO_CONFIG_MAPPING, config_cls), (PEFT_TYPE_TO_TUNER_MAPPING, model_cls),
              (PEFT_TYPE_TO_PREFIX_MAPPING, prefix))
    keys = (peft_type, peft_type.saved_name)
    for table, value in tables:  # check every table before writing any
        for key in keys:
            existing = table.get(key)
            if existing is not None and existing != value:
                raise ValueError(f"PEFT type {str(key)!r} is already registered to {existing!r}, not {value!r}")
    for table, value in tables:
        for key in keys:
            table[key] = value
