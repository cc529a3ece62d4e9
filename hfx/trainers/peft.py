"""Parameter-efficient fine-tuning in engine recipes: a ``peft:`` section wraps one of the task's models.

A recipe names the method and any field of its peft config::

    peft: {method: lora, r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}
    peft: {method: prompt_tuning, num_virtual_tokens: 8}
    peft: {method: relora, r: 16, relora_steps: 500, restart_warmup_steps: 50, prune_method: magnitude}

``method`` is any peft type by its lower-case name (``lora``, ``prefix_tuning``, ``prompt_tuning``, ``ia3``,
``loha``, ...) or one hfx registers (``relora``, ``bottleneck_adapter``); ``model`` picks which of the task's
models is wrapped (default: the only one); ``save_base`` (default true) writes the untouched base model, as
the task saves it, to ``<output_dir>/base`` and ``final/base`` (a model built from config exists nowhere
else). Every other key is a field of the method's config class, checked before anything is built.
``task_type`` defaults from the task's ``peft_task_type`` (``causal-lm`` -> ``CAUSAL_LM``, what prefix and
prompt tuning need to ``generate``).

The engine calls :func:`apply_peft` right after ``task.build_models()`` (so optimizers see only the trainable
parameters) and, when peft is on, :meth:`PeftRun.save` instead of the task's ``save`` for ``final/``: ``final/``
holds the adapter (``PeftModel.save_pretrained``) and ``final/base`` the base artifact. Methods that need more
of the engine than wrapping (ReLoRA's restarts and schedule) have a module in
:mod:`hfx.trainers.integrations`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hfx.trainers.errors import ConfigError

logger = logging.getLogger(__name__)

#: Keys of the ``peft:`` section that are hfx's, not the peft config's.
ENGINE_KEYS = ("method", "model", "save_base")


def peft_methods() -> dict[str, type]:
    """Lower-case method name -> peft config class, for every type peft and hfx register."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import hfx.peft  # noqa: F401  (registers ReLoRA and bottleneck adapters)

    return {str(getattr(key, "value", key)).lower(): cls for key, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def method_name(section: dict[str, Any]) -> str:
    return str(section.get("method", "")).lower()


def build_peft_config(section: dict[str, Any], task_type: str | None = None):
    """The peft config a recipe's ``peft:`` section describes (``ENGINE_KEYS`` left out); ``task_type`` is the
    default of the config's ``task_type`` field.

    Raises:
        ConfigError: no or an unknown ``method``, a field the method's config lacks (naming the closest
            one), or values the config class rejects.
    """
    from hfx.trainers.config import _suggest

    methods = peft_methods()
    method = section.get("method")
    if not isinstance(method, str):
        raise ConfigError(f"peft.method must name a PEFT method (one of {', '.join(sorted(methods))}), got {method!r}")
    if method.lower() not in methods:
        raise ConfigError(f"unknown peft.method {method!r}{_suggest(method.lower(), methods, '', 'PEFT methods')}")
    config_cls = methods[method.lower()]
    valid = [f.name for f in dataclasses.fields(config_cls) if f.init and f.name != "peft_type"]
    fields = {k: v for k, v in section.items() if k not in ENGINE_KEYS}
    for key in fields:
        if key not in valid:
            raise ConfigError(f"unknown config key {'peft.' + key!r} for method {method!r}"
                              f"{_suggest(key, valid + list(ENGINE_KEYS), 'peft.')}")
    if "task_type" in valid and task_type is not None:
        fields.setdefault("task_type", task_type)
    try:
        return config_cls(**fields)
    except (TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"peft ({method}): {first}") from None


def validate_peft(config, task_type: str | None = None):
    """Config checks of the ``peft:`` section that every method shares; returns the peft config (None
    without a ``peft:`` section). Method-specific checks are their integration's."""
    if config.peft is None:
        return None
    peft_config = build_peft_config(config.peft, task_type)
    if not isinstance(config.peft.get("save_base", True), bool):
        raise ConfigError(f"config key 'peft.save_base' must be true or false, got {config.peft['save_base']!r}")
    if not isinstance(config.peft.get("model", ""), str):
        raise ConfigError(f"config key 'peft.model' must name one of the task's models, got {config.peft['model']!r}")
    return peft_config


#: Writes the task's artifact of some of its models into a folder: ``save_artifact(models, folder)``.
SaveArtifact = Callable[[dict[str, torch.nn.Module], Path], None]


@dataclasses.dataclass
class PeftRun:
    """The peft side of one run: which model is wrapped, its config, where its base artifact is, how it saves."""

    model_name: str
    config: Any
    save_base: bool
    save_artifact: SaveArtifact
    base_dir: Path | None = None

    @property
    def method(self) -> str:
        return str(getattr(self.config.peft_type, "value", self.config.peft_type)).lower()

    def write_base(self, model: torch.nn.Module, folder: Path) -> None:
        """The task's artifact of ``model`` (a plain, unwrapped model) in ``folder``, written atomically."""
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.save_artifact({self.model_name: model}, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

    def save(self, models: dict[str, torch.nn.Module], state_dicts: dict[str, dict], output_dir: Path) -> None:
        """``final/``: the adapter of the wrapped model (``adapter_config.json``, ``adapter_model.safetensors``)
        plus ``base/`` (the task's artifact of the base, when ``save_base``). Main process only."""
        peft_model = models[self.model_name]
        if self.base_dir is not None:
            # Record where the base will be (``output_dir`` is ``final.tmp``, renamed to ``final`` once complete), so
            # peft's AutoPeftModel* classes and the model card find it; a moved folder needs its base path again.
            final = output_dir.with_name(output_dir.name.removesuffix(".tmp"))
            for config in peft_model.peft_config.values():
                config.base_model_name_or_path = str((final / "base").resolve())
        # With the base saved beside it, the adapter needs no copy of resized embeddings (peft's "auto" check
        # would also look for the base config before final/base exists).
        extra = {"save_embedding_layers": False} if self.base_dir is not None else {}
        peft_model.save_pretrained(output_dir, state_dict=state_dicts[self.model_name], **extra)
        if self.base_dir is not None:
            shutil.copytree(self.base_dir, output_dir / "base")

    def card_facts(self, facts: dict[str, Any]) -> dict[str, Any]:
        """The task's card facts, with the summary of an adapter."""
        summary = facts.get("summary", "")
        return {**facts, "summary": f"A `{self.method}` adapter (peft) of this base model. {summary}".strip()}


def apply_peft(config, models: dict[str, torch.nn.Module], accelerator, output_dir: Path,
               save_artifact: SaveArtifact, task_type: str | None = None) -> PeftRun | None:
    """Wrap the model the ``peft:`` section names with ``get_peft_model``, in ``models`` (in place), after
    writing the untouched base with ``save_artifact`` to ``<output_dir>/base`` when ``save_base``.
    Returns None when the recipe has no ``peft:`` section."""
    from peft import get_peft_model

    if config.peft is None:
        return None
    name = config.peft.get("model")
    if name is None:
        if len(models) != 1:
            raise ConfigError(f"peft.model must name the model to wrap (task {config.task!r} builds {', '.join(models)})")
        name = next(iter(models))
    if name not in models:
        raise ConfigError(f"peft.model {name!r} is not a model of task {config.task!r} (it builds {', '.join(models)})")
    run = PeftRun(name, build_peft_config(config.peft, task_type), save_base=config.peft.get("save_base", True),
                  save_artifact=save_artifact)
    if run.save_base:
        run.base_dir = Path(output_dir) / "base"
        # Written in every run (a resumed run builds the same seeded base; a new one may have changed it).
        if accelerator.is_main_process:
            run.write_base(models[name], run.base_dir)
        accelerator.wait_for_everyone()
    try:
        models[name] = get_peft_model(models[name], run.config)
    except (TypeError, ValueError) as err:  # peft's messages span lines (they print whole modules)
        raise ConfigError(f"peft ({run.method}) cannot wrap model {name!r}: {' '.join(str(err).split())[:400]}") from None
    return run


def log_trainable(run: PeftRun, model: torch.nn.Module) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("peft %s on model %r: %d of %d parameters trainable (%.2f%%)", run.method, run.model_name, trainable,
                total, 100 * trainable / max(total, 1))
