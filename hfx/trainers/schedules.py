"""Learning-rate schedules by name, and the registry other packages add to (ReLoRA's jagged cosine).

A schedule factory is called as ``factory(optimizer, total_steps=..., warmup_steps=..., min_lr_ratio=...,
**options)`` and returns a ``torch.optim.lr_scheduler.LRScheduler`` that the engine steps once per
optimizer step, or a ``ReduceLROnPlateau`` that the engine steps once per evaluation with ``eval.metric``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

ScheduleFactory = Callable[..., "LRScheduler | ReduceLROnPlateau"]
SCHEDULES: dict[str, ScheduleFactory] = {}


def register_schedule(name: str, factory: ScheduleFactory | None = None):
    """Register a schedule factory under ``name`` (usable as ``scheduler.name`` in a recipe). Works as a
    call, ``register_schedule("jagged-cosine", make_jagged)``, or as a decorator. Re-registering the same
    factory is a no-op; a different factory under a taken name is a ValueError."""

    def add(fn: ScheduleFactory) -> ScheduleFactory:
        if SCHEDULES.get(name, fn) is not fn:
            raise ValueError(f"schedule {name!r} is already registered to {SCHEDULES[name]!r}")
        SCHEDULES[name] = fn
        return fn

    return add(factory) if factory is not None else add


def warmup_multiplier(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup_steps at step 0 to 1 at ``warmup_steps`` (never exactly 0, so the
    first step moves the weights, as in transformers' schedules)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def decay_multiplier(kind: str, progress: float, min_lr_ratio: float) -> float:
    """``linear`` or ``cosine`` decay from 1 at progress 0 to ``min_lr_ratio`` at progress 1."""
    progress = min(max(progress, 0.0), 1.0)
    shape = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


class WarmupDecay:
    """The multiplier of ``constant`` / ``linear`` / ``cosine``: warm-up, then decay over the remaining
    steps. A plain object (not a closure) so LambdaLR's state_dict records it."""

    def __init__(self, kind: str, total_steps: int, warmup_steps: int, min_lr_ratio: float):
        self.kind, self.total_steps, self.warmup_steps, self.min_lr_ratio = kind, total_steps, warmup_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return warmup_multiplier(step, self.warmup_steps)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return decay_multiplier(self.kind, progress, self.min_lr_ratio)


def _warmup_decay(kind: str) -> ScheduleFactory:
    def factory(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                min_lr_ratio: float = 0.0) -> LambdaLR:
        return LambdaLR(optimizer, WarmupDecay(kind, total_steps, warmup_steps, min_lr_ratio))

    factory.__name__ = f"{kind}_schedule"
    return factory


def plateau_schedule(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                     min_lr_ratio: float = 0.0, mode: str = "min", factor: float = 0.1, patience: int = 2,
                     threshold: float = 1e-4) -> ReduceLROnPlateau:
    """ReduceLROnPlateau on the evaluation metric; ``min_lr_ratio`` sets its floor. ``mode`` is filled in
    from ``eval.mode`` by the engine. Warm-up does not apply (the schedule moves only at evaluations)."""
    if warmup_steps:
        raise ValueError("scheduler 'plateau' takes no warmup_steps (it changes the lr only at evaluations)")
    min_lrs = [group["lr"] * min_lr_ratio for group in optimizer.param_groups]
    return ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold,
                             min_lr=min_lrs)


for _kind in ("constant", "linear", "cosine"):
    register_schedule(_kind, _warmup_decay(_kind))
register_schedule("plateau", plateau_schedule)
