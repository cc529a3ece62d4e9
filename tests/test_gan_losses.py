"""The adversarial losses against hand computations; WGAN-GP's penalty takes the gradient norm per sample over
all of C, H, W (the per-pixel norm some copies take is a different number); R1, clipping, cycle and identity."""

from __future__ import annotations

import math

import pytest
import torch

from hfx.losses import (
    GAN_LOSSES,
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

REAL, FAKE = [2.0, -1.0], [0.5, -3.0]


def softplus(t: float) -> float:
    return math.log1p(math.exp(t))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


HAND = {  # name -> (D loss, G loss), written out from the papers' formulas
    "minimax": (mean(-math.log(1 / (1 + math.exp(-r))) for r in REAL) + mean(-math.log(1 - 1 / (1 + math.exp(-f))) for f in FAKE),
                mean(math.log(1 - 1 / (1 + math.exp(-f))) for f in FAKE)),
    "non_saturating": (mean(softplus(-r) for r in REAL) + mean(softplus(f) for f in FAKE),
                       mean(-math.log(1 / (1 + math.exp(-f))) for f in FAKE)),
    "lsgan": (0.5 * mean((r - 1) ** 2 for r in REAL) + 0.5 * mean(f ** 2 for f in FAKE), mean((f - 1) ** 2 for f in FAKE)),
    "hinge": (mean(max(0.0, 1 - r) for r in REAL) + mean(max(0.0, 1 + f) for f in FAKE), -mean(FAKE)),
    "wgan": (mean(FAKE) - mean(REAL), -mean(FAKE)),
}


@pytest.mark.parametrize("name", HAND)
def test_each_loss_of_the_table_equals_its_hand_computation(name):
    d_loss, g_loss = GAN_LOSSES[name]
    real, fake = torch.tensor(REAL, dtype=torch.float64), torch.tensor(FAKE, dtype=torch.float64)
    assert float(d_loss(real, fake)) == pytest.approx(HAND[name][0], rel=1e-12)
    assert float(g_loss(fake)) == pytest.approx(HAND[name][1], rel=1e-12)


def test_the_table_names_its_functions():
    assert set(GAN_LOSSES) == {"minimax", "non_saturating", "lsgan", "hinge", "wgan"}
    assert GAN_LOSSES["non_saturating"] == (minimax_d_loss, non_saturating_g_loss)
    assert GAN_LOSSES["minimax"].g_loss is minimax_g_loss
    assert GAN_LOSSES["lsgan"] == (lsgan_d_loss, lsgan_g_loss)
    assert GAN_LOSSES["hinge"] == (hinge_d_loss, wasserstein_g_loss)
    assert GAN_LOSSES["wgan"] == (wasserstein_d_loss, wasserstein_g_loss)


def test_the_minimax_generator_loss_saturates_where_the_non_saturating_one_does_not():
    """A discriminator that rejects the fakes confidently (score -8) leaves the minimax G almost no gradient."""
    grads = {}
    for name, g_loss in (("minimax", minimax_g_loss), ("non_saturating", non_saturating_g_loss)):
        fake = torch.tensor([-8.0], requires_grad=True)
        g_loss(fake).backward()
        grads[name] = abs(float(fake.grad))
    assert grads["minimax"] < 1e-3 and grads["non_saturating"] > 0.99


def test_losses_average_patch_maps_like_vectors():
    real, fake = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert torch.allclose(lsgan_d_loss(real, fake), lsgan_d_loss(real.flatten(), fake.flatten()))


# ---------------------------------------------------------------------------------------------- WGAN-GP
def test_gradient_penalty_of_a_linear_critic_is_the_norm_of_its_whole_weight():
    """D(x) = <w, x> over C, H, W has gradient w at every point: the penalty is (||w|| - 1)^2, here ||w|| = 3.
    The per-pixel mistake (norm over channels only, then the mean over pixels) gives another number."""
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4, dtype=torch.float64)
    w = 3 * w / w.norm()
    real, fake = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)

    def critic(x):
        return (x * w).flatten(1).sum(1)

    assert float(gradient_penalty(critic, real, fake).detach()) == pytest.approx((3.0 - 1.0) ** 2, rel=1e-12)
    per_pixel = float(((w.norm(2, dim=0) - 1) ** 2).mean())  # ||grad||_2 over C, per (h, w), then averaged
    assert abs(per_pixel - 4.0) > 0.5


def test_gradient_penalty_of_a_quadratic_critic_matches_a_hand_computation_per_sample():
    """D(x) = 1/2 ||x||^2 has gradient x: at x_hat_i = eps_i real_i + (1 - eps_i) fake_i the penalty is
    mean_i (||x_hat_i|| - 1)^2, computed here with plain Python over every C, H, W entry."""
    torch.manual_seed(1)
    real, fake = torch.randn(2, 2, 3, 3, dtype=torch.float64), torch.randn(2, 2, 3, 3, dtype=torch.float64)
    eps = torch.tensor([0.25, 0.75], dtype=torch.float64)
    by_hand = []
    for i in range(2):
        entries = [float(eps[i] * r + (1 - eps[i]) * f) for r, f in zip(real[i].flatten(), fake[i].flatten())]
        by_hand.append((math.sqrt(sum(e * e for e in entries)) - 1) ** 2)
    penalty = gradient_penalty(lambda x: 0.5 * x.pow(2).flatten(1).sum(1), real, fake, epsilon=eps)
    assert float(penalty.detach()) == pytest.approx(mean(by_hand), rel=1e-12)
    x_hat = interpolates(real, fake, eps)
    assert torch.allclose(x_hat[1], 0.75 * real[1] + 0.25 * fake[1])


def test_gradient_penalty_trains_the_critic_and_draws_one_epsilon_per_sample():
    torch.manual_seed(0)
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    real, fake = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    penalty = gradient_penalty(lambda x: critic(x).squeeze(1), real, fake, generator=torch.Generator().manual_seed(0))
    penalty.backward()
    # every weight matrix gets a gradient (the last bias cannot: it does not move grad_x D)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters() if p.ndim == 2)
    x_hat = interpolates(real, fake, generator=torch.Generator().manual_seed(0))
    eps = ((x_hat - fake) / (real - fake)).flatten(1)  # the same weight for every entry of a sample
    assert torch.allclose(eps, eps[:, :1].expand_as(eps), atol=1e-5) and eps[:, 0].unique().numel() == 4
    with pytest.raises(ValueError, match=r"real and fake must have one shape"):
        interpolates(real, fake[:2])


def test_r1_is_the_squared_gradient_norm_on_real_images_per_sample():
    real = torch.randn(3, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    scores = 0.5 * real.pow(2).flatten(1).sum(1)  # gradient x: R1 = mean_i ||x_i||^2
    expected = mean(float(real[i].detach().pow(2).sum()) for i in range(3))
    assert float(r1_penalty(scores, real).detach()) == pytest.approx(expected, rel=1e-12)


def test_weight_clipping_clamps_every_parameter_in_place():
    torch.manual_seed(0)
    critic = torch.nn.Linear(10, 10)
    clip_weights_(critic, 0.01)
    assert all(p.abs().max() <= 0.01 for p in critic.parameters())
    with pytest.raises(ValueError, match=r"^clip_value must be > 0, got 0$"):
        clip_weights_(critic, 0)


def test_cycle_and_identity_losses_are_mean_absolute_errors():
    a, b = torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([[0.0, 1.0], [0.5, 2.0]])
    assert float(cycle_consistency_loss(a, b)) == pytest.approx((1 + 3 + 0 + 2) / 4)
    assert float(identity_loss(a, b)) == pytest.approx(1.5)
