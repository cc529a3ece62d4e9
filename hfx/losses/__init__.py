"""Losses as pure functions of tensors (a leaf: torch only), for the tasks and for anyone's own loop.

- :mod:`~hfx.losses.elbo`: the VAE's evidence lower bound: the closed-form KL of a diagonal Gaussian to
  N(0, I), Gaussian and Bernoulli reconstruction likelihoods, beta and KL warm-up.
- :mod:`~hfx.losses.diffusion`: the DDPM forward process (noising at random timesteps), the regression
  target of each prediction type, the denoising loss.
- :mod:`~hfx.losses.gan`: adversarial losses (minimax, non-saturating, LSGAN, hinge, WGAN) by name in
  :data:`GAN_LOSSES`, weight clipping, the WGAN-GP gradient penalty (per-sample norm), R1; CycleGAN's
  cycle and identity losses.
- :mod:`~hfx.losses.contrastive`: CLIP's symmetric InfoNCE with a clamped learnt scale, SimCLR's NT-Xent,
  MoCo's InfoNCE with a queue, DINO's self-distillation loss and center, and the all-gather with local
  gradients that makes them exact under DDP.
- :mod:`~hfx.losses.distillation`: knowledge distillation (T^2-scaled soft targets plus cross-entropy) and
  DeiT's hard distillation (cross-entropy to the teacher's argmax).

Each takes and returns tensors with the shapes its docstring gives; nothing here holds state or reads a
config.
"""

from hfx.losses.contrastive import (
    clip_loss,
    dino_center,
    dino_loss,
    gather_with_local_grad,
    info_nce_loss,
    nt_xent_loss,
)
from hfx.losses.diffusion import denoising_loss, noised, prediction_target
from hfx.losses.distillation import distillation_loss, hard_target_loss, soft_target_loss
from hfx.losses.elbo import (
    bernoulli_nll,
    beta_elbo,
    gaussian_kl_to_standard_normal,
    gaussian_nll,
    kl_warmup_weight,
)
from hfx.losses.gan import (
    GAN_LOSSES,
    GANLoss,
    clip_weights_,
    cycle_consistency_loss,
    gradient_penalty,
    hinge_d_loss,
    identity_loss,
    interpolates,
    lsgan_d_loss,
    lsgan_g_loss,
    minimax_d_loss,
    minimax_g_loss,
    non_saturating_g_loss,
    r1_penalty,
    wasserstein_d_loss,
    wasserstein_g_loss,
)

__all__ = ["GAN_LOSSES", "GANLoss", "bernoulli_nll", "beta_elbo", "clip_loss", "clip_weights_", "cycle_consistency_loss",
           "denoising_loss", "dino_center", "distillation_loss", "dino_loss", "gather_with_local_grad", "gaussian_kl_to_standard_normal", "gaussian_nll", "gradient_penalty", "hard_target_loss", "hinge_d_loss",
           "identity_loss", "info_nce_loss", "interpolates", "kl_warmup_weight", "lsgan_d_loss", "lsgan_g_loss", "minimax_d_loss",
           "minimax_g_loss", "noised", "non_saturating_g_loss", "nt_xent_loss", "prediction_target", "r1_penalty", "soft_target_loss",
           "wasserstein_d_loss", "wasserstein_g_loss"]
