"""ReLoRA for ``transformers.Trainer``: a callback that restarts at the right steps and gives the Trainer's
learning-rate scheduler the jagged cosine shape."""

from __future__ import annotations

import logging

from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback

from hfx.peft.relora.restart import ReLoraRestartStats, relora_config_of, relora_restart
from hfx.peft.relora.schedule import JaggedCosineMultiplier, is_restart_step, relora_multiplier

logger = logging.getLogger(__name__)


class ReLoraCallback(TrainerCallback):
    """Runs ReLoRA inside a plain ``transformers.Trainer`` training a ``get_peft_model(model, ReLoraConfig(...))``.

    - At the start of training it makes the Trainer's ``LambdaLR`` (what every ``lr_scheduler_type`` except
      ``reduce_lr_on_plateau`` builds) follow the jagged cosine schedule of the adapter's config, over the
      Trainer's ``max_steps``; a scheduler built by :func:`hfx.peft.get_jagged_cosine_schedule` and passed
      through ``Trainer(optimizers=...)`` is kept as it is. ``TrainingArguments.warmup_steps`` is then unused:
      the config's ``warmup_steps`` applies.
    - After each optimizer step that completes a multiple of ``relora_steps`` it calls
      :func:`hfx.peft.relora_restart` with the Trainer's optimizer, before the Trainer saves a checkpoint of
      that step, so checkpoints hold the merged history and resume exactly.

    Restarts are recorded in ``self.restarts`` (:class:`ReLoraRestartStats`) and logged. Any optimizer works,
    also one without per-entry state (``optim="sgd"``: a restart then merges and re-initialises only).

    Args:
        adapter_name: the ReLoRA adapter (default: the model's active adapter).
    """

    def __init__(self, adapter_name: str | None = None):
        if adapter_name is not None and not isinstance(adapter_name, str):
            raise TypeError(f"ReLoraCallback(adapter_name={adapter_name!r}) must be an adapter name (str) or None")
        self.adapter_name = adapter_name
        self.restarts: list[ReLoraRestartStats] = []

    def on_train_begin(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        _, config = relora_config_of(model, self.adapter_name)
        if config.full_rank_warmup_steps:
            raise ValueError(
                f"ReLoraConfig.full_rank_warmup_steps={config.full_rank_warmup_steps} is not supported by "
                "ReLoraCallback: train the base full-rank first (a plain Trainer run), then wrap it with get_peft_model"
            )
        if not isinstance(lr_scheduler, LambdaLR):
            raise ValueError(
                f"ReLoraCallback needs a LambdaLR learning-rate scheduler, got {type(lr_scheduler).__name__}: use an "
                "lr_scheduler_type other than reduce_lr_on_plateau, or pass hfx.peft.get_jagged_cosine_schedule(...)"
            )
        if all(isinstance(f, JaggedCosineMultiplier) for f in lr_scheduler.lr_lambdas):
            return
        multiplier = relora_multiplier(config, num_training_steps=state.max_steps)  # no warm start: refused above
        lr_scheduler.lr_lambdas = [multiplier] * len(lr_scheduler.optimizer.param_groups)
        # The Trainer already applied its own multiplier for the current step (0, or the resumed step).
        step = lr_scheduler.last_epoch
        for group, base_lr in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs):
            group["lr"] = base_lr * multiplier(step)
        lr_scheduler._last_lr = [group["lr"] for group in lr_scheduler.optimizer.param_groups]
        logger.info("ReLoRA: the Trainer's scheduler now follows the jagged cosine schedule over %d steps", state.max_steps)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        _, config = relora_config_of(model, self.adapter_name)
        if is_restart_step(state.global_step, relora_steps=config.relora_steps) and state.global_step < state.max_steps:
            self.restarts.append(relora_restart(model, optimizer, step=state.global_step, adapter_name=self.adapter_name))
