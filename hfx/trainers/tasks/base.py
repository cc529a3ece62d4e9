"""What a task is: the part of a training run that differs between methods.

A task builds its model(s) and data, computes the loss of a batch, evaluates, and saves its artifact.
Everything else (the loop, precision, accumulation, clipping, optimizers, schedules, EMA, checkpoints,
logging, several processes) is the engine's. Register a task with :func:`register_task`; a recipe then
names it as ``task: <name>`` and configures it under ``task_options`` (checked against ``Options``).

Several models and optimizers: :meth:`Task.optimizer_groups` maps optimizer names to the models they
train (a GAN: ``{"discriminator": ["discriminator"], "generator": ["generator"]}``) and
:meth:`Task.phases` says which optimizers take a step on a batch (n_critic: the generator only every
n-th step). In each phase the engine makes only that optimizer's parameters trainable, and hands the
task the other models unwrapped (no DDP hooks), so a generator loss can run the discriminator without
touching its gradients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    import accelerate
    import datasets

    from hfx.trainers.callbacks import Callback
    from hfx.trainers.config import TrainConfig


@dataclass
class NoOptions:
    """For tasks without options of their own."""


@dataclass
class TaskData:
    """Map-style datasets (anything a ``torch.utils.data.DataLoader`` takes) and their collate function."""

    train: Any
    eval: Any | None = None
    collate_fn: Callable | None = None


class Task:
    """Base class of every task. Subclasses set ``Options`` (a dataclass) and implement
    :meth:`build_data`, :meth:`build_models`, :meth:`loss` and :meth:`save`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: False for tasks that make their own data (then ``data.dataset`` may be left out).
    needs_dataset: ClassVar[bool] = True
    #: The Hub task type for the model card's results (``"image-classification"``, ``"text-generation"``).
    hub_task_type: ClassVar[str | None] = None

    def __init__(self, config: TrainConfig, accelerator: accelerate.Accelerator):
        self.config = config
        self.options = config.task_options
        self.accelerator = accelerator
        self.output_dir = Path(config.output_dir)

    # ------------------------------------------------------------------------------ what a task defines
    def build_data(self) -> TaskData:
        """Called before :meth:`build_models`, so a missing dataset fails before any model exists."""
        raise NotImplementedError

    def build_models(self) -> dict[str, torch.nn.Module]:
        """The models by name, freshly built or loaded (not yet on the device, not wrapped)."""
        raise NotImplementedError

    def optimizer_groups(self, models: dict[str, torch.nn.Module]) -> dict[str, list[str]]:
        """Optimizer name -> the models whose trainable parameters it updates. One optimizer by default."""
        return {"main": list(models)}

    def phases(self, step: int) -> list[str]:
        """Which optimizers take a step on the batch of optimizer step ``step`` (0-based), in order."""
        return list(self._optimizer_names)

    def ema_models(self) -> list[str]:
        """Models whose weights ``ema.enabled`` averages; all of them by default."""
        return list(self._model_names)

    def loss(self, models: dict[str, torch.nn.Module], batch: Any, phase: str
             ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss of ``batch`` for optimizer ``phase``; optionally also extra values to log."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, models: dict[str, torch.nn.Module], loader) -> dict[str, float]:
        """Metrics over the eval loader (already sharded across processes: gather with
        ``self.accelerator.gather_for_metrics``). Models are in eval mode, EMA weights swapped in."""
        return {}

    def save(self, models: dict[str, torch.nn.Module], state_dicts: dict[str, dict[str, torch.Tensor]],
             output_dir: Path) -> None:
        """Write the final artifact into ``output_dir`` (main process only). ``state_dicts`` holds each
        model's full weights (gathered under FSDP/DeepSpeed; EMA weights when ``ema.use_for_final``):
        pass them to ``save_pretrained(..., state_dict=...)``."""
        raise NotImplementedError

    def callbacks(self) -> list[Callback]:
        """Callbacks the task always needs (added before those of the recipe)."""
        return []

    def card(self, metrics: dict[str, float]) -> dict[str, Any]:
        """Extra variables for the model card (``model_summary``, ``load_snippet``, ...)."""
        return {}

    # ------------------------------------------------------------------------------ helpers for tasks
    def load_dataset(self) -> datasets.DatasetDict:
        """``data.dataset`` through :func:`hfx.data.load`, with ``max_*_samples`` applied. A source that
        cannot be loaded is a ValueError (or FileNotFoundError) naming it."""
        import hfx.data
        from hfx.trainers.config import ConfigError

        cfg = self.config.data
        try:
            loaded = hfx.data.load(cfg.dataset, seed=self.config.seed, **cfg.options)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as err:  # datasets raises many kinds (offline, not found, bad builder)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"cannot load dataset {cfg.dataset!r}: {first}") from err
        for split in (cfg.train_split, cfg.eval_split):
            if split is not None and split not in loaded:
                raise ConfigError(f"dataset {cfg.dataset!r} has no split {split!r} (it has {', '.join(loaded)})")
        for split, limit in ((cfg.train_split, cfg.max_train_samples), (cfg.eval_split, cfg.max_eval_samples)):
            if split is not None and limit is not None and limit < len(loaded[split]):
                loaded[split] = loaded[split].select(range(limit))
        return loaded

    # set by the engine once the optimizers are known
    _model_names: list[str] = []
    _optimizer_names: list[str] = []


TASKS: dict[str, type[Task]] = {}


def register_task(name: str):
    """Class decorator: make a :class:`Task` subclass available as ``task: <name>`` in recipes."""

    def add(cls: type[Task]) -> type[Task]:
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"task {name!r}: Options must be a dataclass, got {cls.Options!r}")
        if TASKS.get(name, cls) is not cls:
            raise ValueError(f"task {name!r} is already registered to {TASKS[name].__module__}.{TASKS[name].__name__}")
        cls.name = name
        TASKS[name] = cls
        return cls

    return add


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name``; a ValueError naming the closest registered task if none."""
    import difflib

    from hfx.trainers.config import ConfigError

    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f"; registered tasks: {', '.join(sorted(TASKS))}"
        raise ConfigError(f"unknown task {name!r}{hint}")
    return TASKS[name]
