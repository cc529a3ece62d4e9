"""Load a recipe and check all of it before anything is built: :func:`load_config`.

The file (a YAML path or a shipped recipe name) and its ``key.sub=value`` overrides become a
:class:`~hfx.trainers.config.TrainConfig` (:mod:`~hfx.trainers.config` checks each key, type and range);
then the checks that need the registries: the task and its options, the scheduler, the callbacks, peft
and its method's integration, freeze schedules, and the output folder (a run there already, files hfx did
not write). Every failure is one :class:`~hfx.trainers.errors.ConfigError` line naming the key or path.
Nothing here changes the config it checks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from hfx.trainers.callbacks import validate_callbacks
from hfx.trainers.checkpoint import check_output_dir, previous_run_files, resolve_checkpoint
from hfx.trainers.config import OptimizerConfig, TrainConfig, _suggest, apply_overrides, from_dict
from hfx.trainers.errors import ConfigError
from hfx.trainers.freeze import validate_freeze
from hfx.trainers.integrations import PEFT_INTEGRATIONS
from hfx.trainers.peft import method_name, validate_peft
from hfx.trainers.schedules import validate_schedule
from hfx.trainers.tasks import get_task


def read_recipe(source: str | Path) -> tuple[dict[str, Any], str]:
    """The mapping of a recipe file (a path or a shipped recipe name) and where it was found.

    Raises:
        FileNotFoundError: no such file and no shipped recipe of that name.
        ConfigError: a file that is not UTF-8 YAML holding a mapping.
    """
    from hfx.resources import training_config

    path = training_config(str(source))
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text) or {}
    except IsADirectoryError:
        raise ConfigError(f"recipe {str(path)!r} is a folder; give a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {str(path)!r} is not a text (UTF-8 YAML) file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {str(path)!r} must hold a mapping of config keys, got {type(raw).__name__}")
    return raw, str(path)


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """Read a recipe (a YAML path, a shipped recipe name such as ``"classify-digits"``, or a mapping),
    apply ``overrides`` and validate all of it, the task's own options included.

    Returns:
        A :class:`TrainConfig` whose ``task_options`` is an instance of the task's ``Options`` dataclass.

    Raises:
        ConfigError: unknown key (with the closest valid key), wrong type, value out of range, unknown task,
            missing dataset, an output folder that cannot hold the run.
        FileNotFoundError: ``source`` names no file and no shipped recipe.
    """
    recipe = None
    if isinstance(source, dict):
        raw = source
    else:
        raw, recipe = read_recipe(source)
    raw = apply_overrides(raw, overrides or [])
    if raw.get("recipe") is None:
        raw["recipe"] = recipe
    config = from_dict(TrainConfig, raw)
    task_cls = get_task(config.task)
    config.task_options = from_dict(task_cls.Options, raw.get("task_options"), "task_options.")
    validate(config, task_cls)
    return config


def validate(config: TrainConfig, task_cls: type) -> None:
    """Checks across fields and against the registries, done before anything is built."""
    t = config.train
    if config.data.dataset is None and task_cls.needs_dataset:
        raise ConfigError(f"missing required config key 'data.dataset' (task {config.task!r} trains on a dataset)")
    dataset = config.data.dataset
    if dataset is not None and dataset.startswith((".", "/", "~")) and not Path(dataset).expanduser().exists():
        raise ConfigError(f"data.dataset {dataset!r} does not exist")
    if t.max_steps is None and t.epochs is None:
        raise ConfigError("set train.max_steps or train.epochs (neither is set)")
    _validate_output_dir(config)
    peft_config = validate_peft(config, task_cls.peft_task_type)
    if peft_config is not None and method_name(config.peft) in PEFT_INTEGRATIONS:
        PEFT_INTEGRATIONS[method_name(config.peft)].validate(config, peft_config)
    validate_freeze(config)
    validate_schedule(config)
    if config.eval.early_stopping_patience is not None and config.eval.metric is None:
        raise ConfigError("eval.early_stopping_patience needs eval.metric (the metric early stopping watches)")
    valid = [f.name for f in dataclasses.fields(OptimizerConfig)]
    for name, override in config.optimizers.items():
        for key in override:
            if key not in valid:
                raise ConfigError(f"unknown config key {f'optimizers.{name}.{key}'!r}{_suggest(key, valid, f'optimizers.{name}.')}")
        from hfx.trainers.config import optimizer_config

        optimizer_config(config, name)  # types and ranges of the merged section
    validate_callbacks(config.callbacks)


def _validate_output_dir(config: TrainConfig) -> None:
    check_output_dir(config.output_dir)
    if config.resume_from_checkpoint not in (None, "latest"):
        resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)  # names what is wrong with it
    elif config.resume_from_checkpoint is None and not config.overwrite_output_dir:
        previous = previous_run_files(config.output_dir)
        if previous:
            raise ConfigError(f"output_dir {config.output_dir} already holds a run ({', '.join(previous)}); set "
                              "resume_from_checkpoint=latest to continue it or overwrite_output_dir=true to start over")
