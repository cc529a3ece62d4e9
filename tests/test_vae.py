"""HfxVAEModel: the ELBO's terms, the reparameterisation, the autoencoder mode, conditioning, save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModel

import hfx  # noqa: F401  (registers hfx_vae with AutoModel)
from hfx.models.vae import DiagonalGaussian, HfxVAEConfig, HfxVAEModel


def tiny(**overrides) -> HfxVAEModel:
    torch.manual_seed(0)
    options = dict(image_size=8, block_out_channels=[8, 16], latent_channels=2, norm_num_groups=4)
    options.update(overrides)
    return HfxVAEModel(HfxVAEConfig(**options))


def images(n=4, side=8, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, side, side, generator=g) * 2 - 1


def test_kl_equals_closed_form_of_torch_distributions():
    mean = torch.tensor([[[[0.5]], [[-1.0]]], [[[0.0]], [[2.0]]]])  # (2, 2, 1, 1)
    logvar = torch.tensor([[[[0.2]], [[-0.7]]], [[[0.0]], [[1.5]]]])
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    ).flatten(1).sum(1)
    torch.testing.assert_close(DiagonalGaussian(mean, logvar).kl(), expected, rtol=1e-6, atol=1e-7)
    assert DiagonalGaussian(torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)).kl().item() == 0.0


def test_reconstruction_terms_equal_independent_likelihoods():
    x = images()
    for kind in ("gaussian", "bernoulli"):
        model = tiny(reconstruction_loss=kind, gaussian_std=0.25)
        decoded = torch.randn_like(x)
        if kind == "gaussian":
            ref = -torch.distributions.Normal(decoded, 0.25).log_prob(x).flatten(1).sum(1)
        else:
            ref = -torch.distributions.Bernoulli(logits=decoded, validate_args=False).log_prob((x + 1) / 2).flatten(1).sum(1)
        torch.testing.assert_close(model.reconstruction_nll(decoded, x), ref, rtol=1e-5, atol=1e-4)


def test_loss_is_reconstruction_plus_beta_kl_and_gradients_flow_through_the_sample():
    model = tiny(beta=0.5)
    out = model(images(), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.loss, out.reconstruction + 0.5 * out.kl)
    torch.testing.assert_close(out.neg_elbo, out.reconstruction + out.kl)
    out.loss.backward()
    # The encoder's last conv makes both mean and log-variance: its gradient proves the sample is
    # differentiable in both halves (the log-variance half only gets gradient through std * eps and KL).
    grad = model.encoder.conv_out.weight.grad
    latent = model.config.latent_channels
    assert grad[:latent].abs().sum() > 0 and grad[latent:].abs().sum() > 0
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0


def test_beta_zero_is_a_deterministic_autoencoder():
    model = tiny(beta=0.0)
    x = images()
    a, b = model(x), model(x)
    torch.testing.assert_close(a.reconstruction_images, b.reconstruction_images, rtol=0, atol=0)
    torch.testing.assert_close(a.latents, model.encode(x).latent_dist.mean, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, a.reconstruction)
    stochastic = tiny(beta=1.0)
    c, d = stochastic(x), stochastic(x)
    assert not torch.equal(c.latents, d.latents)


def test_conditional_vae_uses_labels_and_validates_them():
    model = tiny(num_classes=3)
    x = images(2)
    z = torch.zeros(2, *model.latent_shape)
    assert not torch.allclose(model.decode(z, [0, 0]), model.decode(z, [1, 1]))
    with pytest.raises(ValueError, match="unknown label 3"):
        model(x, labels=[0, 3])
    with pytest.raises(ValueError, match="pass labels"):
        model(x)
    with pytest.raises(ValueError, match="got 1 labels for a batch of 2"):
        model(x, labels=[1])
    with pytest.raises(ValueError, match="unconditional"):
        tiny()(x, labels=[0, 1])


def test_bad_images_and_configs_are_named():
    model = tiny()
    with pytest.raises(ValueError, match="expected 1 channel"):
        model(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 2"):
        model(torch.zeros(2, 1, 7, 7))
    # transformers' strict configs wrap the ValueError; the message still names the field.
    with pytest.raises(StrictDataclassError, match="reconstruction_loss must be 'gaussian' or 'bernoulli', got 'l1'"):
        HfxVAEConfig(reconstruction_loss="l1")
    with pytest.raises(StrictDataclassError, match="image_size=10 is not divisible"):
        HfxVAEConfig(image_size=10, block_out_channels=[8, 8, 8], norm_num_groups=4)


def test_sample_and_interpolate_shapes_and_endpoints():
    model = tiny(num_classes=2)
    g = torch.Generator().manual_seed(0)
    out = model.sample(5, labels=[0, 1, 0, 1, 0], generator=g)
    assert out.shape == (5, 1, 8, 8) and out.min() >= -1 and out.max() <= 1
    x = images(2)
    path = model.interpolate(x[0], x[1], steps=4, labels=1)
    assert path.shape == (4, 1, 8, 8)
    ends = model.decode(model.encode(x, [1, 1]).latent_dist.mean, [1, 1])
    torch.testing.assert_close(path[[0, -1]], ends, rtol=1e-5, atol=1e-5)


def test_latent_arithmetic_decodes_the_combined_means():
    model = tiny()
    a, b, c = images(3, seed=1), images(2, seed=2), images(1, seed=3)
    mean = lambda x: model.encode(x).latent_dist.mean.mean(0, keepdim=True)  # noqa: E731
    expected = model.decode(mean(a) - mean(b) + mean(c))
    torch.testing.assert_close(model.latent_arithmetic(a, b, c), expected)
    # a - a + c is c's reconstruction from its mean
    torch.testing.assert_close(model.latent_arithmetic(a, a, c[0]), model.decode(mean(c)), rtol=1e-5, atol=1e-5)


def test_save_and_load_with_automodel_gives_identical_outputs(tmp_path):
    model = tiny(num_classes=2, reconstruction_loss="bernoulli")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, HfxVAEModel) and loaded.config.reconstruction_loss == "bernoulli"
    x = images(3)
    for m in (model, loaded):
        m.eval()
    a = model(x, labels=[0, 1, 0], generator=torch.Generator().manual_seed(3))
    b = loaded(x, labels=[0, 1, 0], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    torch.testing.assert_close(a.reconstruction_images, b.reconstruction_images, rtol=0, atol=0)


def test_training_on_digits_lowers_the_held_out_negative_elbo():
    from hfx.data import builtin_dataset

    ds = builtin_dataset("digits", image_size=8)

    def tensors(split):
        arr = np.stack([np.asarray(im, dtype=np.float32) for im in ds[split]["image"]]) / 127.5 - 1.0
        return torch.from_numpy(arr)[:, None]

    train, test = tensors("train"), tensors("test")
    model = tiny(block_out_channels=[16, 32], latent_channels=4, norm_num_groups=8, gaussian_std=0.2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def held_out() -> float:
        model.eval()
        with torch.no_grad():
            value = model(test, generator=torch.Generator().manual_seed(0)).neg_elbo.item()
        model.train()
        return value

    before = held_out()
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = train[torch.randint(0, len(train), (64,), generator=g)]
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out()
    assert math.isfinite(after) and after < 0.5 * before, (before, after)
