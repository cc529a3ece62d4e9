"""ReLoRA's jagged cosine learning-rate schedule, as a pure function of the step and as a ``LambdaLR``.

Linear warm-up over ``warmup_steps``, then one cosine envelope from 1 down to ``min_lr_ratio`` at
``num_training_steps``. At every restart the multiplier drops to 0 and ramps linearly, over
``restart_warmup_steps``, to the envelope's value at the end of the ramp (the formula of the reference
code, github.com/Guitaricet/relora). Example: 20,000 steps, warm-up 500, restart every 5,000, restart warm-up
100 -> step 5,000: 0.0, 5,050: 0.441, 5,100: 0.882, 19,999: 0.1.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from hfx.peft._validation import check_int, check_real


def is_restart_step(step: int, *, relora_steps: int, first_restart_offset: int = 0) -> bool:
    """Whether a ReLoRA restart follows ``step`` completed optimizer steps.

    Restarts come every ``relora_steps`` steps counted from ``first_restart_offset`` (the end of a full-rank
    warm start, 0 without one): at ``offset + k * relora_steps``, ``k >= 1``.

    Raises:
        TypeError, ValueError: a ``step`` or ``first_restart_offset`` that is not an integer >= 0, or a
            ``relora_steps`` that is not an integer >= 1.
    """
    check_int("step", step, minimum=0)
    check_int("relora_steps", relora_steps, minimum=1)
    check_int("first_restart_offset", first_restart_offset, minimum=0)
    since = step - first_restart_offset
    return since > 0 and since % relora_steps == 0


def check_schedule(
    *,
    num_training_steps: int,
    warmup_steps: int,
    relora_steps: int,
    restart_warmup_steps: int,
    min_lr_ratio: float,
    first_restart_offset: int,
) -> None:
    """Raise ``TypeError`` / ``ValueError`` (naming the argument and what is allowed) unless the arguments
    describe a jagged cosine schedule: integer step counts (``num_training_steps``, ``relora_steps`` >= 1; the
    others >= 0; ``restart_warmup_steps < relora_steps``) and ``min_lr_ratio`` in [0, 1]."""
    check_int("num_training_steps", num_training_steps, minimum=1)
    check_int("relora_steps", relora_steps, minimum=1)
    check_int("warmup_steps", warmup_steps, minimum=0)
    check_int("first_restart_offset", first_restart_offset, minimum=0)
    check_int("restart_warmup_steps", restart_warmup_steps, minimum=0)
    if restart_warmup_steps >= relora_steps:
        raise ValueError(f"restart_warmup_steps ({restart_warmup_steps}) must be >= 0 and < relora_steps ({relora_steps})")
    check_real("min_lr_ratio", min_lr_ratio, low=0.0, high=1.0)


def _cosine_envelope(step: int, num_training_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    progress = (step - warmup_steps) / max(1, num_training_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def jagged_cosine_multiplier(
    step: int,
    *,
    num_training_steps: int,
    warmup_steps: int,
    relora_steps: int,
    restart_warmup_steps: int,
    min_lr_ratio: float = 0.1,
    first_restart_offset: int = 0,
) -> float:
    """The LR multiplier (of the peak LR) for the optimizer step taken after ``step`` completed steps.

    It is 0 right after each restart (``step`` a restart step, see :func:`is_restart_step`), so merge and
    optimizer-state pruning happen where the LR is 0.

    Raises:
        TypeError, ValueError: see :func:`check_schedule`; a ``step`` that is not an integer >= 0.
    """
    check_int("step", step, minimum=0)
    check_schedule(num_training_steps=num_training_steps, warmup_steps=warmup_steps, relora_steps=relora_steps,
                   restart_warmup_steps=restart_warmup_steps, min_lr_ratio=min_lr_ratio,
                   first_restart_offset=first_restart_offset)
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    since = step - first_restart_offset
    # Ramps follow every restart, and also the switch from full-rank to ReLoRA when there is a warm start.
    after_a_restart = since >= relora_steps or (first_restart_offset > 0 and since >= 0)
    into_cycle = since % relora_steps
    if after_a_restart and into_cycle < restart_warmup_steps:
        ramp_end = step - into_cycle + restart_warmup_steps
        envelope = _cosine_envelope(ramp_end, num_training_steps, warmup_steps, min_lr_ratio)
        return into_cycle / max(1, restart_warmup_steps) * envelope
    return _cosine_envelope(step, num_training_steps, warmup_steps, min_lr_ratio)


class JaggedCosineMultiplier:
    """A picklable callable form of :func:`jagged_cosine_multiplier` (``LambdaLR`` saves its attributes in
    ``state_dict``, so a resumed scheduler gets back the same schedule)."""

    def __init__(self, **kwargs):
        check_schedule(**kwargs)  # at construction, not at the first step the scheduler takes
        self.__dict__.update(kwargs)

    def __call__(self, step: int) -> float:
        return jagged_cosine_multiplier(step, **self.__dict__)


def get_jagged_cosine_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    num_training_steps: int,
    relora_steps: int,
    restart_warmup_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    first_restart_offset: int = 0,
    last_epoch: int = -1,
) -> LambdaLR:
    """A ``LambdaLR`` following the jagged cosine schedule (same arguments as :func:`jagged_cosine_multiplier`).

    Raises:
        TypeError, ValueError: see :func:`check_schedule`; a ``last_epoch`` that is not an integer >= -1.
    """
    check_int("last_epoch", last_epoch, minimum=-1)
    multiplier = JaggedCosineMultiplier(
        num_training_steps=num_training_steps,
        warmup_steps=warmup_steps,
        relora_steps=relora_steps,
        restart_warmup_steps=restart_warmup_steps,
        min_lr_ratio=min_lr_ratio,
        first_restart_offset=first_restart_offset,
    )
    return LambdaLR(optimizer, multiplier, last_epoch=last_epoch)


def relora_multiplier(config, *, num_training_steps: int) -> JaggedCosineMultiplier:
    """The jagged cosine multiplier a :class:`ReLoraConfig` describes over ``num_training_steps`` (restarts
    after its full-rank warm start): the one place the ReLoRA fields become a schedule, for the engine and for
    :class:`hfx.peft.ReLoraCallback` alike.

    Raises:
        TypeError: ``config`` is not a ``ReLoraConfig``; see also :func:`check_schedule`.
    """
    from hfx.peft.relora.config import ReLoraConfig

    if not isinstance(config, ReLoraConfig):
        raise TypeError(f"config must be a ReLoraConfig, got {type(config).__name__}")
    return JaggedCosineMultiplier(num_training_steps=num_training_steps, warmup_steps=config.warmup_steps,
                                  relora_steps=config.relora_steps, restart_warmup_steps=config.restart_warmup_steps,
                                  min_lr_ratio=config.min_lr_ratio, first_restart_offset=config.full_rank_warmup_steps)


def get_relora_schedule(optimizer: torch.optim.Optimizer, *, num_training_steps: int, config,
                        last_epoch: int = -1) -> LambdaLR:
    """A ``LambdaLR`` following :func:`relora_multiplier` of ``config``.

    Raises:
        TypeError: ``config`` is not a ``ReLoraConfig``; see also :func:`check_schedule`.
    """
    check_int("last_epoch", last_epoch, minimum=-1)
    return LambdaLR(optimizer, relora_multiplier(config, num_training_steps=num_training_steps), last_epoch=last_epoch)


__all__ = [
    "JaggedCosineMultiplier",
    "check_schedule",
    "get_jagged_cosine_schedule",
    "get_relora_schedule",
    "is_restart_step",
    "relora_multiplier",
    "jagged_cosine_multiplier",
]
