"""The ReLoRA restart, as plain functions any training loop can call.

A restart, done between two optimizer steps where the jagged schedule puts the learning rate at 0:

1. merge every ReLoRA layer's update into its base weight and re-initialise it (A kaiming-uniform, B = 0),
   which leaves the model's function unchanged (:meth:`ReLoraLinear.merge_and_reinit`);
2. prune the optimizer state of the LoRA parameters only, in place (:func:`prune_optimizer_state`); with an
   optimizer that keeps no per-entry state (SGD without momentum) there is nothing to prune.

Everything happens in place: the optimizer keeps its parameter objects and state tensors, so a GradScaler,
DDP and Accelerate's wrappers stay valid. Random choices come from generators seeded with
``(restart_seed, step)``: every data-parallel rank makes the same choices without communicating, and
since the ranks hold the same weights and optimizer state, they end the restart identical.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from hfx.peft._validation import check_choice, check_int, check_real
from hfx.peft.relora.config import PRUNE_METHODS, ReLoraConfig
from hfx.peft.relora.layer import ReLoraLinear, named_relora_layers
from hfx.peft.relora.model import active_adapter_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReLoraRestartStats:
    """What one restart did: ``layers`` merged, ``pruned_entries`` of ``state_entries`` optimizer-state
    entries (per moment tensor, counted once per parameter entry) of the LoRA parameters zeroed."""

    step: int
    layers: int
    pruned_entries: int
    state_entries: int

    @property
    def pruned_fraction(self) -> float:
        return self.pruned_entries / max(self.state_entries, 1)


def _unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    # DDP / FSDP-style wrappers keep the real model in `.module`
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    # Accelerate's AcceleratedOptimizer (also what transformers' Trainer holds) keeps the real one in `.optimizer`
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) % (2**63))
    return generator


def relora_config_of(model: torch.nn.Module, adapter_name: str | None = None) -> tuple[str, ReLoraConfig]:
    """The ``(adapter name, ReLoraConfig)`` of a model wrapped by ``get_peft_model`` (optionally inside DDP).

    Raises:
        ValueError: the model has no ReLoRA adapter of that name.
    """
    model = _unwrap_model(model)
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name is None:
        adapter_name = active_adapter_name(model)
    config = configs.get(adapter_name)
    if not isinstance(config, ReLoraConfig):
        found = {name: type(c).__name__ for name, c in configs.items()}
        raise ValueError(f"model has no ReLoRA adapter {adapter_name!r} (its PEFT configs: {found})")
    return adapter_name, config


def relora_layers(model: torch.nn.Module, adapter_name: str) -> list[ReLoraLinear]:
    """Every ReLoRA layer of ``model`` (optionally inside DDP) that holds ``adapter_name``, in module order."""
    return [layer for _, layer in named_relora_layers(_unwrap_model(model), adapter_name)]


def _prune_mask(param, state: dict, method: str, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """Boolean mask (shape of ``param``) of the entries whose optimizer state is zeroed."""
    if method == "reset":
        return torch.ones_like(param, dtype=torch.bool)
    numel = param.numel()
    k = round(ratio * numel)
    flat = torch.zeros(numel, dtype=torch.bool, device=param.device)
    if method == "random":
        flat[torch.randperm(numel, generator=generator, device=param.device)[:k]] = True
    else:
        # Magnitude of the second moment where the optimizer keeps one (Adam's exp_avg_sq): pruning both moments
        # where it is small never leaves an entry with a kept first moment and a zeroed second moment.
        score = state.get("exp_avg_sq")
        if score is None:
            score = next(t for t in state.values() if torch.is_tensor(t) and t.shape == param.shape)
        flat[torch.topk(score.detach().abs().flatten().float(), k, largest=False).indices] = True
    return flat.view(param.shape)


def _check_pruning(method, ratio, where: str = "") -> tuple[str, float]:
    method = check_choice(f"{where}prune_method", method, PRUNE_METHODS)
    ratio = check_real(f"{where}prune_ratio", ratio, low=0.0, high=1.0)
    return method, ratio


def _plan_pruning(optimizer, params, method: str, ratio: float, generator_for) -> list[tuple[list, torch.Tensor]]:
    """``(state tensors, mask)`` for every parameter in ``params`` with per-entry optimizer state; changes nothing.
    ``generator_for(device)`` gives the random source of ``"random"`` pruning."""
    optimizer = _unwrap_optimizer(optimizer)
    plan = []
    for param in params:
        state = optimizer.state.get(param)
        if not state:
            continue
        moments = [t for t in state.values() if torch.is_tensor(t) and t.is_floating_point() and t.shape == param.shape]
        if moments:
            plan.append((moments, _prune_mask(param, state, method, ratio, generator_for(param.device))))
    return plan


def _apply_pruning(plan) -> tuple[int, int]:
    zeroed = total = 0
    for moments, mask in plan:
        for moment in moments:
            moment.masked_fill_(mask, 0)
        zeroed += int(mask.sum())
        total += mask.numel()
    return zeroed, total


@torch.no_grad()
def prune_optimizer_state(
    optimizer,
    params: Iterable[torch.nn.Parameter],
    *,
    method: str,
    ratio: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Zero part of the optimizer state of ``params``, in place, with ONE mask per parameter applied to all of
    its state tensors of the parameter's shape (Adam's ``exp_avg`` and ``exp_avg_sq``, SGD's
    ``momentum_buffer``, ...). Scalars such as Adam's ``step`` are left alone. Other parameters are untouched.
    Every mask is drawn before any state changes, so an error leaves the optimizer as it was.

    Args:
        optimizer: a ``torch.optim.Optimizer`` or a wrapper with ``.optimizer`` (Accelerate's).
        params: the parameters whose state is pruned.
        method: ``"reset"`` (all entries), ``"random"`` (a random ``ratio`` of them, drawn from
            ``generator``) or ``"magnitude"`` (the ``ratio`` with the smallest second moment).
        ratio: fraction of each parameter's entries to zero (``round(ratio * numel)`` exactly), in [0, 1].
        generator: random source for ``"random"``, on the parameters' device.

    Returns:
        ``(zeroed, total)``: entries zeroed and entries that had state, summed over the parameters
        (``(0, 0)`` for an optimizer that keeps no per-entry state, e.g. SGD without momentum).

    Raises:
        ValueError: an unknown ``method`` or a ``ratio`` outside [0, 1] (NaN included).
        TypeError: a ``ratio`` that is not a number, or a ``generator`` that is not a ``torch.Generator``.
    """
    method, ratio = _check_pruning(method, ratio)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator={generator!r} must be a torch.Generator or None")
    return _apply_pruning(_plan_pruning(optimizer, list(params), method, ratio, lambda device: generator))


@torch.no_grad()
def relora_restart(
    model: torch.nn.Module,
    optimizer,
    *,
    step: int,
    adapter_name: str | None = None,
    prune_method: str | None = None,
    prune_ratio: float | None = None,
) -> ReLoraRestartStats:
    """One ReLoRA restart of every ReLoRA layer of ``model`` and the optimizer state of their LoRA factors.

    Call it after the optimizer step that completes ``step`` steps (the jagged schedule's LR is 0 for the next
    one), on every data-parallel rank. Everything is checked, and every pruning mask drawn, before the first
    change, so an error leaves the model and the optimizer as they were.

    An optimizer that keeps no per-entry state for the LoRA factors (SGD without momentum, what
    ``transformers.Trainer(optim="sgd")`` builds, or any optimizer before its first step) is allowed: the
    restart then merges and re-initialises, and pruning has nothing to do (``state_entries == 0``).

    Args:
        model: the ``PeftModel`` (or its tuner, or either inside DDP) holding a ReLoRA adapter.
        optimizer: the optimizer training the LoRA factors (or Accelerate's wrapper of it).
        step: the number of optimizer steps done (an integer >= 0); with the config's ``restart_seed`` it
            seeds A's re-initialisation and random pruning, identically on every rank.
        adapter_name: the ReLoRA adapter (default: the active one).
        prune_method, prune_ratio: override the config's (same allowed values).

    Returns:
        What was done; also logged at INFO.

    Raises:
        ValueError: no ReLoRA adapter or layer, a bad ``step`` / ``prune_method`` / ``prune_ratio``, or a
            ratio that rounds to zero entries in every tensor that has optimizer state.
        RuntimeError: the optimizer holds none of the LoRA factors, the adapter is merged
            (``merge_adapter()``), or a LoRA factor holds NaN or infinite values (naming the layer).
    """
    step = check_int("step", step, minimum=0)
    adapter_name, config = relora_config_of(model, adapter_name)
    prune_method = config.prune_method if prune_method is None else prune_method
    if prune_method == "reset":
        prune_ratio = 1.0
    prune_method, prune_ratio = _check_pruning(prune_method, config.prune_ratio if prune_ratio is None else prune_ratio)
    named_layers = named_relora_layers(_unwrap_model(model), adapter_name)
    if not named_layers:
        raise ValueError(f"model has no ReLoRA layer holding adapter {adapter_name!r}")
    layers = [layer for _, layer in named_layers]

    lora_params = [p for layer in layers for p in (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight)]
    held = {id(p) for group in _unwrap_optimizer(optimizer).param_groups for p in group["params"]}
    if not any(id(p) in held for p in lora_params):
        raise RuntimeError(
            "the optimizer holds none of the ReLoRA parameters: build it after get_peft_model(), from the "
            "wrapped model's parameters"
        )
    for name, layer in named_layers:
        try:
            layer.check_restart(adapter_name)
        except RuntimeError as err:
            raise RuntimeError(f"ReLoRA restart at step {step} refused, nothing changed: layer {name!r}: {err}") from None

    generators: dict[torch.device, torch.Generator] = {}

    def generator_for(device: torch.device) -> torch.Generator:
        if device not in generators:
            generators[device] = _generator(config.restart_seed, step, device)
        return generators[device]

    # Pruning reads the state of the parameters as trained; merging does not touch the optimizer state.
    plan = _plan_pruning(optimizer, lora_params, prune_method, prune_ratio, generator_for)
    if plan and not any(mask.any() for _, mask in plan):
        smallest = min(mask.numel() for _, mask in plan)
        raise ValueError(
            f"prune_ratio={prune_ratio} rounds to zero entries in every LoRA factor with optimizer state (the "
            f"smallest has {smallest} entries): ReLoRA restart at step {step} would prune nothing; nothing changed"
        )

    zeroed, total = _apply_pruning(plan)
    for layer in layers:
        layer.merge_and_reinit(adapter_name, generator=generator_for(layer.lora_A[adapter_name].weight.device))

    stats = ReLoraRestartStats(step=step, layers=len(layers), pruned_entries=zeroed, state_entries=total)
    if total:
        logger.info(
            "ReLoRA restart at step %d: merged %d layers, zeroed %.1f%% of the LoRA optimizer state (%s)",
            step, stats.layers, 100 * stats.pruned_fraction, prune_method,
        )
    else:
        logger.info(
            "ReLoRA restart at step %d: merged %d layers; the optimizer keeps no per-entry state for the LoRA "
            "factors (e.g. SGD without momentum), so there was nothing to prune", step, stats.layers,
        )
    return stats
