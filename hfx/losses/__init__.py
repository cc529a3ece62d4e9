"""Losses as pure functions of tensors (a leaf: torch only), for the tasks and for anyone's own loop.

- :mod:`~hfx.losses.elbo`: the VAE's evidence lower bound: the closed-form KL of a diagonal Gaussian to
  N(0, I), Gaussian and Bernoulli reconstruction likelihoods, beta and KL warm-up.
- :mod:`~hfx.losses.diffusion`: the DDPM forward process (noising at random timesteps), the regression
  target of each prediction type, the denoising loss.

Each takes and returns tensors with the shapes its docstring gives; nothing here holds state or reads a
config. The adversarial, gradient-penalty, cycle, InfoNCE and distillation losses will land here too.
"""

from hfx.losses.diffusion import denoising_loss, noised, prediction_target
from hfx.losses.elbo import (
    bernoulli_nll,
    beta_elbo,
    gaussian_kl_to_standard_normal,
    gaussian_nll,
    kl_warmup_weight,
)

__all__ = ["bernoulli_nll", "beta_elbo", "denoising_loss", "gaussian_kl_to_standard_normal", "gaussian_nll",
           "kl_warmup_weight", "noised", "prediction_target"]
