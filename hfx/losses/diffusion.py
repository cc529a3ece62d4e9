"""Denoising diffusion training (Ho et al. 2020): noise a clean sample at a random timestep, regress the
network's output on the target of its prediction type, with a diffusers noise scheduler for the schedule.

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps       target: eps (epsilon) | v (v_prediction) | x_0 (sample)
"""

from __future__ import annotations

import torch


def noised(scheduler, x0: torch.Tensor, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw a timestep per example, uniformly in ``[0, num_train_timesteps)``, and noise ``x0`` (B, ...) to
    ``x_t`` with ``scheduler.add_noise``. Returns ``(x_t, t, noise)``; ``generator`` fixes the draws."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    return scheduler.add_noise(x0, noise, t), t, noise


def prediction_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network regresses for the scheduler's ``prediction_type``: the noise (``epsilon``), the
    velocity ``sqrt(a) eps - sqrt(1 - a) x_0`` (``v_prediction``, Salimans & Ho 2022) or ``x_0`` (``sample``)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {kind!r}: expected 'epsilon', 'v_prediction' or 'sample'")


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error in float32 (``reduction="none"`` gives it per example, (B,))."""
    error = (prediction.float() - target.float()).pow(2)
    return error.mean() if reduction == "mean" else error.flatten(1).mean(1)
