"""Hooks into the engine's loop, for behaviour that is neither a task's loss nor the engine's (ReLoRA's
merge-and-reset every N steps, custom logging).

A callback gets the :class:`~hfx.trainers.engine.Trainer` itself, so it can read ``trainer.global_step``,
reach the unwrapped models (``trainer.unwrapped("model")``), the torch optimizers
(``trainer.optimizers["main"].optimizer``: change state in place) and the schedulers. State a callback
returns from :meth:`Callback.state_dict` is saved in every checkpoint and handed back to
:meth:`Callback.load_state_dict` on resume, so the run continues exactly. That state must hold only
tensors, numbers, strings, lists and dicts (it is loaded with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hfx.trainers.engine import Trainer


class Callback:
    """Override any of the hooks; all run on every process, in the order the callbacks were given."""

    #: Key of this callback's state in checkpoints; defaults to the class name. Two callbacks with state
    #: in one run need different keys.
    state_key: str | None = None

    def on_train_begin(self, trainer: Trainer) -> None:
        """After models, optimizers and data are prepared and a checkpoint (if any) is loaded."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer step (``trainer.global_step`` already counts it), before EMA, logging,
        evaluation and checkpointing of that step."""

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After each evaluation with its metrics."""

    def on_save(self, trainer: Trainer, checkpoint_dir: str) -> None:
        """After a checkpoint folder is complete (main process only sees it renamed)."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the final artifact is saved."""

    def state_dict(self) -> dict[str, Any] | None:
        """State to checkpoint, or None for a stateless callback."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


CALLBACKS: dict[str, type[Callback]] = {}


def register_callback(name: str):
    """Class decorator: make a :class:`Callback` usable from a recipe as ``callbacks: [{name: <name>, ...}]``
    (the other keys are its constructor's keyword arguments)."""

    def add(cls: type[Callback]) -> type[Callback]:
        if CALLBACKS.get(name, cls) is not cls:
            raise ValueError(f"callback {name!r} is already registered to {CALLBACKS[name]!r}")
        CALLBACKS[name] = cls
        return cls

    return add


def build_callbacks(specs: list[dict[str, Any]]) -> list[Callback]:
    """Instantiate ``[{name: ..., **options}]`` from a recipe; a bad option is a ValueError naming it."""
    import inspect

    from hfx.trainers.config import ConfigError

    built = []
    for spec in specs:
        options = {k: v for k, v in spec.items() if k != "name"}
        cls = CALLBACKS[spec["name"]]
        try:
            inspect.signature(cls).bind(**options)
        except TypeError as err:
            raise ConfigError(f"callback {spec['name']!r}: {err}") from None
        built.append(cls(**options))
    return built
