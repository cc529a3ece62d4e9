"""What a task is: the part of a training run that differs between methods.

A task builds its model(s) and data, computes the loss of a batch, evaluates, saves its artifact and says
what its model card needs. Everything else (the loop, precision, accumulation, clipping, optimizers,
schedules, EMA, checkpoints, logging, several processes) is the engine's. Register a task with
:func:`register_task`; a recipe then names it as ``task: <name>`` and configures it under ``task_options``
(checked against ``Options``, whose fields may declare their ranges with :func:`hfx.trainers.config.bounded`).

The engine hands a task the models, the batch and a :class:`~hfx.trainers.state.RunState` (``global_step``,
``epoch``, ``samples_seen``, ``accelerator``, ``log()``; ``state.phase`` in :meth:`Task.loss`), never itself.
What a task keeps between steps (a MoCo queue, a CycleGAN image pool, a DINO center) it returns from
:meth:`Task.state_dict` and takes back in :meth:`Task.load_state_dict`: the engine puts it, for every process,
in every checkpoint, so a killed run resumes bit-exactly.

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

from hfx.trainers.errors import ConfigError

if TYPE_CHECKING:
    import accelerate
    import datasets

    from hfx.trainers.callbacks import Callback
    from hfx.trainers.config import TrainConfig
    from hfx.trainers.state import RunState


@dataclass
class NoOptions:
    """For tasks without options of their own."""


@dataclass
class TaskData:
    """Map-style datasets (anything a ``torch.utils.data.DataLoader`` takes) and their collate function."""

    train: Any
    eval: Any | None = None
    collate_fn: Callable | None = None
    #: False for data whose order is part of the method: the train loader then reads it in order (each
    #: process its share of every global batch), e.g. Transformer-XL's batchified streams.
    shuffle: bool = True


class Task:
    """Base class of every task. Subclasses set ``Options`` (a dataclass) and implement
    :meth:`build_data`, :meth:`build_models`, :meth:`loss` and :meth:`save`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: False for tasks that make their own data (then ``data.dataset`` may be left out).
    needs_dataset: ClassVar[bool] = True
    #: The Hub task type of the model card's results (``"image-classification"``, ``"text-generation"``).
    hub_task_type: ClassVar[str | None] = None
    #: The peft ``task_type`` a ``peft:`` section of this task defaults to (``"CAUSAL_LM"``: prefix and
    #: prompt tuning need it to ``generate``).
    peft_task_type: ClassVar[str | None] = None
    #: Seeds of the generators :meth:`eval_generator` gives (fixed noise in every evaluation and run).
    eval_seed: ClassVar[int] = 0

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

    def phases(self, state: RunState) -> list[str]:
        """Which optimizers take a step on the batch of step ``state.global_step`` (0-based), in order.
        Every optimizer, in :meth:`optimizer_groups` order, by default."""
        return list(state.optimizers)

    def ema_models(self, models: dict[str, torch.nn.Module]) -> list[str]:
        """Models whose weights ``ema.enabled`` averages; all of them by default."""
        return list(models)

    def loss(self, models: dict[str, torch.nn.Module], batch: Any, state: RunState
             ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss of ``batch`` for optimizer ``state.phase`` at step ``state.global_step``;
        optionally also extra values to log."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, models: dict[str, torch.nn.Module], loader, state: RunState) -> dict[str, float]:
        """Metrics over the eval loader (already sharded across processes: gather with
        ``self.accelerator.gather_for_metrics``). Models are in eval mode, EMA weights swapped in."""
        return {}

    def save(self, models: dict[str, torch.nn.Module], state_dicts: dict[str, dict[str, torch.Tensor]],
             output_dir: Path) -> None:
        """Write the final artifact into ``output_dir`` (main process only). ``state_dicts`` holds each
        model's full weights (gathered under FSDP/DeepSpeed; EMA weights when ``ema.use_for_final``):
        save those (:func:`with_weights` makes a model that holds them)."""
        raise NotImplementedError

    def save_preprocessing(self, output_dir: Path) -> None:
        """Write what turns raw inputs into model inputs (a tokenizer, an image processor) into ``output_dir``.
        The engine calls it beside a peft adapter in ``final/`` (where :meth:`save` is not called); a task's
        :meth:`save` calls it for its own artifact. Nothing by default."""

    def state_dict(self) -> dict[str, Any] | None:
        """What the task keeps between steps (tensors, numbers, strings, lists, dicts), or None. Saved for
        every process in every checkpoint (``task_state_<process>.pt``)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on resume, after the models are prepared)."""

    def callbacks(self) -> list[Callback]:
        """Callbacks the task always needs (added before those of the recipe)."""
        return []

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        """What the model card should say that only the task knows: ``summary`` (one paragraph), and for a
        sample-based metric ``eval_num_samples`` / ``eval_extractor`` (see :data:`hfx.hub.cards.FACT_KEYS`).
        How to load and use the artifact is its class's (``hub_card_usage``), not the task's."""
        return {}

    # ------------------------------------------------------------------------------ helpers for tasks
    def load_dataset(self) -> datasets.DatasetDict:
        """``data.dataset`` through :func:`hfx.data.load`, with ``max_*_samples`` applied. A source that
        cannot be loaded is a ConfigError (or FileNotFoundError) naming it."""
        import hfx.data

        cfg = self.config.data
        try:
            loaded = hfx.data.load(cfg.dataset, seed=self.config.seed, **cfg.options)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as err:  # datasets raises many kinds (offline, not found, bad builder, bad files)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"cannot load dataset {cfg.dataset!r}: {first}") from err
        for split in (cfg.train_split, cfg.eval_split):
            if split is not None and split not in loaded:
                raise ConfigError(f"dataset {cfg.dataset!r} has no split {split!r} (it has {', '.join(loaded)})")
        for split, limit in ((cfg.train_split, cfg.max_train_samples), (cfg.eval_split, cfg.max_eval_samples)):
            if split is not None and limit is not None and limit < len(loaded[split]):
                loaded[split] = loaded[split].select(range(limit))
        if len(loaded[cfg.train_split]) == 0:
            raise ConfigError(f"dataset {cfg.dataset!r} has no examples in split {cfg.train_split!r}")
        return loaded

    def eval_generator(self, device: torch.device | str, batch_index: int) -> torch.Generator:
        """A generator for batch ``batch_index`` of an evaluation: the same draws in every evaluation and every
        run (so held-out numbers compare across steps), different per batch and per process."""
        seed = self.eval_seed + batch_index + 1_000 * self.accelerator.process_index
        return torch.Generator(device).manual_seed(seed)


def with_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A new model of ``model``'s class and config holding ``state_dict`` (in eval mode): what a task saves,
    so that the weights written are those the engine handed over (gathered, or EMA) and the training model
    is left alone. Works for diffusers models (``from_config``) and transformers models (``cls(config)``)."""
    import copy

    cls = type(model)
    fresh = cls.from_config(model.config) if isinstance(model.config, dict) else cls(copy.deepcopy(model.config))
    fresh.load_state_dict(state_dict)
    return fresh.eval()


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
    """The task class registered as ``name``; a ConfigError naming the closest registered task if none."""
    import difflib

    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f"; registered tasks: {', '.join(sorted(TASKS))}"
        raise ConfigError(f"unknown task {name!r}{hint}")
    return TASKS[name]
