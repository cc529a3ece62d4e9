"""ReLoRA (``peft: {method: relora, ...}``) in the engine: its schedule, its restarts, its full-rank warm start.

- **Schedule.** A ReLoRA run names ``scheduler.name: relora_jagged``: the jagged cosine schedule, built by
  :func:`hfx.peft.get_relora_schedule` from the ReLoRA fields of the ``peft:`` section (``warmup_steps``,
  ``min_lr_ratio``, ``relora_steps``, ``restart_warmup_steps``, ``full_rank_warmup_steps``), with the learning
  rate at 0 right after each restart. Nothing rewrites the recipe: another schedule is refused with the fix.
- **Restarts.** :class:`ReLoraRestarts` calls :func:`hfx.peft.relora_restart` with the real optimizer after
  every ``relora_steps``-th optimizer step (not after the last one), on every process, before that step's
  checkpoint, and logs ``relora/*`` to ``metrics.jsonl``. The model's state (base weights with the merged
  history, history buffers) and the pruned optimizer state are in every checkpoint, so a resumed run
  continues exactly.
- **Warm start.** With ``full_rank_warmup_steps: N`` (:class:`FullRankWarmStart`) the base trains full-rank
  for N steps first, then ReLoRA takes over in the same run (one process); ``final/base`` is then the
  warm-started base.
"""

from __future__ import annotations

import copy
import logging

import torch

from hfx.trainers.callbacks import Callback
from hfx.trainers.errors import ConfigError
from hfx.trainers.peft import PeftRun, build_peft_config
from hfx.trainers.schedules import register_schedule

logger = logging.getLogger(__name__)

SCHEDULE = "relora_jagged"


def validate(config, peft_config) -> None:
    """Checks of a ReLoRA recipe (``peft_config`` is its :class:`hfx.peft.ReLoraConfig`)."""
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
    if sched.name != SCHEDULE:
        raise ConfigError(f"peft.method relora runs its jagged cosine schedule (learning rate 0 at each restart): set "
                          f"scheduler.name={SCHEDULE} (it is {sched.name!r})")


@register_schedule(SCHEDULE)
def relora_jagged_schedule(optimizer: torch.optim.Optimizer, config, total_steps: int):
    """ReLoRA's jagged cosine over ``total_steps``, all of whose settings come from the ``peft:`` section."""
    from hfx.peft import ReLoraConfig, get_relora_schedule

    sched = config.scheduler
    if config.peft is None or str(config.peft.get("method", "")).lower() != "relora":
        raise ConfigError(f"scheduler.name={SCHEDULE} is ReLoRA's schedule: it needs peft.method relora")
    for key in ("warmup_steps", "min_lr_ratio"):
        if getattr(sched, key):
            raise ConfigError(f"scheduler.{key} is not read by {SCHEDULE}: set peft.{key} (the jagged schedule reads "
                              "its settings from the ReLoRA fields)")
    if sched.options:
        raise ConfigError(f"scheduler.options are not read by {SCHEDULE}: its settings are the ReLoRA fields of peft:")
    relora = build_peft_config(config.peft)
    assert isinstance(relora, ReLoraConfig)
    return get_relora_schedule(optimizer, num_training_steps=total_steps, config=relora)


def prepare(run: PeftRun, model: torch.nn.Module, num_processes: int) -> None:
    """After wrapping: with a full-rank warm start every base parameter joins the optimizer (the callback
    decides which of them train when)."""
    if getattr(run.config, "full_rank_warmup_steps", 0):
        if num_processes > 1:
            raise ConfigError("peft.full_rank_warmup_steps runs in one process only: DDP would not synchronise the "
                              "gradients of the parameters that stop (or start) training at the switch")
        for p in FullRankWarmStart.base_parameters(model):
            p.requires_grad_(True)


def callbacks(run: PeftRun, optimizer_name: str) -> list[Callback]:
    """The callbacks a ReLoRA run needs (the warm start first: its switch precedes the first restart)."""
    warm = run.config.full_rank_warmup_steps
    restarts = ReLoraRestarts(run.model_name, optimizer_name, run.config.relora_steps, first_restart_offset=warm)
    return [FullRankWarmStart(run, optimizer_name, warm), restarts] if warm else [restarts]


class ReLoraRestarts(Callback):
    """Calls :func:`hfx.peft.relora_restart` after every ``relora_steps``-th optimizer step (not after the last
    one), on every process, and logs what it did as ``relora/*`` in ``metrics.jsonl``. ``restarts`` holds the
    :class:`hfx.peft.ReLoraRestartStats` of this process's run (not those before a resume)."""

    def __init__(self, model_name: str, optimizer_name: str, relora_steps: int, first_restart_offset: int = 0):
        self.model_name, self.optimizer_name, self.relora_steps = model_name, optimizer_name, relora_steps
        self.first_restart_offset = first_restart_offset
        self.restarts = []

    def on_step_end(self, state, control) -> None:
        from hfx.peft import is_restart_step, relora_config_of, relora_layers, relora_restart

        step = state.global_step
        if not is_restart_step(step, relora_steps=self.relora_steps, first_restart_offset=self.first_restart_offset) \
                or step >= state.max_steps:
            return
        model = state.models[self.model_name]
        stats = relora_restart(model, state.optimizers[self.optimizer_name], step=step)
        self.restarts.append(stats)
        adapter, _ = relora_config_of(model)
        restarts = relora_layers(model, adapter)[0].num_restarts(adapter)  # the model's history survives a resume
        state.log({"relora/restart": restarts, "relora/layers": stats.layers, "relora/pruned_fraction": stats.pruned_fraction})


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
    task's artifact writer to ``<output_dir>/warm_base`` (atomically); ``final/base`` is that model, so
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

    @staticmethod
    def _lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        from hfx.peft import relora_config_of, relora_layers

        adapter, _ = relora_config_of(model)
        return [p for layer in relora_layers(model, adapter) for p in (layer.lora_A[adapter].weight,
                                                                       layer.lora_B[adapter].weight)]

    def _set_phase(self, state, switched: bool) -> None:
        model = state.models[self.run.model_name]
        base, lora = self.base_parameters(model), self._lora_parameters(model)
        for p in base:
            p.requires_grad_(not switched)
        for p in lora:
            p.requires_grad_(switched)
        if switched:
            optimizer_state = state.optimizers[self.optimizer_name].state
            for p in base:  # the full-rank moments are what ReLoRA saves memory on
                optimizer_state.pop(p, None)
            self.run.base_dir = state.output_dir / "warm_base"

    def on_train_begin(self, state, control) -> None:
        if self.switch_step >= state.max_steps:
            raise ConfigError(f"peft.full_rank_warmup_steps={self.switch_step} leaves no ReLoRA step (the run has "
                              f"{state.max_steps} steps)")
        switched = state.global_step >= self.switch_step
        if switched and not (state.output_dir / "warm_base").is_dir():
            raise FileNotFoundError(f"{state.output_dir / 'warm_base'} (the base after the full-rank warm start, "
                                    "written at the switch) is missing: the run cannot resume after the switch")
        self._set_phase(state, switched)
        if not switched:
            logger.info("ReLoRA full-rank warm start: the base model trains full-rank for %d steps", self.switch_step)

    def on_step_end(self, state, control) -> None:
        if state.global_step != self.switch_step:
            return
        if state.is_main_process:
            # A copy without the adapter: B = 0 here, so the base layers alone compute what the model computes, and
            # unload() puts the trained copies of modules_to_save in place of the originals.
            plain = copy.deepcopy(state.models[self.run.model_name]).unload()
            self.run.write_base(plain, state.output_dir / "warm_base")
        state.accelerator.wait_for_everyone()
        self._set_phase(state, switched=True)
        model = state.models[self.run.model_name]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("ReLoRA full-rank warm start done at step %d: %d parameters train from now on", self.switch_step,
                    trainable)
        state.log({"relora/switch_to_low_rank": 1, "relora/trainable": trainable})
