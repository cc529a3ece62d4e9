"""Default target modules for model types that peft does not know but that name their modules like one it
does (``hfx_lm`` uses Llama's names: ``q_proj``, ``v_proj``, ``down_proj``, ...).

peft picks a method's default ``target_modules`` by ``config.model_type`` from one dict per method in
``peft.utils.constants`` (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, ``..._IA3_...``, ...); each
tuner class holds a reference to its dict, so an entry added to it is what ``get_peft_model`` sees. hfx's own
bottleneck adapter keeps its defaults in the same form.
"""

from __future__ import annotations


def share_peft_defaults(model_type: str, like: str) -> list[str]:
    """Give ``model_type`` the default target modules that ``like`` has, in every peft method's table (and
    the bottleneck adapter's); returns the tables' names. Idempotent; an existing entry is left alone."""
    import peft.utils.constants as constants

    from hfx.peft.bottleneck.model import DEFAULT_TARGET_MODULES

    tables = {name: getattr(constants, name) for name in dir(constants)
              if name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(getattr(constants, name), dict)}
    tables["hfx bottleneck adapter"] = DEFAULT_TARGET_MODULES
    shared = []
    for name, table in tables.items():
        if like in table:
            table.setdefault(model_type, table[like])
            shared.append(name)
    if not shared:
        raise ValueError(f"peft has no default target modules for {like!r} to share with {model_type!r}")
    return shared
