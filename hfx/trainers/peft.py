"""Parameter-efficient fine-tuning in engine recipes: a ``peft:`` section wraps one of the task's models.

A recipe names the method and any field of its peft config::

    peft: {method: lora, r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}
    peft: {method: prompt_tuning, num_virtual_tokens: 8}
    peft: {method: relora, r: 16, relora_steps: 500, restart_warmup_steps: 50, prune_method: magnitude}

``method`` is any peft type by its lower-case name (``lora``, ``prefix_tuning``, ``prompt_tuning``, ``ia3``,
``loha``, ...) or one hfx registers (``relora``, ``bottleneck_adapter``); ``model`` picks which of the task's
models is wrapped (default: the only one); ``save_base`` (default true) writes the untouched base model, as
the task saves it, to ``<output_dir>/base`` and ``final/base`` (a model built from config exists nowhere
else). Every other key is a field of the method's config class, checked before anything is built.
``task_type`` defaults from the task (``causal-lm`` -> ``CAUSAL_LM``, what prefix and prompt tuning need to
``generate``).

Where things happen: :func:`validate_peft` runs with the rest of the config checks; the engine calls
:func:`apply_peft` right after ``task.build_models()`` (so optimizers see only the trainable parameters) and,
when peft is on, :meth:`PeftRun.save` instead of the task's ``save`` for ``final/``: ``final/`` holds the
adapter (``PeftModel.save_pretrained``) and ``final/base`` the base artifact the task wrote before training.

ReLoRA (``method: relora``): the run uses the jagged cosine schedule built from the ReLoRA fields
(``scheduler.name`` is set to ``relora_jagged``; any other schedule is refused since the restarts need the
learning rate at 0), and a callback calls :func:`hfx.peft.relora_restart` with the real optimizer after every
``relora_steps``-th optimizer step, before that step's checkpoint, logging ``relora/*`` to ``metrics.jsonl``.
The model's state (base weights with the merged history, history buffers) and the pruned optimizer state are
in every checkpoint, so a resumed run continues exactly.
With ``full_rank_warmup_steps: N`` (:class:`FullRankWarmStart`) the base trains full-rank for N steps first,
then ReLoRA takes over in the same run (one process); ``final/base`` is then the warm-started base.

Fine-tuning schedules (``freeze: {train_only: [regex, ...], unfreeze_at_step: N}``, :class:`FreezeRun`): only the
trainable parameters whose ``<model>.<parameter>`` name matches a pattern train, the others join after N steps.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hfx.trainers.callbacks import Callback
from hfx.trainers.config import ConfigError, _suggest
from hfx.trainers.schedules import register_schedule

if TYPE_CHECKING:
    from hfx.trainers.config import TrainConfig
    from hfx.trainers.engine import Trainer

logger = logging.getLogger(__name__)

#: Keys of the ``peft:`` section that are hfx's, not the peft config's.
ENGINE_KEYS = ("method", "model", "save_base")
#: The peft ``task_type`` each engine task implies (prompt-learning methods need it to pick the right PeftModel).
TASK_TYPES = {"causal-lm": "CAUSAL_LM"}


def peft_methods() -> dict[str, type]:
    """Lower-case method name -> peft config class, for every type peft and hfx register."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import hfx.peft  # noqa: F401  (registers ReLoRA and bottleneck adapters)

    return {str(getattr(key, "value", key)).lower(): cls for key, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def build_peft_config(section: dict[str, Any], task: str | None = None):
    """The peft config a recipe's ``peft:`` section describes (``ENGINE_KEYS`` left out).

    Raises:
        ConfigError: no or an unknown ``method``, a field the method's config lacks (naming the closest
            one), or values the config class rejects.
    """
    methods = peft_methods()
    method = section.get("method")
    if not isinstance(method, str):
        raise ConfigError(f"peft.method must name a PEFT method (one of {', '.join(sorted(methods))}), got {method!r}")
    if method.lower() not in methods:
        raise ConfigError(f"unknown peft.method {method!r}{_suggest(method.lower(), methods, '')}"
                          .replace("valid keys", "PEFT methods"))
    config_cls = methods[method.lower()]
    valid = [f.name for f in dataclasses.fields(config_cls) if f.init and f.name != "peft_type"]
    fields = {k: v for k, v in section.items() if k not in ENGINE_KEYS}
    for key in fields:
        if key not in valid:
            raise ConfigError(f"unknown config key {'peft.' + key!r} for method {method!r}"
                              f"{_suggest(key, valid + list(ENGINE_KEYS), 'peft.')}")
    if "task_type" in valid and task in TASK_TYPES:
        fields.setdefault("task_type", TASK_TYPES[task])
    try:
        return config_cls(**fields)
    except (TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"peft ({method}): {first}") from None


def validate_peft(config: TrainConfig) -> None:
    """Config checks of the ``peft:`` section (called by :func:`hfx.trainers.config.validate`); for ReLoRA
    also sets ``scheduler`` to the jagged cosine schedule of the ReLoRA fields (visible in ``config.yaml``)."""
    from hfx.peft import ReLoraConfig

    if config.peft is None:
        return
    peft_config = build_peft_config(config.peft, config.task)
    if not isinstance(config.peft.get("save_base", True), bool):
        raise ConfigError(f"config key 'peft.save_base' must be true or false, got {config.peft['save_base']!r}")
    if not isinstance(peft_config, ReLoraConfig):
        return
    warm = peft_config.full_rank_warmup_steps
    if warm:
        max_steps = config.train.max_steps
        if max_steps is not None and warm >= max_steps:
            raise ConfigError(f"peft.full_rank_warmup_steps={warm} leaves no ReLoRA step (train.max_steps={max_steps})")
        if config.peft.get("save_base", True) is not True:
            raise ConfigError("peft.full_rank_warmup_steps trains the base model itself, which final/base must then "
                              "hold: peft.save_base must be true")
        if config.freeze.train_only:
            raise ConfigError("peft.full_rank_warmup_steps cannot be combined with freeze.train_only (both decide "
                              "which parameters train when)")
    if config.ema.enabled:  # restarts move the update between base and factors: their averages do not add up
        raise ConfigError("ema.enabled is not supported with peft.method relora (a restart moves the update from the "
                          "adapter into the base weights, so separate averages of the two are not a model)")
    sched = config.scheduler
    if sched.name not in ("constant", "relora_jagged"):  # constant is the default: the user chose nothing
        raise ConfigError(f"peft.method relora runs its jagged cosine schedule (learning rate 0 at each restart); "
                          f"remove scheduler.name={sched.name!r} or set it to 'relora_jagged'")
    for key, ours in (("warmup_steps", peft_config.warmup_steps), ("min_lr_ratio", peft_config.min_lr_ratio)):
        theirs = getattr(sched, key)
        if theirs and theirs != ours:
            raise ConfigError(f"scheduler.{key}={theirs} conflicts with ReLoRA's {key}={ours}: set peft.{key} "
                              f"(the jagged schedule reads it there)")
    sched.name, sched.warmup_steps, sched.min_lr_ratio = "relora_jagged", peft_config.warmup_steps, peft_config.min_lr_ratio
    sched.options = {"relora_steps": peft_config.relora_steps, "restart_warmup_steps": peft_config.restart_warmup_steps,
                     "first_restart_offset": warm}


@register_schedule("relora_jagged")
def relora_jagged_schedule(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                           min_lr_ratio: float = 0.1, relora_steps: int, restart_warmup_steps: int = 0,
                           first_restart_offset: int = 0):
    """ReLoRA's jagged cosine (:func:`hfx.peft.get_jagged_cosine_schedule`) as an engine schedule: options
    ``relora_steps``, ``restart_warmup_steps`` and ``first_restart_offset`` (the full-rank warm start); the
    multiplier is 0 right after each restart and right after the switch from full-rank to ReLoRA."""
    from hfx.peft import get_jagged_cosine_schedule

    return get_jagged_cosine_schedule(optimizer, num_training_steps=total_steps, relora_steps=relora_steps,
                                      restart_warmup_steps=restart_warmup_steps, warmup_steps=warmup_steps,
                                      min_lr_ratio=min_lr_ratio, first_restart_offset=first_restart_offset)


class ReLoraRestarts(Callback):
    """Calls :func:`hfx.peft.relora_restart` after every ``relora_steps``-th optimizer step (not after the last
    one), on every process, and logs what it did as ``relora/*`` in ``metrics.jsonl``. ``restarts`` holds the
    :class:`hfx.peft.ReLoraRestartStats` of this process's run (not those before a resume)."""

    def __init__(self, model_name: str, optimizer_name: str, relora_steps: int, first_restart_offset: int = 0):
        self.model_name, self.optimizer_name, self.relora_steps = model_name, optimizer_name, relora_steps
        self.first_restart_offset = first_restart_offset
        self.restarts = []

    def on_step_end(self, trainer: Trainer) -> None:
        from hfx.peft import is_restart_step, relora_config_of, relora_layers, relora_restart

        step = trainer.global_step
        if not is_restart_step(step, relora_steps=self.relora_steps, first_restart_offset=self.first_restart_offset) \
                or step >= trainer.total_steps:
            return
        model = trainer.unwrapped(self.model_name)
        stats = relora_restart(model, trainer.optimizers[self.optimizer_name], step=step)
        self.restarts.append(stats)
        adapter, _ = relora_config_of(model)
        restarts = relora_layers(model, adapter)[0].num_restarts(adapter)  # the model's history survives a resume
        trainer._record({"step": step, "relora/restart": restarts, "relora/layers": stats.layers,
                         "relora/pruned_fraction": stats.pruned_fraction})


@dataclasses.dataclass
class PeftRun:
    """The peft side of one run: which model is wrapped, its config, the callbacks it needs, how it saves."""

    model_name: str
    config: Any
    save_base: bool
    base_dir: Path | None = None

    @property
    def method(self) -> str:
        return str(getattr(self.config.peft_type, "value", self.config.peft_type)).lower()

    def callbacks(self, groups: dict[str, list[str]]) -> list[Callback]:
        from hfx.peft import ReLoraConfig

        if not isinstance(self.config, ReLoraConfig):
            return []
        optimizer = next(name for name, members in groups.items() if self.model_name in members)
        warm = self.config.full_rank_warmup_steps
        restarts = ReLoraRestarts(self.model_name, optimizer, self.config.relora_steps, first_restart_offset=warm)
        return [FullRankWarmStart(self, optimizer, warm), restarts] if warm else [restarts]

    def save(self, models: dict[str, torch.nn.Module], state_dicts: dict[str, dict], output_dir: Path) -> None:
        """``final/``: the adapter of the wrapped model (``adapter_config.json``, ``adapter_model.safetensors``)
        plus ``base/`` (the task's artifact of the untouched base, when ``save_base``). Main process only."""
        peft_model = models[self.model_name]
        if self.base_dir is not None:
            # Record where the base will be (``output_dir`` is ``final.tmp``, renamed to ``final`` once complete), so
            # peft's AutoPeftModel* classes and the model card find it; a moved folder needs its base path again.
            final = output_dir.with_name(output_dir.name.removesuffix(".tmp"))
            for config in peft_model.peft_config.values():
                config.base_model_name_or_path = str((final / "base").resolve())
        # With the base saved beside it, the adapter needs no copy of resized embeddings (peft's "auto" check
        # would also look for the base config before final/base exists).
        extra = {"save_embedding_layers": False} if self.base_dir is not None else {}
        peft_model.save_pretrained(output_dir, state_dict=state_dicts[self.model_name], **extra)
        if self.base_dir is not None:
            shutil.copytree(self.base_dir, output_dir / "base")

    def card(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The task's model-card variables with the loading snippet of an adapter."""
        base = '"PATH/TO/final/base"' if self.save_base else "BASE_MODEL_NAME_OR_PATH"
        snippet = ("import hfx  # registers hfx's PEFT methods (ReLoRA, bottleneck adapters)\n"
                   "from peft import PeftModel\n"
                   f"base = ...  # the base model as the task loads it, e.g. AutoModel*.from_pretrained({base})\n"
                   'model = PeftModel.from_pretrained(base, "PATH/TO/final")')
        summary = extra.get("model_summary", "")
        return {**extra, "load_snippet": snippet, "library_name": "peft",
                "model_summary": f"A `{self.method}` adapter (peft) of this base model. {summary}".strip()}


def apply_peft(trainer: Trainer, models: dict[str, torch.nn.Module]) -> PeftRun | None:
    """Wrap the model the ``peft:`` section names with ``get_peft_model``, in ``models`` (in place), after
    writing the untouched base with the task's ``save`` to ``<output_dir>/base`` when ``save_base``.
    Returns None when the recipe has no ``peft:`` section."""
    from peft import get_peft_model

    config, acc = trainer.config, trainer.accelerator
    if config.peft is None:
        return None
    name = config.peft.get("model")
    if name is None:
        if len(models) != 1:
            raise ConfigError(f"peft.model must name the model to wrap (task {config.task!r} builds {', '.join(models)})")
        name = next(iter(models))
    if name not in models:
        raise ConfigError(f"peft.model {name!r} is not a model of task {config.task!r} (it builds {', '.join(models)})")
    run = PeftRun(name, build_peft_config(config.peft, config.task), save_base=config.peft.get("save_base", True))
    if run.save_base:
        run.base_dir = trainer.output_dir / "base"
        # Written in every run (a resumed run builds the same seeded base; a new one may have changed it).
        if acc.is_main_process:
            tmp = run.base_dir.with_name("base.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            trainer.task.save(models, {n: m.state_dict() for n, m in models.items()}, tmp)
            shutil.rmtree(run.base_dir, ignore_errors=True)
            tmp.rename(run.base_dir)
        acc.wait_for_everyone()
    try:
        models[name] = get_peft_model(models[name], run.config)
    except (TypeError, ValueError) as err:  # peft's messages span lines (they print whole modules)
        raise ConfigError(f"peft ({run.method}) cannot wrap model {name!r}: {' '.join(str(err).split())[:400]}") from None
    if getattr(run.config, "full_rank_warmup_steps", 0):
        if acc.num_processes > 1:
            raise ConfigError("peft.full_rank_warmup_steps runs in one process only: DDP would not synchronise the "
                              "gradients of the parameters that stop (or start) training at the switch")
        # Every base parameter joins the optimizer now; FullRankWarmStart decides which of them train when.
        for p in FullRankWarmStart.base_parameters(models[name]):
            p.requires_grad_(True)
    trainable, total = (sum(p.numel() for p in models[name].parameters() if p.requires_grad),
                        sum(p.numel() for p in models[name].parameters()))
    logger.info("peft %s on model %r: %d of %d parameters trainable (%.2f%%)", run.method, name, trainable, total,
                100 * trainable / max(total, 1))
    return run


class FullRankWarmStart(Callback):
    """ReLoRA's full-rank warm start (``peft.full_rank_warmup_steps: N``) inside one engine run.

    The model is wrapped with ReLoRA from the start and the optimizer holds every parameter, but for the first
    ``N`` steps only the base model's own parameters train (all of them, the wrapped linears' weights included;
    ``modules_to_save`` train through their trainable copies) while the LoRA factors get no gradient, so B = 0 and
    the model is the plain base. After step ``N`` (where the jagged schedule puts the learning rate at 0) the
    switch: the base parameters stop training and their optimizer state is freed, the LoRA factors train, and
    the restarts follow at ``N + k * relora_steps``. An optimizer gives a parameter without a gradient no step, no
    state and no weight decay, so this is exactly "train full-rank, then ReLoRA" with one optimizer, one
    checkpoint format and an exact resume on both sides of the switch.

    At the switch the warm-started base (the model as it is then, without its adapter) is written with the
    task's ``save`` to ``<output_dir>/warm_base`` (atomically); ``final/base`` is that model, so
    ``PeftModel.from_pretrained(<final/base>, final)`` rebuilds the trained model (the saved merge history holds
    only the updates after the switch).
    """

    state_key = "relora_full_rank_warm_start"

    def __init__(self, run: PeftRun, optimizer_name: str, switch_step: int):
        self.run, self.optimizer_name, self.switch_step = run, optimizer_name, switch_step

    @staticmethod
    def base_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters of the wrapped base model that the adapter does not train: not the LoRA factors, not
        the untouched originals that ``modules_to_save`` keeps (their trainable copies train in both phases)."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        skip = set()
        for module in model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                skip.update(id(p) for p in module.parameters())  # originals and trainable copies alike
            elif isinstance(module, BaseTunerLayer):
                base = module.get_base_layer()
                adapter = {id(p) for p in module.parameters()} - {id(p) for p in base.parameters()}
                skip.update(adapter)
        return [p for p in model.parameters() if id(p) not in skip]

    def _lora_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        from hfx.peft import relora_config_of, relora_layers

        adapter, _ = relora_config_of(model)
        return [p for layer in relora_layers(model, adapter) for p in (layer.lora_A[adapter].weight,
                                                                       layer.lora_B[adapter].weight)]

    def _set_phase(self, trainer: Trainer, switched: bool) -> None:
        model = trainer.unwrapped(self.run.model_name)
        base, lora = self.base_parameters(model), self._lora_parameters(model)
        for p in base:
            p.requires_grad_(not switched)
        for p in lora:
            p.requires_grad_(switched)
        if switched:
            optimizer = trainer.optimizers[self.optimizer_name]
            state = getattr(optimizer, "optimizer", optimizer).state
            for p in base:  # the full-rank moments are what ReLoRA saves memory on
                state.pop(p, None)
            self.run.base_dir = trainer.output_dir / "warm_base"

    def on_train_begin(self, trainer: Trainer) -> None:
        if self.switch_step >= trainer.total_steps:
            raise ConfigError(f"peft.full_rank_warmup_steps={self.switch_step} leaves no ReLoRA step (the run has "
                              f"{trainer.total_steps} steps)")
        switched = trainer.global_step >= self.switch_step
        if switched and not (trainer.output_dir / "warm_base").is_dir():
            raise FileNotFoundError(f"{trainer.output_dir / 'warm_base'} (the base after the full-rank warm start, "
                                    "written at the switch) is missing: the run cannot resume after the switch")
        self._set_phase(trainer, switched)
        if not switched:
            logger.info("ReLoRA full-rank warm start: the base model trains full-rank for %d steps", self.switch_step)

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.global_step != self.switch_step:
            return
        if trainer.accelerator.is_main_process:
            self._save_warm_base(trainer)
        trainer.accelerator.wait_for_everyone()
        self._set_phase(trainer, switched=True)
        model = trainer.unwrapped(self.run.model_name)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("ReLoRA full-rank warm start done at step %d: %d parameters train from now on", self.switch_step,
                    trainable)
        trainer._record({"step": trainer.global_step, "relora/switch_to_low_rank": 1, "relora/trainable": trainable})

    def _save_warm_base(self, trainer: Trainer) -> None:
        import copy

        # A copy without the adapter: B = 0 here, so the base layers alone compute what the model computes, and
        # unload() puts the trained copies of modules_to_save in place of the originals.
        plain = copy.deepcopy(trainer.unwrapped(self.run.model_name)).unload()
        target = trainer.output_dir / "warm_base"
        tmp = target.with_name("warm_base.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainer.task.save({self.run.model_name: plain}, {self.run.model_name: plain.state_dict()}, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)


# ---------------------------------------------------------------------------------------- freeze schedules
def validate_freeze(config: TrainConfig) -> None:
    """Config checks of the ``freeze:`` section (called by :func:`hfx.trainers.config.validate`)."""
    import re

    cfg = config.freeze
    for i, pattern in enumerate(cfg.train_only):
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"freeze.train_only[{i}] {pattern!r} is not a regular expression: {err}") from None
    if cfg.unfreeze_at_step is not None:
        if not cfg.train_only:
            raise ConfigError("freeze.unfreeze_at_step needs freeze.train_only (what trains before it)")
        if cfg.unfreeze_at_step < 1:
            raise ConfigError(f"config key 'freeze.unfreeze_at_step' must be >= 1, got {cfg.unfreeze_at_step}")


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
        import re

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

    def on_train_begin(self, trainer: Trainer) -> None:
        if self.unfreeze_at_step is not None and trainer.global_step >= self.unfreeze_at_step:
            self._set(True)  # a run resumed after the unfreeze

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.global_step == self.unfreeze_at_step:
            self._set(True)
            logger.info("freeze: all parameters train from step %d on", trainer.global_step + 1)
