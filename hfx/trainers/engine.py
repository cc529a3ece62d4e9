"""The one training loop of hfx, under Accelerate.

:meth:`Trainer.fit` runs, for every batch: data, forward, loss, backward, (on the last micro-batch of an
accumulation window) NaN guard, clip, optimizer step, schedule, then callbacks, EMA, log, eval and
checkpoint, in that order, once. A task (``hfx.trainers.tasks``) supplies only its models, data, the loss
of a batch, its evaluation, its state and its artifact; tasks and callbacks see a
:class:`~hfx.trainers.state.RunState`, never the engine. Launch with ``hfx train CONFIG key=value ...`` or
``accelerate launch [--config_file training/accelerate/<setup>.yaml] -m hfx train CONFIG``.

Everything a run writes goes into ``output_dir``: ``config.yaml`` (resolved), ``metrics.jsonl``,
``logs/`` (TensorBoard), ``checkpoint-<step>/``, ``final/`` (the task's ``save_pretrained`` artifact; its
model card is rendered at the end by ``hfx.hub``'s callback, which every run gets) and ``results.json``.

**Resume is exact or refused.** A checkpoint holds models, optimizers, grad scaler and the RNG of every
process (``accelerator.save_state``), schedulers, EMA, the task's state (per process), callback state, the
counters, the unfinished log window, the last evaluation, how many records ``metrics.jsonl`` had, and the
resolved config. A resumed run continues as the uninterrupted one: the sampler is accelerate's seedable
sampler and the loader has its own generator, so no data-side draw shifts the global RNG; ``metrics.jsonl``
is cut back to the checkpoint's records. A checkpoint with a missing or changed file, written by another
number of processes, or a config that differs in a key that changes the training is refused with the
reason (``allow_config_change=true`` resumes anyway and records the changes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hfx._registry import default_train_callbacks
from hfx.trainers import checkpoint as ckpt
from hfx.trainers.callbacks import Callback, build_callbacks
from hfx.trainers.config import TrainConfig, config_changes, dump_yaml, optimizer_config, to_dict
from hfx.trainers.ema import EMA
from hfx.trainers.errors import ConfigError, NonFiniteLossError, ResumeError
from hfx.trainers.freeze import FreezeRun
from hfx.trainers.integrations import PEFT_INTEGRATIONS
from hfx.trainers.peft import apply_peft, log_trainable
from hfx.trainers.recipe import load_config
from hfx.trainers.schedules import build_schedule, is_plateau
from hfx.trainers.state import RunState, TrainerControl
from hfx.trainers.tasks import get_task

logger = logging.getLogger(__name__)

ENGINE_STATE = "engine_state.pt"


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)
    stop_reason: str = "max_steps"
    """``max_steps``, ``early_stopping``, ``callback`` (a callback set ``control.should_training_stop``),
    ``finished`` (``resume_from_checkpoint=latest`` on a run that had finished: nothing was done), ``signal``
    (a checkpoint was saved; exit code 128 + signal)."""
    signal: int | None = None


def train(source: str | Path | dict | TrainConfig, overrides: list[str] | None = None, *,
          callbacks: list[Callback] = ()) -> TrainResult:
    """Train from a recipe (path, shipped recipe name, mapping, or a loaded :class:`TrainConfig`) with
    ``key.sub=value`` overrides (not for a loaded config) and extra callbacks."""
    if isinstance(source, TrainConfig):
        if overrides:
            raise ValueError("overrides apply to a recipe; pass them to load_config, not with a loaded TrainConfig")
        config = source
    else:
        config = load_config(source, overrides)
    return Trainer(config, callbacks).fit()


class Trainer:
    """Runs one training job described by a validated :class:`TrainConfig`.

    After (or during) :meth:`fit`, a caller can inspect ``state`` (the :class:`RunState`), ``models``
    (prepared), ``optimizers`` (accelerate-wrapped; ``.optimizer`` is the torch one), ``schedulers``,
    ``ema``, ``callbacks`` and ``accelerator``. Tasks and callbacks never receive the Trainer.
    """

    def __init__(self, config: TrainConfig, callbacks: list[Callback] = ()):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.state = RunState(output_dir=self.output_dir, config=config)
        self.control = TrainerControl()
        self._extra_callbacks = list(callbacks)
        self._signal: int | None = None
        self._signal_phase = "training"
        self.config_changes: list[str] = []

    @property
    def global_step(self) -> int:
        return self.state.global_step

    def unwrapped(self, name: str) -> torch.nn.Module:
        """The model ``name`` without DDP/FSDP/compile wrappers (the object whose weights are trained)."""
        return self.accelerator.unwrap_model(self.models[name])

    # ================================================================================== the run
    def fit(self) -> TrainResult:
        with self._signal_handlers():
            finished = self._setup()
            if finished is not None:
                return finished
            stop_reason = self._loop()
            if stop_reason != "signal":
                stop_reason = self._finish(stop_reason)
        self.accelerator.end_training()
        if stop_reason == "signal":
            return TrainResult(self.output_dir, None, self.state.global_step, self.last_eval, "signal", self._signal)
        return TrainResult(self.output_dir, self.output_dir / "final", self.state.global_step, self.last_eval, stop_reason)

    def _loop(self) -> str:
        acc, state = self.accelerator, self.state
        # In a log file (no terminal) every refresh is a new line: refresh less often there.
        self._progress = tqdm(total=self.total_steps, initial=state.global_step, desc="train", dynamic_ncols=True,
                              disable=not acc.is_local_main_process, mininterval=0.1 if sys.stderr.isatty() else 10.0)
        self._tick = (time.perf_counter(), state.samples_seen)
        self._run_start = (time.perf_counter(), state.global_step)
        try:
            return self._steps()
        finally:  # also on an error: the bar's last line must not follow the error's
            self._progress.close()

    def _steps(self) -> str:
        acc, state, task = self.accelerator, self.state, self.task
        if self.config.eval.at_start and state.global_step == 0 and self._last_eval_step != 0:
            self._evaluate()
        while state.global_step < self.total_steps:
            for batch in self._epoch_batches():
                state.batches_in_epoch += 1
                with acc.accumulate(*self.models.values()):
                    for phase in task.phases(state):
                        self._forward_backward(batch, phase)
                        if acc.sync_gradients:
                            self._optimizer_step(phase)
                if not acc.sync_gradients:
                    continue
                state.global_step += 1
                state.samples_seen += self.global_batch_size
                stop_reason = self._after_step()
                if stop_reason:
                    return stop_reason
                if state.global_step >= self.total_steps:
                    break
            else:  # the epoch ran out (not a break): the next one starts from its first batch
                state.epoch += 1
                state.batches_in_epoch = 0
        return "max_steps"

    def _forward_backward(self, batch, phase: str) -> None:
        """Forward and loss of one micro-batch under autocast, then backward (scaled for accumulation
        and fp16 by accelerate). Only the parameters of ``phase``'s optimizer require gradients."""
        self.state.phase = phase
        with self._only_trainable(phase):
            with self.accelerator.autocast():
                out = self.task.loss(self._phase_models[phase], batch, self.state)
            loss, extra = out if isinstance(out, tuple) else (out, {})
            self.accelerator.backward(loss)
        window = self._window.setdefault(phase, {})
        loss = loss.detach().float()  # no copy for a float32 loss; bf16 sums would lose precision
        window["loss"] = window["loss"] + loss if "loss" in window else loss
        for key, value in extra.items():
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            window[key] = window[key] + value if key in window else value

    def _optimizer_step(self, phase: str) -> None:
        """The NaN guard, clipping, the step and the schedule of one optimizer, once per window."""
        cfg, acc = self.config.train, self.accelerator
        optimizer, window = self.optimizers[phase], self._window.pop(phase)
        if self.accumulation > 1:  # the window holds sums over its micro-batches: log their means
            window = {key: value / self.accumulation for key, value in window.items()}
        if not self._all_finite(window["loss"]):
            message = (f"loss of {phase!r} is {window['loss'].item()} at step {self.state.global_step + 1}; "
                       "lower optimizer.lr, enable train.max_grad_norm, or set train.nan_policy=skip")
            if cfg.nan_policy == "stop":
                raise NonFiniteLossError(message)
            logger.warning("skipping the optimizer step: %s", message)
            optimizer.zero_grad(set_to_none=True)
            self.state.skipped_steps += 1
            return
        if cfg.max_grad_norm is not None:
            norm = acc.clip_grad_norm_(self._phase_params[phase], cfg.max_grad_norm)
            # FSDP2 returns the total norm as a replicated DTensor; the log window is reduced over processes
            # with plain collectives, which have no DTensor sharding rule: take it as a plain tensor.
            window["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optimizer.step()
        if not optimizer.step_was_skipped and self._per_step_schedule:
            self.schedulers[phase].step()
        optimizer.zero_grad(set_to_none=True)
        logged = self._log_window.setdefault(phase, {})
        for key, value in window.items():
            logged[key] = logged[key] + value if key in logged else value
        logged["_count"] = logged.get("_count", 0) + 1

    def _after_step(self) -> str | None:
        """Everything that follows an optimizer step: callbacks, EMA, log, eval, checkpoint, stop."""
        cfg, state, control = self.config, self.state, self.control
        step = state.global_step
        for callback in self.callbacks:
            callback.on_step_end(state, control)
        if self.ema and step % cfg.ema.update_every == 0:
            for name, ema in self.ema.items():
                ema.update(self.unwrapped(name))
        self._progress.update(1)
        self._report_pace()
        if step % cfg.log.every_steps == 0 or step == self.total_steps:
            self._log_train()
        stop = None
        periodic_eval = cfg.eval.every_steps and step % cfg.eval.every_steps == 0
        if (periodic_eval or control.should_evaluate) and step < self.total_steps:
            if self._evaluate():
                stop = "early_stopping"
        saved = False
        if (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or control.should_save:
            self.save_checkpoint()
            saved = True
        if control.should_training_stop and stop is None:
            stop = "callback"
        control.reset()
        if cfg.checkpoint.on_signal and self._signal_received():
            if not saved:
                self.save_checkpoint()
            return "signal"
        return stop

    def _report_pace(self) -> None:
        """Once, after the first ten steps of this process's run: the step time and the expected duration."""
        start, first_step = self._run_start
        done = self.state.global_step - first_step
        if done != 10 or not self.accelerator.is_main_process:
            return
        per_step = (time.perf_counter() - start) / done
        left = per_step * (self.total_steps - self.state.global_step)
        threads = torch.get_num_threads()
        logger.info("%.3g s a step (%d torch thread%s): about %s for the remaining %d steps", per_step, threads,
                    "" if threads == 1 else "s", _duration(left), self.total_steps - self.state.global_step)

    # ================================================================================== set-up
    def _setup(self) -> TrainResult | None:
        """Prepare the run; returns a result instead when there is nothing to do (a finished run resumed)."""
        from accelerate.utils import set_seed

        cfg = self.config
        self.accumulation = cfg.train.gradient_accumulation_steps
        acc = self.accelerator = self.state.accelerator = _make_accelerator(cfg, self.output_dir)
        if acc.mixed_precision == "fp16" and acc.scaler is None:
            logger.warning("fp16 mixed precision on %s runs in float32 (accelerate has no gradient scaler there); "
                           "use train.mixed_precision=bf16 on the CPU", acc.device.type)
        task = self.task = get_task(cfg.task)(cfg, acc)
        if cfg.resume_from_checkpoint == "latest" and self._finished_before():
            return self._finished_result()
        resume_from = ckpt.resolve_checkpoint(cfg.resume_from_checkpoint, self.output_dir, acc.num_processes)
        saved_state = ckpt.read_state(resume_from) if resume_from is not None else None
        if resume_from is None and cfg.resume_from_checkpoint == "latest":
            self._check_fresh_start()
        if saved_state is not None:
            self._check_resumable(resume_from, saved_state)
        if acc.is_main_process:
            if resume_from is None:  # a new run: nothing of an earlier one may mix into its outputs
                ckpt.clear_previous_run(self.output_dir)
            ckpt.claim_output_dir(self.output_dir)
            (self.output_dir / "config.yaml").write_text(dump_yaml(cfg))
            ckpt.prune(self.output_dir, None)  # .tmp folders of a killed save
        acc.wait_for_everyone()
        self.callbacks = [*task.callbacks(), *build_callbacks(cfg.callbacks), *self._extra_callbacks]
        self.callbacks += default_train_callbacks(self.callbacks)  # the model card writer, unless given

        set_seed(cfg.seed)  # the same initial weights on every process and in every run
        data = task.build_data()  # before any model: a missing dataset fails fast
        models = task.build_models()
        # Wraps a model in place, before the optimizers see its parameters.
        self.peft = apply_peft(cfg, models, acc, self.output_dir, self._save_artifact, task.peft_task_type)
        integration = PEFT_INTEGRATIONS.get(self.peft.method) if self.peft is not None else None
        if integration is not None:
            integration.prepare(self.peft, models[self.peft.model_name], acc.num_processes)
        if self.peft is not None:
            log_trainable(self.peft, models[self.peft.model_name])
        groups = task.optimizer_groups(models)
        self._check_groups(models, groups)
        if integration is not None:
            optimizer = next(name for name, members in groups.items() if self.peft.model_name in members)
            self.callbacks.extend(integration.callbacks(self.peft, optimizer))
        for model in models.values():
            model.train()
        freeze = FreezeRun.select(cfg.freeze, models, acc.num_processes, len(groups))  # `freeze:` fine-tuning schedules
        optimizers = {name: build_optimizer([models[m] for m in members], optimizer_config(cfg, name))
                      for name, members in groups.items()}
        if freeze is not None:
            self.callbacks.append(freeze.after_optimizers())

        train_loader = self._loader(data.train, cfg.train.batch_size, data.collate_fn, shuffle=data.shuffle, drop_last=True)
        eval_loader = None
        if data.eval is not None:
            eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
            eval_loader = self._loader(data.eval, eval_bs, data.collate_fn, shuffle=False, drop_last=False)
        prepared = acc.prepare(*models.values(), *optimizers.values(), train_loader,
                               *([eval_loader] if eval_loader is not None else []))
        n_models, n_opts = len(models), len(optimizers)
        self.models = dict(zip(models, prepared[:n_models]))
        self.optimizers = dict(zip(optimizers, prepared[n_models:n_models + n_opts]))
        self.train_loader = prepared[n_models + n_opts]
        self.eval_loader = prepared[n_models + n_opts + 1] if eval_loader is not None else None
        if len(self.train_loader) < 1:
            raise ConfigError(f"the train split has {len(data.train)} examples, fewer than one batch of "
                              f"train.batch_size={cfg.train.batch_size} per process x {acc.num_processes} process(es)")

        self.global_batch_size = cfg.train.batch_size * acc.num_processes * self.accumulation
        if cfg.train.max_steps is not None:
            self.total_steps = cfg.train.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.train.epochs * len(self.train_loader) / self.accumulation))
        self.state.max_steps = self.total_steps
        self.state.models = {name: self.unwrapped(name) for name in self.models}
        self.state.optimizers = {name: opt.optimizer for name, opt in self.optimizers.items()}
        self.state._log = self._record

        self.schedulers = {name: build_schedule(cfg, opt.optimizer, self.total_steps) for name, opt in self.optimizers.items()}
        self._per_step_schedule = not is_plateau(cfg.scheduler.name)
        self.ema = {}
        if cfg.ema.enabled:
            self.ema = {name: EMA(self.unwrapped(name), cfg.ema.decay, cfg.ema.warmup) for name in task.ema_models(models)}

        # In a phase, the models of that phase's optimizer run wrapped (DDP syncs their gradients); the
        # others run unwrapped with frozen parameters (no DDP hooks waiting for gradients that never come).
        self._phase_models, self._phase_params, self._frozen = {}, {}, {}
        for name, members in groups.items():
            self._phase_models[name] = {m: (self.models[m] if m in members else self.unwrapped(m)) for m in models}
            self._phase_params[name] = [p for m in members for p in self.models[m].parameters()]
            self._frozen[name] = [p for m in models if m not in members for p in self.models[m].parameters()
                                  if p.requires_grad]
        self._window: dict[str, dict[str, Any]] = {}
        self._log_window: dict[str, dict[str, Any]] = {}
        self._window_start_samples = 0
        self._metrics = MetricsLog(self.output_dir / "metrics.jsonl", enabled=acc.is_main_process)
        self.last_eval: dict[str, float] = {}
        self._last_eval_step = -1

        if cfg.log.report_to:
            acc.init_trackers(cfg.log.project_name, config=_flat_hparams(to_dict(cfg)))
        set_seed(cfg.seed, device_specific=True)  # training randomness differs per process
        if resume_from is not None:
            self.load_checkpoint(resume_from, saved_state)
        for callback in self.callbacks:
            callback.on_train_begin(self.state, self.control)
        logger.info("training %s: %d steps, global batch %d (%d process(es) x %d x %d accumulation)",
                    cfg.task, self.total_steps, self.global_batch_size, acc.num_processes, cfg.train.batch_size,
                    self.accumulation)
        return None

    def _finished_before(self) -> bool:
        """Whether ``output_dir`` holds a finished run (``results.json`` and ``final/``) of this same config."""
        import yaml

        if not ((self.output_dir / "results.json").is_file() and (self.output_dir / "final").is_dir()):
            return False
        try:
            saved = yaml.safe_load((self.output_dir / "config.yaml").read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return False
        return isinstance(saved, dict) and not config_changes(saved, to_dict(self.config))

    def _finished_result(self) -> TrainResult:
        """``resume_from_checkpoint=latest`` on a finished run of the same config: nothing to do, nothing written."""
        results = json.loads((self.output_dir / "results.json").read_text())
        logger.info("resume_from_checkpoint=latest: the run in %s finished at step %s; nothing to do", self.output_dir,
                    results.get("step"))
        self.last_eval = {k[5:]: v for k, v in results.items() if k.startswith("eval/")}
        self.state.global_step = int(results.get("step", 0))
        self.accelerator.end_training()
        return TrainResult(self.output_dir, self.output_dir / "final", self.state.global_step, self.last_eval, "finished")

    def _check_fresh_start(self) -> None:
        """``resume_from_checkpoint=latest`` found no complete checkpoint: a folder without a run starts one;
        a folder with one is refused, never silently started over (with ``overwrite_output_dir=true`` too it
        starts over: "resume if you can, else start again")."""
        previous = ckpt.previous_run_files(self.output_dir)
        if not previous:
            logger.info("resume_from_checkpoint=latest: no run in %s yet, starting one", self.output_dir)
        elif self.config.overwrite_output_dir:
            logger.warning("resume_from_checkpoint=latest: no complete checkpoint in %s; overwrite_output_dir=true, "
                           "so the run starts over", self.output_dir)
        else:
            raise ResumeError(f"resume_from_checkpoint=latest: {self.output_dir} holds a run ({', '.join(previous)}) but "
                              "no complete checkpoint to continue it from; set overwrite_output_dir=true to start over")

    def _check_resumable(self, path: Path, saved: dict[str, Any]) -> None:
        """Refuse a resume that could not continue exactly, naming the reason."""
        acc = self.accelerator
        processes = saved.get("num_processes")
        if processes is not None and processes != acc.num_processes:
            raise ResumeError(f"{path} was written by {processes} process(es); this run has {acc.num_processes}: resume "
                              f"it with {processes} (the data order and each process's random state depend on it)")
        config = saved.get("config")
        if config is None:
            logger.warning("%s was written by an earlier hfx and records no config: the config cannot be checked", path)
            return
        if config.get("task") != self.config.task:
            raise ResumeError(f"{path} is a checkpoint of task {config.get('task')!r}, not {self.config.task!r}")
        changes = config_changes(config, to_dict(self.config))
        if changes and not self.config.allow_config_change:
            raise ResumeError(f"resuming {path} with a changed config would not continue the same run ({'; '.join(changes[:4])}"
                              f"{'; ...' if len(changes) > 4 else ''}): restore them, or set allow_config_change=true")
        if changes:
            logger.warning("resuming %s with a changed config (allow_config_change=true): %s", path, "; ".join(changes))
        self.config_changes = changes

    def _save_artifact(self, models: dict[str, torch.nn.Module], folder: Path) -> None:
        """The task's artifact of ``models`` (plain, unwrapped) with their own weights, in ``folder``."""
        self.task.save(models, {name: model.state_dict() for name, model in models.items()}, folder)

    @staticmethod
    def _check_groups(models: dict, groups: dict[str, list[str]]) -> None:
        seen: dict[str, str] = {}
        for name, members in groups.items():
            for member in members:
                if member not in models:
                    raise ValueError(f"optimizer {name!r} lists model {member!r}, which the task did not build "
                                     f"(models: {', '.join(models)})")
                if member in seen:
                    raise ValueError(f"model {member!r} is in optimizers {seen[member]!r} and {name!r}")
                seen[member] = name

    def _loader(self, dataset, batch_size: int, collate_fn, shuffle: bool, drop_last: bool):
        # A private generator: creating an iterator draws a worker seed from it instead of the global RNG,
        # so where an epoch starts does not shift the RNG stream a resumed run must reproduce.
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=collate_fn,
            num_workers=self.config.data.num_workers, generator=torch.Generator().manual_seed(self.config.seed),
        )

    def _epoch_batches(self):
        loader = self.train_loader
        if self.state.batches_in_epoch:
            loader = self.accelerator.skip_first_batches(loader, self.state.batches_in_epoch)
        _set_epoch(loader, self.state.epoch)
        return loader

    @contextlib.contextmanager
    def _only_trainable(self, phase: str):
        frozen = self._frozen[phase]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        if self.accelerator.num_processes == 1:
            return bool(torch.isfinite(loss).item())
        bad = (~torch.isfinite(loss)).float().reshape(1).to(self.accelerator.device)
        return self.accelerator.reduce(bad, "sum").item() == 0  # every process must take the same decision

    # ================================================================================== log and eval
    def _log_train(self) -> None:
        acc, state = self.accelerator, self.state
        now = time.perf_counter()
        elapsed = now - self._tick[0]
        state.train_seconds += elapsed
        record: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
        single = len(self.optimizers) == 1
        for phase, window in sorted(self._log_window.items()):
            count = window.pop("_count")
            for key, total in window.items():
                value = acc.reduce(torch.as_tensor(total, device=acc.device).float().reshape(1), "mean") / count
                record[key if single else f"{key}/{phase}"] = value.item()
        for phase, optimizer in self.optimizers.items():
            lr = optimizer.optimizer.param_groups[0]["lr"]
            record["lr" if single else f"lr/{phase}"] = lr
        record["samples_per_s"] = (state.samples_seen - self._tick[1]) / max(elapsed, 1e-9)
        self._log_window = {}
        self._tick = (time.perf_counter(), state.samples_seen)
        self._record(record)
        shown = {k: f"{v:.4g}" for k, v in record.items() if k.startswith(("loss", "lr", "samples_per_s"))}
        self._progress.set_postfix(shown, refresh=False)

    def _record(self, record: dict[str, Any]) -> None:
        self._metrics.write(record)
        if self.config.log.report_to:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Run the task's evaluation (EMA weights swapped in when ``ema.use_for_eval``), on all processes."""
        if self.eval_loader is None:
            return {}
        for model in self.models.values():
            model.eval()
        with contextlib.ExitStack() as stack:
            if self.config.ema.use_for_eval:
                for name, ema in self.ema.items():
                    stack.enter_context(ema.swapped_into(self.unwrapped(name)))
            metrics = {k: float(v) for k, v in self.task.evaluate(self.models, self.eval_loader, self.state).items()}
        for model in self.models.values():
            model.train()
        return metrics

    def _evaluate(self) -> bool:
        """Evaluate, log, feed plateau schedules and early stopping. Returns True when training should stop."""
        cfg, state = self.config.eval, self.state
        metrics = self.evaluate()
        self.last_eval, self._last_eval_step = metrics, state.global_step
        state.metrics = dict(metrics)
        if metrics:
            self._record({"step": state.global_step, **{f"eval/{k}": v for k, v in metrics.items()}})
            logger.info("step %d: %s", state.global_step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        for callback in self.callbacks:
            callback.on_evaluate(state, self.control, metrics)
        if cfg.metric is None:
            return False
        if cfg.metric not in metrics:
            raise ConfigError(f"eval.metric {cfg.metric!r} is not among the task's metrics: {', '.join(metrics) or 'none'}")
        value = metrics[cfg.metric]
        if not self._per_step_schedule:
            for scheduler in self.schedulers.values():
                scheduler.step(value)
        sign = 1.0 if cfg.mode == "min" else -1.0
        if state.best_metric is None or sign * (state.best_metric - value) > cfg.min_delta:
            state.best_metric, state.evals_without_improvement = value, 0
        else:
            state.evals_without_improvement += 1
        patience = cfg.early_stopping_patience
        if patience is not None and state.evals_without_improvement >= patience:
            logger.info("early stopping at step %d: %s has not improved for %d evaluations (best %.4g)",
                        state.global_step, cfg.metric, patience, state.best_metric)
            return True
        return False

    # ================================================================================== checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` atomically (all processes must call this)."""
        from safetensors.torch import save_file

        acc, step = self.accelerator, self.state.global_step
        tmp = ckpt.temporary_dir(self.output_dir, step)
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # models, optimizers, scaler, RNG of every process
        task_state = self.task.state_dict()
        if task_state is not None:  # every process its own (an image pool differs per process)
            torch.save(task_state, tmp / f"task_state_{acc.process_index}.pt")
        if acc.is_main_process:
            callback_state = {}
            for callback in self.callbacks:
                state = callback.state_dict()
                if state is not None:
                    callback_state[callback.state_key or type(callback).__name__] = state
            now = time.perf_counter()
            self.state.train_seconds += now - self._tick[0]
            self._tick = (now, self._tick[1])
            torch.save({"schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
                        "callbacks": callback_state,
                        "log_window": _plain_window(self._log_window),
                        "log_window_samples": self._tick[1],
                        "last_eval": {"step": self._last_eval_step, "metrics": dict(self.last_eval)}},
                       tmp / ENGINE_STATE)
        if self.ema:  # full tensors, gathered on every process under FSDP (a collective), written by the main one
            flat = {f"{name}/{k}": _full_tensor(v).contiguous() for name, ema in self.ema.items()
                    for k, v in ema.state_dict().items()}
            if acc.is_main_process:
                save_file(flat, tmp / "ema.safetensors")
        acc.wait_for_everyone()
        final = tmp.with_name(f"checkpoint-{step}")
        if acc.is_main_process:
            final = ckpt.commit(tmp, {"counters": self.state.counters(), "num_processes": acc.num_processes,
                                      "task": self.config.task, "metrics_records": self._metrics.records(),
                                      "config": to_dict(self.config)})
            ckpt.prune(self.output_dir, self.config.checkpoint.total_limit)
            logger.info("saved %s", final)
        acc.wait_for_everyone()
        for callback in self.callbacks:
            callback.on_save(self.state, self.control, str(final))
        return final

    def load_checkpoint(self, path: Path, saved: dict[str, Any] | None = None) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; ``metrics.jsonl`` is cut back to the records it had
        then. A file that cannot be read is a :class:`ResumeError` naming the checkpoint."""
        from accelerate.utils.other import load as accelerate_load
        from safetensors.torch import load_file

        acc = self.accelerator
        saved = saved or ckpt.read_state(path)
        rng_file = path / f"random_states_{acc.process_index}.pkl"
        try:
            accelerate_load(rng_file)  # accelerate skips an unreadable random state silently: refuse instead
        except Exception as err:
            raise ResumeError(f"{rng_file} cannot be read ({_first_line(err)}): the resume would not be exact") from None
        try:
            acc.load_state(str(path))
            extra = torch.load(path / ENGINE_STATE, map_location="cpu", weights_only=True)
            for name, scheduler in self.schedulers.items():
                scheduler.load_state_dict(extra["schedulers"][name])
            task_file = path / f"task_state_{acc.process_index}.pt"
            if task_file.is_file():
                self.task.load_state_dict(torch.load(task_file, map_location="cpu", weights_only=True))
            elif self.task.state_dict() is not None:
                raise ResumeError(f"{path} holds no state of task {self.config.task!r} ({task_file.name})")
            if self.ema:
                # (safetensors refuses "cpu:0", the device accelerate's FSDP state names on the CPU)
                device = "cpu" if acc.device.type == "cpu" else str(acc.device)
                flat = load_file(str(path / "ema.safetensors"), device=device)
                for name, ema in self.ema.items():
                    ema.load_state_dict(_like_shadow(ema, {k[len(name) + 1:]: v for k, v in flat.items()
                                                           if k.startswith(name + "/")}))
        except ResumeError:
            raise
        except Exception as err:  # unpicklable, truncated, or weights of another architecture
            raise ResumeError(f"cannot resume from {path}: {_first_line(err)}") from None
        for callback in self.callbacks:
            key = callback.state_key or type(callback).__name__
            if key in extra["callbacks"]:
                callback.load_state_dict(extra["callbacks"][key])
        self.state.load_counters(saved["counters"])
        self._log_window = {phase: {k: (v if k == "_count" else torch.tensor(v)) for k, v in window.items()}
                            for phase, window in extra.get("log_window", {}).items()}
        self._tick = (time.perf_counter(), extra.get("log_window_samples", self.state.samples_seen))
        last = extra.get("last_eval", {"step": -1, "metrics": {}})
        self._last_eval_step, self.last_eval = last["step"], dict(last["metrics"])
        self.state.metrics = dict(self.last_eval)
        records = saved.get("metrics_records")
        if acc.is_main_process:
            self._metrics.restore(records, path.parent / "metrics.jsonl", self.state.global_step)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.global_step,
                    self.state.epoch, self.state.batches_in_epoch)

    # ================================================================================== signals
    @contextlib.contextmanager
    def _signal_handlers(self):
        if not self.config.checkpoint.on_signal or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            if self._signal_phase == "final save":
                logger.warning("received signal %d during the final save: finishing it, then exiting", signum)
            else:
                logger.warning("received signal %d: saving a checkpoint after this step, then exiting", signum)
            self._signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, old in previous.items():
                signal.signal(s, old)

    def _signal_received(self) -> bool:
        if self.accelerator.num_processes == 1:
            return self._signal is not None
        flag = torch.tensor([float(self._signal or 0)], device=self.accelerator.device)
        received = self.accelerator.reduce(flag, "sum").item() > 0
        if received and self._signal is None:
            self._signal = signal.SIGTERM  # another process was signalled
        return received

    # ================================================================================== the end
    def _finish(self, stop_reason: str) -> str:
        """The final evaluation, ``final/``, ``results.json`` and the train-end callbacks. A signal during the
        evaluation stops after it, with a checkpoint of this step (a step-N checkpoint taken before the
        evaluation is kept as it is: the resumed run evaluates again, and ``metrics.jsonl`` holds it once);
        during the save, the save completes."""
        acc, cfg = self.accelerator, self.config
        self.state.train_seconds += time.perf_counter() - self._tick[0]
        self._tick = (time.perf_counter(), self._tick[1])
        if cfg.eval.at_end and self._last_eval_step != self.state.global_step:
            self._evaluate()
        if cfg.checkpoint.on_signal and self._signal_received():
            if not (self.output_dir / f"checkpoint-{self.state.global_step}").is_dir():
                self.save_checkpoint()  # with the final evaluation: the resumed run goes straight to the save
            return "signal"
        self._signal_phase = "final save"
        final = self.output_dir / "final"
        self.save_final(final)
        if acc.is_main_process:
            results = {"step": self.state.global_step, "stop_reason": stop_reason, "train_seconds": self.state.train_seconds,
                       "hardware": _hardware(), "processes": acc.num_processes,
                       "skipped_steps": self.state.skipped_steps, **{f"eval/{k}": v for k, v in self.last_eval.items()},
                       "card_facts": self._card_facts()}
            if self.config_changes:
                results["config_changes_on_resume"] = self.config_changes
            tmp = self.output_dir / "results.json.tmp"
            tmp.write_text(json.dumps(results, indent=2))
            os.replace(tmp, self.output_dir / "results.json")
        for callback in self.callbacks:
            callback.on_train_end(self.state, self.control)
        # Leave together: a process that tears its process group down while the main one still writes the card
        # was seen to abort (gloo, FSDP on the CPU, a loaded machine), and the launcher then kills the main one.
        acc.wait_for_everyone()
        return stop_reason

    def _card_facts(self) -> dict[str, Any]:
        """What the task (and peft) say the model card needs, kept in ``results.json`` for every later render."""
        facts = {"method": self.config.task, **(self.task.card_facts(dict(self.last_eval)) or {})}
        if self.task.hub_task_type:
            facts["task_type"] = self.task.hub_task_type
        if self.peft is not None:
            facts = self.peft.card_facts(facts)
        return facts

    def save_final(self, final: Path) -> None:
        """The task's artifact (EMA weights when ``ema.use_for_final``), written to ``final.tmp`` and renamed."""
        acc = self.accelerator
        with contextlib.ExitStack() as stack:
            if self.config.ema.use_for_final:
                for name, ema in self.ema.items():
                    stack.enter_context(ema.swapped_into(self.unwrapped(name)))
            state_dicts = {name: acc.get_state_dict(model) for name, model in self.models.items()}
            if acc.is_main_process:
                tmp = final.with_name(final.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                unwrapped = {name: self.unwrapped(name) for name in self.models}
                if self.peft is not None:  # final/ holds the adapter (and the base the task saved before training)
                    self.peft.save(unwrapped, state_dicts, tmp)
                    self.task.save_preprocessing(tmp)  # the tokenizer beside the adapter, as peft's examples save it
                else:
                    self.task.save(unwrapped, state_dicts, tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
        acc.wait_for_everyone()


# ====================================================================================== helpers
def _make_accelerator(cfg: TrainConfig, output_dir: Path):
    """The run's Accelerator. Processes started by a launcher (torchrun, ``accelerate launch``) on a machine
    without an accelerator device join one CPU process group (gloo) instead of each training alone; a launcher
    whose world size still differs from the Accelerator's is refused with the fix."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedType,
        GradientAccumulationPlugin,
        ProjectConfiguration,
    )

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = launched > 1 and not _has_accelerator_device()
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and launched > 1 and (cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")):
        # accelerate 1.15 turns an FSDP config into plain DDP (MULTI_CPU) on the CPU: its AcceleratorState takes
        # the FSDP branch only for device types. torch's FSDP2 (fully_shard) runs on a CPU device mesh with gloo,
        # so let the state take that branch: the process group is already the CPU one, and PartialState (whose
        # type accelerate's collectives read) is put back to MULTI_CPU once the Accelerator exists.
        cpu = True
        partial = PartialState(cpu=True)
        if partial.distributed_type == DistributedType.MULTI_CPU:
            partial.distributed_type = DistributedType.MULTI_GPU
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.train.mixed_precision,
        # Every optimizer step sees exactly `accumulation` micro-batches, also across an epoch end.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.train.gradient_accumulation_steps,
                                                                sync_with_dataloader=False),
        # The seedable sampler gives the same order in every run, so resume can skip exactly.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        # Schedules are stepped here, once per optimizer step (accelerate would step them once per process).
        step_scheduler_with_optimizer=False,
        log_with=cfg.log.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    if cpu and fsdp and PartialState().distributed_type == DistributedType.MULTI_GPU:
        PartialState().distributed_type = DistributedType.MULTI_CPU
    if launched != accelerator.num_processes:
        raise ConfigError(f"the launcher started {launched} processes but accelerate set up {accelerator.num_processes} "
                          f"({accelerator.distributed_type}): each would train alone into one output_dir; on a machine "
                          "without GPUs set ACCELERATE_USE_CPU=1, or launch with --num_processes 1")
    # accelerate falls back to plain DDP, silently, when it cannot set up what the launch config asks for
    # (DeepSpeed on CPU processes): refuse rather than train something else than what was asked.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if fsdp and launched > 1 and accelerator.distributed_type != DistributedType.FSDP:
        raise ConfigError(f"the accelerate config asks for FSDP but accelerate set up {accelerator.distributed_type}: "
                          "the run would not be sharded; check the launch config (distributed_type: FSDP)")
    if deepspeed and launched > 1 and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError(f"the accelerate config asks for DeepSpeed but accelerate set up {accelerator.distributed_type} "
                          f"(on {accelerator.device.type} processes accelerate runs no DeepSpeed): launch on GPUs, or use "
                          "training/accelerate/fsdp-cpu.yaml or cpu-ddp.yaml on the CPU")
    return accelerator


def _has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    from accelerate.utils import is_mlu_available, is_npu_available, is_xpu_available

    return is_xpu_available() or is_npu_available() or is_mlu_available()


def build_optimizer(models: list[torch.nn.Module], cfg) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters of ``models``: weight decay on matrices and kernels,
    none on biases and norm weights (tensors of rank < 2)."""
    params = [p for model in models for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the optimizer has no trainable parameters (all requires_grad=False)")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _set_epoch(loader, epoch: int) -> None:
    """Point the loader and its seedable sampler at ``epoch`` (the sampler's order is seed + epoch)."""
    from accelerate.data_loader import SeedableRandomSampler

    loader.set_epoch(epoch)
    node, seen = loader, 0
    while node is not None and seen < 8:  # loader -> batch sampler(s) -> sampler
        if isinstance(node, SeedableRandomSampler):
            node.set_epoch(epoch)
            return
        node = getattr(node, "batch_sampler", None) or getattr(node, "sampler", None)
        seen += 1


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 (DTensor) parameter or shadow, gathered (all processes call this); a plain
    tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _like_shadow(ema: EMA, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (full tensors, as checkpoints hold them) laid out as ``ema``'s shadows: under FSDP2 the shadows
    are sharded DTensors, and each process takes its own shard of the saved tensor (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    out = dict(state)
    for name, shadow in ema.shadow.items():
        key = f"shadow.{name}"
        if hasattr(shadow, "device_mesh") and key in out:
            out[key] = distribute_tensor(out[key].to(shadow.device, shadow.dtype), shadow.device_mesh, shadow.placements,
                                         src_data_rank=None)
    return out


def _plain_window(window: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The log window as floats (what a checkpoint stores; per-process sums, reduced when logged)."""
    return {phase: {k: (v if k == "_count" else float(v)) for k, v in values.items()} for phase, values in window.items()}


def _flat_hparams(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat scalars for trackers (TensorBoard hparams take only numbers and strings)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix + key] = value
        else:
            flat[prefix + key] = str(value)
    return flat


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, written by the main process."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def records(self) -> int:
        """How many complete records the file holds (a torn last line does not count)."""
        if not self.path.exists():
            return 0
        return sum(1 for line in self.path.read_text().split("\n")[:-1] if line)

    def restore(self, records: int | None, source: Path, step: int) -> None:
        """Keep the first ``records`` records (a checkpoint's count; what a killed run logged after it, torn
        lines included, goes), copied from ``source`` when this run logs into another folder. A checkpoint of
        an earlier hfx (no count) keeps the records of steps up to ``step``."""
        origin = source if source.resolve() != self.path.resolve() else self.path
        if not origin.exists():
            return
        lines = [line for line in origin.read_text().split("\n")[:-1] if line]
        if records is None:
            kept = []
            for line in lines:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError):
                    raise ResumeError(f"{origin} has a line that is not a record: {line[:60]!r}") from None
        else:
            if len(lines) < records:
                raise ResumeError(f"{origin} holds {len(lines)} records; the checkpoint was taken after {records}")
            kept = lines[:records]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()}-core {platform.machine()} CPU"
