"""Exponential moving average of a model's weights, for any ``nn.Module`` (diffusers' EMAModel saves only
diffusers models)."""

from __future__ import annotations

import contextlib

import torch


class EMA:
    """Shadow copies of the floating-point parameters and buffers of ``model``:
    ``shadow = decay * shadow + (1 - decay) * weight`` after each :meth:`update`.

    Args:
        model: the (unwrapped) model to average; the shadow lives on the same device, in float32.
        decay: the asymptotic decay.
        warmup: use ``min(decay, (1 + n) / (10 + n))`` after n updates (as diffusers' EMAModel), so the
            average is not dominated by the random initialisation early on.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow = {name: t.detach().clone().float() for name, t in self._tensors(model)}

    @staticmethod
    def _tensors(model: torch.nn.Module):
        for name, tensor in model.state_dict(keep_vars=True).items():
            if torch.is_floating_point(tensor):
                yield name, tensor

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the shadow towards ``model``'s current weights."""
        decay = self.current_decay()
        names, current = zip(*((n, t.detach()) for n, t in self._tensors(model)))
        shadows = [self.shadow[n] for n in names]
        torch._foreach_lerp_(shadows, [c.float() for c in current], 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into ``model``."""
        for name, tensor in self._tensors(model):
            tensor.data.copy_(self.shadow[name])

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module):
        """Run a block (evaluation, saving) with the averaged weights in ``model``, then put the trained
        weights back exactly."""
        backup = {name: t.detach().clone() for name, t in self._tensors(model)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, tensor in self._tensors(model):
                    tensor.data.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors only (saved as safetensors): the shadow weights and the update count."""
        state = {f"shadow.{name}": t for name, t in self.shadow.items()}
        state["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - {k[len("shadow."):] for k in state if k.startswith("shadow.")}
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} tensor(s), e.g. {sorted(missing)[0]!r}")
        for name in self.shadow:
            self.shadow[name].copy_(state[f"shadow.{name}"])
        self.num_updates = int(state["num_updates"])
