"""What tasks and callbacks see of a run: a small state object and a control object, never the engine.

As in transformers' ``trainer_callback.py`` (``TrainerState`` and ``TrainerControl``): the engine owns the
loop and hands these two plain objects to every hook. :class:`RunState` carries the counters (the part a
checkpoint restores), the prepared run's parts a hook may need (the accelerator, the unwrapped models and
the torch optimizers), and :meth:`RunState.log` for records. :class:`TrainerControl` is how a callback asks
the engine to evaluate, save or stop after the current step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The fields of :class:`RunState` that every checkpoint saves and a resume restores.
COUNTERS = ("global_step", "epoch", "batches_in_epoch", "samples_seen", "skipped_steps", "best_metric",
            "evals_without_improvement", "train_seconds")


@dataclass
class RunState:
    """The run as a task or callback sees it.

    Counters (restored by a resume): ``global_step`` (optimizer steps completed; inside ``Task.loss`` it is
    the 0-based index of the step being computed), ``epoch``, ``batches_in_epoch`` (micro-batches of this
    epoch already consumed), ``samples_seen`` (over all processes), ``skipped_steps`` (non-finite losses
    skipped), ``best_metric`` / ``evals_without_improvement`` (early stopping), ``train_seconds``.

    Set by the engine once the run is prepared: ``max_steps``, ``output_dir``, ``config`` (the validated
    :class:`~hfx.trainers.config.TrainConfig`; read it, do not change it), ``accelerator``, ``models``
    (name -> the model without DDP/FSDP wrappers), ``optimizers`` (name -> the torch optimizer; change its
    state in place), ``phase`` (the optimizer whose loss ``Task.loss`` computes now) and ``metrics`` (the
    latest evaluation).
    """

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    best_metric: float | None = None
    evals_without_improvement: int = 0
    train_seconds: float = 0.0

    max_steps: int = 0
    output_dir: Path = Path(".")
    config: Any = None
    accelerator: Any = None
    models: dict[str, Any] = field(default_factory=dict)
    optimizers: dict[str, Any] = field(default_factory=dict)
    phase: str = "main"
    metrics: dict[str, float] = field(default_factory=dict)
    _log: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (numbers by name; ``step`` defaults to ``global_step``) to ``metrics.jsonl`` and
        the trackers. Call it on every process: only the main process writes."""
        record = {"step": self.global_step, **record}
        if self._log is not None:
            self._log(record)

    def counters(self) -> dict[str, Any]:
        """The checkpointed counters as plain data."""
        return {name: getattr(self, name) for name in COUNTERS}

    def load_counters(self, values: dict[str, Any]) -> None:
        unknown = sorted(set(values) - set(COUNTERS))
        if unknown:
            raise ValueError(f"unknown run-state counters {unknown}")
        for name, value in values.items():
            setattr(self, name, value)


@dataclass
class TrainerControl:
    """Requests a callback makes of the engine; the engine acts on them after the current step's hooks
    and resets them once done (as transformers' ``TrainerControl``)."""

    should_evaluate: bool = False
    should_save: bool = False
    should_training_stop: bool = False

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, False)
