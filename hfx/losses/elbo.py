"""The variational autoencoder's objective (Kingma & Welling 2014; beta-VAE, Higgins et al. 2017; KL
warm-up, Bowman et al. 2016), in nats, per example.

    -ELBO(x) = E_q[-log p(x | z)] + KL(q(z | x) || N(0, I))        loss = reconstruction + beta * w(step) * KL
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag(exp(logvar))) || N(0, I)) in closed form, summed over all but the first dimension.

    Args:
        mean, logvar: (B, ...) posterior parameters.

    Returns:
        (B,) nats.
    """
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """-log N(x; mean, std^2 I), summed over all but the first dimension: a scaled squared error plus the
    normaliser. (B, ...) inputs, (B,) nats."""
    nll = 0.5 * ((x - mean) / std).pow(2) + math.log(std) + 0.5 * math.log(2 * math.pi)
    return nll.flatten(1).sum(1)


def bernoulli_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log Bernoulli(target; sigmoid(logits)) with targets in [0, 1] (continuous Bernoulli without its
    normaliser, as most VAE code), summed over all but the first dimension: (B,) nats."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)


def kl_warmup_weight(step: int, warmup_steps: int) -> float:
    """The KL warm-up factor ``min(1, step / warmup_steps)`` after ``step`` optimizer steps (1 without warm-up)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)


def beta_elbo(reconstruction: torch.Tensor, kl: torch.Tensor, beta: float = 1.0, kl_weight: float = 1.0) -> torch.Tensor:
    """The training loss ``reconstruction + beta * kl_weight * kl`` (the negative ELBO at beta = kl_weight = 1)."""
    return reconstruction + beta * kl_weight * kl
