"""The one place where hfx plugs its classes into transformers, peft and diffusers.

Each later capability adds one line to the tables below; :func:`register_all` (run by ``import hfx``)
imports the modules and registers their classes. Registration is idempotent: importing twice or calling
``register_all()`` again changes nothing.
"""

from __future__ import annotations

import importlib

# (config class path, {Auto class name: model class path}).
AUTO_MODELS: list[tuple[str, dict[str, str]]] = [
    ("hfx.models.vae.configuration_vae:HfxVAEConfig", {"AutoModel": "hfx.models.vae.modeling_vae:HfxVAEModel"}),
]

# Modules whose import registers something with a library that offers no registration API of its own
# (peft's method tables) or that must sit in sys.modules before diffusers can load a component or a
# pipeline saved by hfx (diffusers looks components up in sys.modules and never imports them).
MODULES_TO_IMPORT: list[str] = ["hfx.peft", "hfx.pipelines"]

# Callbacks every training run gets unless its caller passes one of the same class. The model card is the
# Hub layer's (``hfx.hub`` renders every card), and the engine sits below it and may not import it: the
# engine finds the card writer here, by name, instead.
DEFAULT_TRAIN_CALLBACKS: list[str] = ["hfx.hub.callback:HubCallback"]


def default_train_callbacks(given: list) -> list:
    """Instances of the :data:`DEFAULT_TRAIN_CALLBACKS` that ``given`` has no instance of."""
    classes = [_resolve(path) for path in DEFAULT_TRAIN_CALLBACKS]
    return [cls() for cls in classes if not any(isinstance(callback, cls) for callback in given)]


def _resolve(dotted: str):
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def register_auto_model(config_class: type, model_classes: dict[str, type]) -> None:
    """Register ``config_class`` (by its ``model_type``) with ``AutoConfig`` and each model class with the
    named transformers Auto class (``"AutoModel"``, ``"AutoModelForCausalLM"``, ...). Idempotent.

    Raises:
        ValueError: the model type is already taken by a different config class (for example a
            transformers built-in: hfx model types start with ``hfx_``).
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config_class.model_type
    if model_type in CONFIG_MAPPING:
        existing = CONFIG_MAPPING[model_type]
        if existing is not config_class:
            raise ValueError(f"model_type {model_type!r} is already registered to {existing.__module__}.{existing.__name__}")
    else:
        transformers.AutoConfig.register(model_type, config_class)
    for auto_name, model_class in model_classes.items():
        auto_class = getattr(transformers, auto_name)
        auto_class.register(config_class, model_class, exist_ok=True)


def register_all() -> None:
    """Import and register everything listed in this module's tables."""
    for module in MODULES_TO_IMPORT:
        importlib.import_module(module)
    for config_path, models in AUTO_MODELS:
        register_auto_model(_resolve(config_path), {auto: _resolve(path) for auto, path in models.items()})
