"""The one place where hfx plugs its classes into transformers, peft and diffusers.

Each later capability adds one line to the tables below; :func:`register_all` (run by ``import hfx``)
imports the modules and registers their classes. Registration is idempotent: importing twice or calling
``register_all()`` again changes nothing.
"""

from __future__ import annotations

import importlib
import sys

# (config class path, {Auto class name: model class path}).
AUTO_MODELS: list[tuple[str, dict[str, str]]] = [
    ("hfx.models.vae.configuration_vae:HfxVAEConfig", {"AutoModel": "hfx.models.vae.modeling_vae:HfxVAEModel"}),
    ("hfx.models.lm.configuration_lm:HfxLMConfig", {"AutoModel": "hfx.models.lm.modeling_lm:HfxLMModel",
                                                    "AutoModelForCausalLM": "hfx.models.lm.modeling_lm:HfxLMForCausalLM"}),
]

# (pipeline class path, [paths of the hfx component classes its model_index.json may name]). diffusers finds a
# saved pipeline's class by its `_class_name` on the `diffusers` module, and accepts a Hub repo's component only
# from a library it knows (its LOADABLE_CLASSES table): both are registered here, so that after `import hfx`,
# `DiffusionPipeline.from_pretrained(folder or repo id)` returns the hfx class.
PIPELINES: list[tuple[str, list[str]]] = [
    ("hfx.pipelines.pipeline_class_conditional:ClassConditionalPipeline",
     ["hfx.models.noisy_classifier.modeling_noisy_classifier:NoisyClassifier"]),
    ("hfx.pipelines.pipeline_latent_diffusion:LatentDiffusionPipeline",
     ["hfx.models.noisy_classifier.modeling_noisy_classifier:NoisyClassifier", "hfx.models.vae.modeling_vae:HfxVAEModel"]),
    ("hfx.pipelines.pipeline_gan:GANPipeline", ["hfx.models.gan.modeling_gan:DCGANGenerator",
     "hfx.models.gan.stylegan_gan:StyleGANGenerator", "hfx.models.gan.modeling_gan:DCGANDiscriminator"]),
    ("hfx.pipelines.pipeline_text_to_image:TextToImagePipeline", ["hfx.models.vae.modeling_vae:HfxVAEModel"]),
    ("hfx.pipelines.pipeline_cyclegan:CycleGANPipeline", ["hfx.models.gan.cyclegan_gan:CycleGANGenerator",
     "hfx.models.gan.cyclegan_gan:PatchGANDiscriminator"]),
]

# (model type, the model type whose peft default target modules it shares: it names its modules the same way).
PEFT_DEFAULTS_LIKE: list[tuple[str, str]] = [("hfx_lm", "llama")]

# Modules whose import registers something with a library that offers no registration API of its own
# (peft's method tables) or that must sit in sys.modules before diffusers can load a component or a
# pipeline saved by hfx (diffusers looks components up in sys.modules and never imports them).
MODULES_TO_IMPORT: list[str] = ["hfx.peft", "hfx.pipelines"]

# Callbacks every training run gets unless its caller passes one of the same class. The model card is the
# Hub layer's (``hfx.hub`` renders every card), and the engine sits below it and may not import it: the
# engine finds the card writer here, by name, instead.
DEFAULT_TRAIN_CALLBACKS: list[str] = ["hfx.hub.callback:HubCallback"]


#: Every class registered through this module, by name (what :func:`find_class` looks up first).
REGISTERED_CLASSES: dict[str, type] = {}


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
        REGISTERED_CLASSES[model_class.__name__] = model_class


def register_pipeline(pipeline_class: type, component_classes: list[type]) -> None:
    """Make ``DiffusionPipeline.from_pretrained`` load ``pipeline_class`` and its hfx components. Idempotent.

    - The class becomes an attribute of the ``diffusers`` module, where diffusers looks up the
      ``_class_name`` of ``model_index.json`` (``pipeline_loading_utils._get_pipeline_class``), so a local
      folder loads as this class.
    - Each component's module is entered in diffusers' ``LOADABLE_CLASSES`` with the diffusers or transformers
      base class it derives from. diffusers' Hub downloader accepts a component only when its library is in that
      table (or ships as ``{component}/{module}.py`` in the repo, which is remote code); loading then takes the
      module from ``sys.modules`` and finds the base class on it by name, as it does for any third-party component.

    Raises:
        ValueError: ``diffusers`` already has a different object of that name (hfx never shadows a diffusers
            class), a component derives from no base class diffusers can load, or its module lacks that base
            class's name (the loader looks it up there: the module must import it).
    """
    import diffusers
    from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES

    name = pipeline_class.__name__
    existing = getattr(diffusers, name, None)
    # The same class may come back from a re-imported module: only a class defined elsewhere is a clash.
    where = (getattr(existing, "__module__", None), getattr(existing, "__qualname__", None))
    if existing is not None and where != (pipeline_class.__module__, pipeline_class.__qualname__):
        raise ValueError(f"diffusers already has {name} ({getattr(existing, '__module__', type(existing).__name__)}); "
                         f"cannot register {pipeline_class.__module__}.{name} under that name")
    setattr(diffusers, name, pipeline_class)
    REGISTERED_CLASSES[name] = pipeline_class
    for component in component_classes:
        REGISTERED_CLASSES[component.__name__] = component
        library, base = next(((library, base) for library in ("diffusers", "transformers") for base in LOADABLE_CLASSES[library]
                              if issubclass(component, getattr(importlib.import_module(library), base, ()))), (None, None))
        if base is None:
            raise ValueError(f"{component.__module__}.{component.__name__} derives from none of the diffusers or "
                             "transformers classes diffusers can save and load (ModelMixin, PreTrainedModel, ...)")
        if getattr(sys.modules[component.__module__], base, None) is None:
            raise ValueError(f"{component.__module__} must import {base}: diffusers finds a component's base class "
                             "by name on the component's module")
        LOADABLE_CLASSES.setdefault(component.__module__, {})[base] = list(LOADABLE_CLASSES[library][base])


def find_class(name: str) -> type | None:
    """The class an artifact names (``architectures[0]`` or ``_class_name``): a model, pipeline or component
    registered through this module, else diffusers' or transformers' class of that name, else None."""
    if name in REGISTERED_CLASSES:
        return REGISTERED_CLASSES[name]
    for library in ("diffusers", "transformers"):
        found = getattr(importlib.import_module(library), name, None)
        if isinstance(found, type):
            return found
    return None


def register_all() -> None:
    """Import and register everything listed in this module's tables."""
    for module in MODULES_TO_IMPORT:
        importlib.import_module(module)
    for config_path, models in AUTO_MODELS:
        register_auto_model(_resolve(config_path), {auto: _resolve(path) for auto, path in models.items()})
    for pipeline_path, component_paths in PIPELINES:
        register_pipeline(_resolve(pipeline_path), [_resolve(path) for path in component_paths])
    from hfx.peft._defaults import share_peft_defaults

    for model_type, like in PEFT_DEFAULTS_LIKE:
        share_peft_defaults(model_type, like)
