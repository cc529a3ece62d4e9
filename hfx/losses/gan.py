"""Adversarial losses, Lipschitz constraints and the image-to-image consistency losses, as pure functions.

Every discriminator here returns raw, unbounded scores (B,) or (B, ...) (a PatchGAN map): logits for the
minimax / non-saturating losses, critic values for WGAN. Every function averages over all score entries.

    minimax (Goodfellow et al. 2014)   D: -log s(D(x)) - log(1 - s(D(G(z))))    G: log(1 - s(D(G(z))))
    non-saturating (same paper)        D: as minimax                            G: -log s(D(G(z)))
    LSGAN (Mao et al. 2017)            D: 1/2 (D(x) - 1)^2 + 1/2 D(G(z))^2       G: (D(G(z)) - 1)^2
    hinge (Lim & Ye 2017; SNGAN)       D: relu(1 - D(x)) + relu(1 + D(G(z)))     G: -D(G(z))
    WGAN (Arjovsky et al. 2017)        D: D(G(z)) - D(x)                         G: -D(G(z))

``s`` is the sigmoid; ``-log s(t) = softplus(-t)`` and ``-log(1 - s(t)) = softplus(t)`` keep it stable. The
minimax generator loss saturates: when D rejects the fakes confidently its gradient vanishes, which is why
the non-saturating form is the default. The LSGAN generator loss is pytorch-CycleGAN's (an MSE to 1, twice
Mao's 1/2 factor), so that CycleGAN's cycle weight 10 keeps its meaning.

WGAN needs a 1-Lipschitz critic: :func:`clip_weights_` (the original paper), :func:`gradient_penalty`
(Gulrajani et al. 2017: the gradient norm at random interpolates, taken PER SAMPLE over all of C, H, W), or
spectral normalisation (a layer option of the discriminator). :func:`r1_penalty` (Mescheder et al. 2018)
penalises the gradient on real data only.

:data:`GAN_LOSSES` maps each loss name to its ``(d_loss, g_loss)`` pair, so a task picks by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------- the losses
def minimax_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """The discriminator's binary cross-entropy: real -> 1, fake -> 0. Scores are logits; returns a scalar."""
    return F.softplus(-real_scores).mean() + F.softplus(fake_scores).mean()


def minimax_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """The saturating generator loss ``E log(1 - s(D(G(z))))`` = ``-softplus(D(G(z)))`` (minimised)."""
    return -F.softplus(fake_scores).mean()


def non_saturating_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss ``-E log s(D(G(z)))`` = ``softplus(-D(G(z)))``."""
    return F.softplus(-fake_scores).mean()


def lsgan_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Least squares, real -> 1 and fake -> 0, each half weighted 1/2 (Mao et al.; CycleGAN's D loss x 0.5)."""
    return 0.5 * ((real_scores - 1).pow(2).mean() + fake_scores.pow(2).mean())


def lsgan_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """Least squares, fake -> 1: ``E (D(G(z)) - 1)^2`` (pytorch-CycleGAN's ``MSELoss`` to the real label)."""
    return (fake_scores - 1).pow(2).mean()


def hinge_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """``E relu(1 - D(x)) + E relu(1 + D(G(z)))``: no gradient from samples already beyond the margin."""
    return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()


def wasserstein_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """The negated Kantorovich-Rubinstein dual ``E D(G(z)) - E D(x)``: minimising it maximises the estimate of
    W1 (valid only for a 1-Lipschitz critic)."""
    return fake_scores.mean() - real_scores.mean()


def wasserstein_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """``-E D(G(z))``: the generator's side of WGAN, and of the hinge loss."""
    return -fake_scores.mean()


class GANLoss(NamedTuple):
    """A pair of losses: ``d_loss(real_scores, fake_scores)`` and ``g_loss(fake_scores)``, scalars."""

    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    g_loss: Callable[[torch.Tensor], torch.Tensor]


#: Loss name -> (discriminator loss, generator loss). WGAN-GP is ``wgan`` plus :func:`gradient_penalty`.
GAN_LOSSES: dict[str, GANLoss] = {
    "minimax": GANLoss(minimax_d_loss, minimax_g_loss),
    "non_saturating": GANLoss(minimax_d_loss, non_saturating_g_loss),
    "lsgan": GANLoss(lsgan_d_loss, lsgan_g_loss),
    "hinge": GANLoss(hinge_d_loss, wasserstein_g_loss),
    "wgan": GANLoss(wasserstein_d_loss, wasserstein_g_loss),
}


# ---------------------------------------------------------------------------------------------- Lipschitz
@torch.no_grad()
def clip_weights_(module: torch.nn.Module, clip_value: float) -> None:
    """Clamp every parameter of ``module`` to ``[-clip_value, clip_value]`` in place (the original WGAN's
    crude Lipschitz constraint; Arjovsky et al. use 0.01)."""
    if not clip_value > 0:
        raise ValueError(f"clip_value must be > 0, got {clip_value!r}")
    for parameter in module.parameters():
        parameter.clamp_(-clip_value, clip_value)


def interpolates(real: torch.Tensor, fake: torch.Tensor, epsilon: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Points on the lines between paired real and fake images: ``eps * real + (1 - eps) * fake`` with one
    ``eps ~ U[0, 1]`` per sample (shape (B, 1, ..., 1)), or the ``epsilon`` (B,) given. (B, ...) in and out."""
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have one shape, got {tuple(real.shape)} and {tuple(fake.shape)}")
    shape = (real.shape[0],) + (1,) * (real.ndim - 1)
    if epsilon is None:
        epsilon = torch.rand(shape, generator=generator, device=real.device, dtype=real.dtype)
    epsilon = epsilon.reshape(shape).to(real)
    return epsilon * real.detach() + (1 - epsilon) * fake.detach()


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     epsilon: torch.Tensor | None = None, generator: torch.Generator | None = None,
                     target: float = 1.0) -> torch.Tensor:
    """WGAN-GP's penalty ``E (||grad_x D(x_hat)||_2 - target)^2`` at random interpolates ``x_hat``.

    The norm is taken per sample over every non-batch dimension (all of C, H, W): the critic's gradient
    with respect to the whole image. (Taking it over channels only, per pixel, as some copies do, constrains
    something else: see the tests.) The graph is kept (``create_graph``), so the penalty trains the critic.

    Args:
        critic: images (B, C, H, W) -> scores (B,) or (B, ...); for a conditional critic, close over the labels.
        real, fake: (B, C, H, W) images; both are detached.
        epsilon: (B,) interpolation weights; drawn from U[0, 1] (with ``generator``) when None.
        target: the gradient norm aimed at (1 for a 1-Lipschitz critic).

    Returns:
        A scalar; multiply by lambda (10 in the paper).
    """
    x_hat = interpolates(real, fake, epsilon, generator).requires_grad_(True)
    scores = critic(x_hat)
    (grads,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    return (grads.flatten(1).norm(2, dim=1) - target).pow(2).mean()


def r1_penalty(real_scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): ``E ||grad_x D(x)||^2`` on real images, the squared norm per sample over
    C, H, W. ``real`` must require grad and ``real_scores`` be computed from it. Returns a scalar; the usual
    loss term is ``gamma / 2`` times it."""
    (grads,) = torch.autograd.grad(real_scores.sum(), real, create_graph=True)
    return grads.flatten(1).pow(2).sum(1).mean()


# ---------------------------------------------------------------------------------------------- image to image
def cycle_consistency_loss(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """CycleGAN's cycle loss ``E |F(G(x)) - x|_1``: the mean absolute error (weight lambda = 10 there)."""
    return F.l1_loss(reconstructed, original)


def identity_loss(mapped: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """CycleGAN's identity loss ``E |G(y) - y|_1`` for images ``y`` already in G's target domain (weight
    0.5 lambda there): it keeps colours when nothing needs translating."""
    return F.l1_loss(mapped, original)


__all__ = ["GAN_LOSSES", "GANLoss", "clip_weights_", "cycle_consistency_loss", "gradient_penalty", "hinge_d_loss",
           "identity_loss", "interpolates", "lsgan_d_loss", "lsgan_g_loss", "minimax_d_loss", "minimax_g_loss",
           "non_saturating_g_loss", "r1_penalty", "wasserstein_d_loss", "wasserstein_g_loss"]
