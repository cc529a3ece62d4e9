"""Learning-rate schedules: transformers' ``get_scheduler`` for every ``SchedulerType``, and a registry for the
schedules transformers does not have (ReLoRA's jagged cosine registers itself from
:mod:`hfx.trainers.integrations.relora`).

``scheduler.name`` with ``scheduler.warmup_steps`` gives exactly the curve ``TrainingArguments(lr_scheduler_type=
name, warmup_steps=...)`` gives. hfx adds two things: ``min_lr_ratio`` (``cosine`` with a floor above 0 is
transformers' ``cosine_with_min_lr``; ``reduce_lr_on_plateau`` gets it as its ``min_lr``), and refusals where
transformers would silently ignore a setting (``constant`` with warm-up steps, a floor on a schedule that
has none).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hfx.trainers.errors import ConfigError

#: A registered factory is called as ``factory(optimizer, config, total_steps)`` (``config`` the whole
#: :class:`~hfx.trainers.config.TrainConfig`) and returns an ``LRScheduler`` the engine steps once per
#: optimizer step.
ScheduleFactory = Callable[..., "torch.optim.lr_scheduler.LRScheduler"]
SCHEDULES: dict[str, ScheduleFactory] = {}

#: transformers' schedules that take a floor, and the keyword it goes to.
_FLOOR_KEYWORD = {"cosine_with_min_lr": "min_lr_rate", "cosine_warmup_with_min_lr": "min_lr_rate"}


def register_schedule(name: str, factory: ScheduleFactory | None = None):
    """Register a schedule factory under ``name`` (usable as ``scheduler.name`` in a recipe). Works as a
    call, ``register_schedule("jagged-cosine", make_jagged)``, or as a decorator. Re-registering the same
    factory is a no-op; a different factory under a taken name, or a transformers name, is a ValueError."""

    def add(fn: ScheduleFactory) -> ScheduleFactory:
        if name in transformers_schedules():
            raise ValueError(f"schedule {name!r} is a transformers SchedulerType; pick another name")
        if SCHEDULES.get(name, fn) is not fn:
            raise ValueError(f"schedule {name!r} is already registered to {SCHEDULES[name]!r}")
        SCHEDULES[name] = fn
        return fn

    return add(factory) if factory is not None else add


def transformers_schedules() -> list[str]:
    from transformers.trainer_utils import SchedulerType

    return [member.value for member in SchedulerType]


def schedule_names() -> list[str]:
    """Every name ``scheduler.name`` accepts."""
    return [*transformers_schedules(), *SCHEDULES]


def is_plateau(name: str) -> bool:
    """Whether the schedule moves at evaluations (on ``eval.metric``) instead of at every step."""
    return name == "reduce_lr_on_plateau"


def validate_schedule(config) -> None:
    """The checks of the ``scheduler`` section that need the registry (called by the recipe loader)."""
    cfg = config.scheduler
    names = schedule_names()
    if cfg.name not in names:
        from hfx.trainers.config import _suggest

        raise ConfigError(f"unknown scheduler.name {cfg.name!r}{_suggest(cfg.name, names, '', 'schedules')}")
    if cfg.name in SCHEDULES:
        return  # a registered schedule checks its own settings
    if cfg.name == "constant" and cfg.warmup_steps:
        raise ConfigError(f"scheduler.name 'constant' has no warm-up (scheduler.warmup_steps={cfg.warmup_steps}); "
                          "use 'constant_with_warmup'")
    if cfg.min_lr_ratio and cfg.name not in (*_FLOOR_KEYWORD, "cosine", "reduce_lr_on_plateau"):
        raise ConfigError(f"scheduler.min_lr_ratio={cfg.min_lr_ratio} has no effect on {cfg.name!r} (it decays to 0); "
                          "use 'cosine' or 'cosine_with_min_lr' for a floor")
    if cfg.name in _FLOOR_KEYWORD and not cfg.min_lr_ratio and "min_lr" not in cfg.options:
        raise ConfigError(f"scheduler.name {cfg.name!r} needs scheduler.min_lr_ratio > 0 (its floor)")
    if is_plateau(cfg.name):
        if cfg.warmup_steps:
            raise ConfigError("scheduler 'reduce_lr_on_plateau' takes no warmup_steps (it changes the lr only at evaluations)")
        if config.eval.metric is None:
            raise ConfigError("scheduler 'reduce_lr_on_plateau' needs eval.metric (the metric it watches)")


def build_schedule(config, optimizer: torch.optim.Optimizer, total_steps: int):
    """The learning-rate scheduler of ``config.scheduler`` for ``optimizer`` (a torch optimizer) over
    ``total_steps`` optimizer steps.

    Raises:
        ConfigError: options the schedule does not take (the message names them).
    """
    from transformers import get_scheduler

    cfg = config.scheduler
    if cfg.name in SCHEDULES:
        return SCHEDULES[cfg.name](optimizer, config, total_steps)
    name, options = cfg.name, dict(cfg.options)
    if name == "cosine" and cfg.min_lr_ratio:
        name = "cosine_with_min_lr"
    if name in _FLOOR_KEYWORD and "min_lr" not in options:
        options.setdefault(_FLOOR_KEYWORD[name], cfg.min_lr_ratio)
    if is_plateau(name):
        options.setdefault("mode", config.eval.mode)
        if cfg.min_lr_ratio:
            options.setdefault("min_lr", [group["lr"] * cfg.min_lr_ratio for group in optimizer.param_groups])
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps,
                             scheduler_specific_kwargs=options)
    except TypeError as err:
        raise ConfigError(f"scheduler {cfg.name!r}: {err} (check scheduler.options)") from None
