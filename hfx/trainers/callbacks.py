"""Hooks into the engine's loop, for behaviour that is neither a task's loss nor the engine's (ReLoRA's
merge-and-restart every N steps, freeze schedules, the model card, custom logging).

As in transformers' ``TrainerCallback``, a callback never sees the engine: every hook gets the
:class:`~hfx.trainers.state.RunState` (counters, ``accelerator``, the unwrapped ``models``, the torch
``optimizers``, ``log()``) and a :class:`~hfx.trainers.state.TrainerControl` to ask for an evaluation, a
checkpoint or a stop. What a callback needs beyond that it gets when it is built. State a callback returns
from :meth:`Callback.state_dict` is saved in every checkpoint and handed back to
:meth:`Callback.load_state_dict` on resume, so the run continues exactly; it must hold only tensors,
numbers, strings, lists and dicts (it is loaded with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from typing import Any

from hfx.trainers.errors import ConfigError
from hfx.trainers.state import RunState, TrainerControl


class Callback:
    """Override any of the hooks; all run on every process, in the order the callbacks were given."""

    #: Key of this callback's state in checkpoints; defaults to the class name. Two callbacks with state
    #: in one run need different keys.
    state_key: str | None = None

    def on_train_begin(self, state: RunState, control: TrainerControl) -> None:
        """After models, optimizers and data are prepared and a checkpoint (if any) is loaded."""

    def on_step_end(self, state: RunState, control: TrainerControl) -> None:
        """After each optimizer step (``state.global_step`` already counts it), before EMA, logging,
        evaluation and checkpointing of that step."""

    def on_evaluate(self, state: RunState, control: TrainerControl, metrics: dict[str, float]) -> None:
        """After each evaluation with its metrics."""

    def on_save(self, state: RunState, control: TrainerControl, checkpoint_dir: str) -> None:
        """After a checkpoint folder is complete."""

    def on_train_end(self, state: RunState, control: TrainerControl) -> None:
        """After the final artifact and ``results.json`` are written."""

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


def validate_callbacks(specs: list[dict[str, Any]]) -> None:
    """Every ``callbacks:`` entry names a registered callback and options its constructor takes."""
    import inspect

    from hfx.trainers.config import _suggest

    for i, spec in enumerate(specs):
        if "name" not in spec:
            raise ConfigError(f"callbacks[{i}] needs a 'name' (registered: {', '.join(sorted(CALLBACKS)) or 'none'})")
        if spec["name"] not in CALLBACKS:
            raise ConfigError(f"unknown callback {spec['name']!r}{_suggest(spec['name'], CALLBACKS, '', 'registered callbacks')}")
        options = {k: v for k, v in spec.items() if k != "name"}
        try:
            inspect.signature(CALLBACKS[spec["name"]]).bind(**options)
        except TypeError as err:
            raise ConfigError(f"callbacks[{i}] ({spec['name']}): {err}") from None


def build_callbacks(specs: list[dict[str, Any]]) -> list[Callback]:
    """Instantiate ``[{name: ..., **options}]`` from a recipe (checked by :func:`validate_callbacks`)."""
    validate_callbacks(specs)
    return [CALLBACKS[spec["name"]](**{k: v for k, v in spec.items() if k != "name"}) for spec in specs]
