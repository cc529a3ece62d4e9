"""Fine-tuning schedules: ``freeze: {train_only: [regex, ...], unfreeze_at_step: N}``.

Only the trainable parameters whose ``<model>.<parameter>`` name matches a pattern train; with
``unfreeze_at_step`` the others join after N optimizer steps (the seeds' "head first, then everything").
"""

from __future__ import annotations

import logging
import re

import torch

from hfx.trainers.callbacks import Callback
from hfx.trainers.errors import ConfigError

logger = logging.getLogger(__name__)


def validate_freeze(config) -> None:
    """Config checks of the ``freeze:`` section."""
    cfg = config.freeze
    for i, pattern in enumerate(cfg.train_only):
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"freeze.train_only[{i}] {pattern!r} is not a regular expression: {err}") from None
    if cfg.unfreeze_at_step is not None and not cfg.train_only:
        raise ConfigError("freeze.unfreeze_at_step needs freeze.train_only (what trains before it)")


class FreezeRun(Callback):
    """``freeze:``: trainable parameters outside ``train_only`` are frozen; with ``unfreeze_at_step`` they are
    in the optimizer from the start (an optimizer gives a parameter without a gradient no step, no state and
    no weight decay) and get ``requires_grad`` back after that many steps, also when a run resumes past it,
    so a resumed run continues exactly."""

    def __init__(self, frozen: list[torch.nn.Parameter], unfreeze_at_step: int | None):
        self.frozen, self.unfreeze_at_step = frozen, unfreeze_at_step

    @classmethod
    def select(cls, cfg, models: dict[str, torch.nn.Module], num_processes: int, num_optimizers: int) -> FreezeRun | None:
        """Pick the parameters to freeze (before the optimizers are built); freeze them now when they never
        unfreeze, so the optimizers leave them out. None when ``train_only`` is empty.

        Raises:
            ConfigError: no trainable parameter matches ``train_only``, or ``unfreeze_at_step`` with several
                processes (DDP registers only the parameters that require gradients when it wraps a model) or
                several optimizers (the engine's per-phase freezing is fixed when the run starts).
        """
        if not cfg.train_only:
            return None
        patterns = [re.compile(p) for p in cfg.train_only]
        named = [(f"{m}.{n}", p) for m, model in models.items() for n, p in model.named_parameters() if p.requires_grad]
        kept = [name for name, _ in named if any(p.search(name) for p in patterns)]
        if not kept:
            raise ConfigError(f"freeze.train_only {cfg.train_only} matches no trainable parameter (they are named like "
                              f"{', '.join(name for name, _ in named[:3])}, ...)")
        if cfg.unfreeze_at_step is not None and num_processes > 1:
            raise ConfigError("freeze.unfreeze_at_step runs in one process only: DDP would not synchronise the "
                              "gradients of parameters that were frozen when it wrapped the model")
        if cfg.unfreeze_at_step is not None and num_optimizers > 1:
            raise ConfigError("freeze.unfreeze_at_step works with tasks of one optimizer only")
        run = cls([p for name, p in named if not any(pat.search(name) for pat in patterns)], cfg.unfreeze_at_step)
        logger.info("freeze: training %d of %d parameter tensors%s", len(kept), len(named),
                    f" until step {cfg.unfreeze_at_step}" if cfg.unfreeze_at_step else "")
        if cfg.unfreeze_at_step is None:
            run._set(False)
        return run

    def after_optimizers(self) -> FreezeRun:
        """Freeze what unfreezes later, now that the optimizers hold it; returns the callback that unfreezes."""
        self._set(False)
        return self

    def _set(self, trainable: bool) -> None:
        for p in self.frozen:
            p.requires_grad_(trainable)

    def on_train_begin(self, state, control) -> None:
        if self.unfreeze_at_step is not None and state.global_step >= self.unfreeze_at_step:
            self._set(True)  # a run resumed after the unfreeze

    def on_step_end(self, state, control) -> None:
        if state.global_step == self.unfreeze_at_step:
            self._set(True)
            logger.info("freeze: all parameters train from step %d on", state.global_step + 1)
