"""A convolutional (conditional) variational autoencoder as a transformers ``PreTrainedModel``.

Read top to bottom: the diagonal Gaussian posterior, the residual block, the encoder and decoder, the
pretrained-model base, then :class:`HfxVAEModel` with its loss (the negative ELBO, in nats per image),
``encode``/``decode``, ``sample`` and ``interpolate``. Self-contained: it imports only torch, transformers
and its sibling configuration file, so it can be exported as remote code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_vae import HfxVAEConfig


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(exp(logvar))); tensors of shape (B, C, h, w)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        # The clamp keeps exp() finite early in training without affecting a trained model.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The reparameterised sample mean + std * eps: differentiable in mean and logvar."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) in closed form, summed over latent dimensions: shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (projected) skip connection."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels, groups), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _groups(channels: int, groups: int) -> int:
    # The first block may see channels the configured group count does not divide (image + label map).
    return math.gcd(channels, groups)


class Encoder(nn.Module):
    """Image (B, in_channels [+ label channels], H, W) -> 2 * latent_channels maps at H/f x W/f."""

    def __init__(self, config: HfxVAEConfig, extra_channels: int):
        super().__init__()
        channels = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels + extra_channels, channels[0], 3, padding=1)
        blocks: list[nn.Module] = []
        previous = channels[0]
        for level, width in enumerate(channels):
            for _ in range(config.layers_per_block):
                blocks.append(ResnetBlock(previous, width, config.norm_num_groups))
                previous = width
            if level < len(channels) - 1:
                blocks.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(config.norm_num_groups, previous)
        self.conv_out = nn.Conv2d(previous, 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class Decoder(nn.Module):
    """Latent (B, latent_channels [+ label channels], h, w) -> image parameters (B, in_channels, H, W)."""

    def __init__(self, config: HfxVAEConfig, extra_channels: int):
        super().__init__()
        channels = list(reversed(config.block_out_channels))
        self.conv_in = nn.Conv2d(config.latent_channels + extra_channels, channels[0], 3, padding=1)
        blocks: list[nn.Module] = []
        previous = channels[0]
        for level, width in enumerate(channels):
            for _ in range(config.layers_per_block):
                blocks.append(ResnetBlock(previous, width, config.norm_num_groups))
                previous = width
            if level < len(channels) - 1:
                blocks.extend([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)])
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(config.norm_num_groups, previous)
        self.conv_out = nn.Conv2d(previous, config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))


@dataclass
class HfxVAEEncoderOutput(ModelOutput):
    """``latent_dist``: the posterior q(z | x) as a :class:`DiagonalGaussian`."""

    latent_dist: DiagonalGaussian | None = None


@dataclass
class HfxVAEOutput(ModelOutput):
    """Loss terms, each a scalar averaged over the batch of per-image sums (nats per image).

    - ``loss``: what training minimises, ``reconstruction + beta * kl``.
    - ``reconstruction``: negative log-likelihood of the input under the decoder.
    - ``kl``: KL(q(z|x) || N(0, I)).
    - ``neg_elbo``: ``reconstruction + kl``, the bound on -log p(x) whatever beta is (0 for an autoencoder
      is still reported, but is then no bound the model was trained for).
    - ``reconstruction_images``: decoded images in [-1, 1], (B, C, H, W).
    - ``latents``: the latents that were decoded (a posterior sample, or the mean when deterministic).
    """

    loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    neg_elbo: torch.Tensor | None = None
    reconstruction_images: torch.Tensor | None = None
    latents: torch.Tensor | None = None


class HfxVAEPreTrainedModel(PreTrainedModel):
    config: HfxVAEConfig
    config_class = HfxVAEConfig
    base_model_prefix = "vae"
    main_input_name = "pixel_values"
    _no_split_modules = ["ResnetBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's defaults for convs and norms, and a unit-variance label embedding: one as loud as the
        # latent from the first step. Started small (std 0.02), the decoder learned to read the digit from z
        # before it read the label, and a CVAE's prior samples ignored the asked class (20.6 % of them
        # classified as asked on the digits, against 98 % with this init and gaussian_std 0.5).
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)


class HfxVAEModel(HfxVAEPreTrainedModel):
    """Convolutional VAE (or CVAE when ``config.num_classes`` is set, or an autoencoder when beta is 0).

    Example:
        >>> model = HfxVAEModel(HfxVAEConfig(image_size=16, block_out_channels=[32, 64], latent_channels=4))
        >>> out = model(pixel_values)           # (B, 1, 16, 16) in [-1, 1]
        >>> out.loss.backward()
        >>> images = model.sample(8)            # (8, 1, 16, 16)
    """

    def __init__(self, config: HfxVAEConfig):
        super().__init__(config)
        extra = config.class_embed_dim if config.num_classes is not None else 0
        self.class_embedding = nn.Embedding(config.num_classes, extra) if config.num_classes is not None else None
        self.encoder = Encoder(config, extra)
        self.decoder = Decoder(config, extra)
        self.post_init()

    # ------------------------------------------------------------------------------------ checks
    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        cfg = self.config
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[1] != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} channel(s), got {pixel_values.shape[1]} (shape {tuple(pixel_values.shape)})")
        h, w = pixel_values.shape[-2:]
        if h % cfg.downsample_factor or w % cfg.downsample_factor:
            raise ValueError(f"image side {h}x{w} is not divisible by the downsampling factor {cfg.downsample_factor}")

    def _label_map(self, labels: torch.Tensor | list[int] | None, batch: int, size: tuple[int, int]) -> torch.Tensor | None:
        """Broadcast the label embedding over a spatial map (B, class_embed_dim, *size); None if unconditional."""
        if self.class_embedding is None:
            if labels is not None:
                raise ValueError("labels were given, but this VAE is unconditional (config.num_classes is None)")
            return None
        if labels is None:
            raise ValueError(f"this is a conditional VAE over {self.config.num_classes} classes: pass labels")
        labels = torch.as_tensor(labels, device=self.device).long().reshape(-1)
        if labels.numel() != batch:
            raise ValueError(f"got {labels.numel()} labels for a batch of {batch}")
        bad = labels[(labels < 0) | (labels >= self.config.num_classes)]
        if bad.numel():
            raise ValueError(f"unknown label {bad[0].item()}: labels must be in [0, {self.config.num_classes - 1}]")
        return self.class_embedding(labels)[:, :, None, None].expand(-1, -1, *size)

    @staticmethod
    def _with(x: torch.Tensor, label_map: torch.Tensor | None) -> torch.Tensor:
        return x if label_map is None else torch.cat([x, label_map.to(x.dtype)], dim=1)

    # ------------------------------------------------------------------------------- public API
    @property
    def deterministic(self) -> bool:
        """True for the autoencoder mode (beta = 0): latents are the encoder's mean, never sampled."""
        return self.config.beta == 0

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(latent_channels, h, w) of the latent of a ``config.image_size`` image."""
        side = self.config.latent_size
        return (self.config.latent_channels, side, side)

    def encode(self, pixel_values: torch.Tensor, labels=None, return_dict: bool = True):
        """Images (B, C, H, W) in [-1, 1] -> the posterior q(z | x, y) as ``HfxVAEEncoderOutput.latent_dist``."""
        self._check_pixels(pixel_values)
        label_map = self._label_map(labels, pixel_values.shape[0], tuple(pixel_values.shape[-2:]))
        moments = self.encoder(self._with(pixel_values, label_map))
        dist = DiagonalGaussian(*moments.chunk(2, dim=1))
        return HfxVAEEncoderOutput(latent_dist=dist) if return_dict else (dist,)

    def decode_logits(self, latents: torch.Tensor, labels=None) -> torch.Tensor:
        """Latents (B, latent_channels, h, w) -> the decoder's raw output: the Gaussian mean in [-1, 1]
        units, or Bernoulli logits of pixels in [0, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"latents must be (batch, {self.config.latent_channels}, h, w), got shape {tuple(latents.shape)}"
            )
        label_map = self._label_map(labels, latents.shape[0], tuple(latents.shape[-2:]))
        return self.decoder(self._with(latents, label_map))

    def decode(self, latents: torch.Tensor, labels=None) -> torch.Tensor:
        """Latents (B, latent_channels, h, w) -> images (B, C, H, W) in [-1, 1]."""
        out = self.decode_logits(latents, labels)
        if self.config.reconstruction_loss == "bernoulli":
            return torch.sigmoid(out) * 2.0 - 1.0
        return out.clamp(-1.0, 1.0)

    def reconstruction_nll(self, decoded: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) summed over pixels, per image: shape (B,)."""
        if self.config.reconstruction_loss == "bernoulli":
            target = (pixel_values + 1.0) / 2.0
            nll = F.binary_cross_entropy_with_logits(decoded, target, reduction="none")
        else:
            sigma = self.config.gaussian_std
            nll = 0.5 * ((pixel_values - decoded) / sigma).pow(2) + math.log(sigma) + 0.5 * math.log(2 * math.pi)
        return nll.flatten(1).sum(1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels=None,
        sample_posterior: bool | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> HfxVAEOutput | tuple:
        """Encode, sample (reparameterised) or take the mean, decode, and score.

        Args:
            pixel_values: (B, in_channels, H, W) in [-1, 1].
            labels: (B,) class ids, required exactly when the model is conditional.
            sample_posterior: sample z ~ q(z|x) (default: True unless the model is deterministic).
            generator: makes the posterior sample reproducible.
        """
        dist = self.encode(pixel_values, labels).latent_dist
        if sample_posterior is None:
            sample_posterior = not self.deterministic
        latents = dist.sample(generator) if sample_posterior else dist.mode()
        decoded = self.decode_logits(latents, labels)
        reconstruction = self.reconstruction_nll(decoded, pixel_values).mean()
        kl = dist.kl().mean()
        loss = reconstruction + self.config.beta * kl
        images = torch.sigmoid(decoded) * 2 - 1 if self.config.reconstruction_loss == "bernoulli" else decoded.clamp(-1, 1)
        out = HfxVAEOutput(loss=loss, reconstruction=reconstruction, kl=kl, neg_elbo=reconstruction + kl,
                           reconstruction_images=images, latents=latents)
        return out if return_dict else out.to_tuple()

    @classmethod
    def hub_card_usage(cls, folder) -> str:
        """The model card's line that uses a loaded ``model`` once, for the model saved in ``folder``."""
        import json
        import os

        with open(os.path.join(folder, "config.json")) as handle:
            conditional = json.load(handle).get("num_classes")
        labels = ", labels=[0, 1, 2, 3]" if conditional else ""
        return f"images = model.sample(4{labels})  # (4, channels, height, width) in [-1, 1]"

    @classmethod
    def hub_card_samples(cls, folder, seed: int = 0) -> tuple[torch.Tensor, int]:
        """The model card's sample grid: 16 prior samples (a CVAE's cycling through its classes) of the model
        saved in ``folder``, as ``(images (16, C, H, W) in [-1, 1], rows)``."""
        model = cls.from_pretrained(folder).eval()
        labels = torch.arange(16) % model.config.num_classes if model.config.num_classes else None
        return model.sample(16, labels=labels, generator=torch.Generator().manual_seed(seed)), 4

    @torch.no_grad()
    def sample(self, n: int, labels=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw z ~ N(0, I) of :attr:`latent_shape` and decode: images (n, C, H, W) in [-1, 1].
        A conditional model needs ``labels`` (n,)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        z = torch.randn((n, *self.latent_shape), generator=generator, device=self.device, dtype=self.dtype)
        return self.decode(z, labels)

    @torch.no_grad()
    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8, labels=None) -> torch.Tensor:
        """Decode ``steps`` points on the line between the posterior means of two images.

        Args:
            x_a, x_b: single images (C, H, W) or (1, C, H, W) in [-1, 1].
            labels: for a CVAE, one label used for every step.
        Returns:
            (steps, C, H, W) images in [-1, 1], from x_a's reconstruction to x_b's.
        """
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        x = torch.stack([x_a.reshape(-1, *x_a.shape[-3:])[0], x_b.reshape(-1, *x_b.shape[-3:])[0]])
        pair_labels = None if labels is None else torch.as_tensor(labels).reshape(-1)[:1].repeat(2)
        z = self.encode(x, pair_labels).latent_dist.mode()
        weights = torch.linspace(0.0, 1.0, steps, device=z.device, dtype=z.dtype)[:, None, None, None]
        path = (1 - weights) * z[0:1] + weights * z[1:2]
        step_labels = None if labels is None else pair_labels[:1].repeat(steps)
        return self.decode(path, step_labels)

    @torch.no_grad()
    def latent_arithmetic(self, x_a: torch.Tensor, x_b: torch.Tensor, x_c: torch.Tensor, labels=None) -> torch.Tensor:
        """Vector arithmetic in latent space: decode ``z(a) - z(b) + z(c)`` ("a is to b as ? is to c").

        Each argument is a batch (B, C, H, W) in [-1, 1] (or one image); the latent of each is the
        mean of the batch's posterior means, so averaging several examples of an attribute gives a
        cleaner direction. Returns one image (1, C, H, W) in [-1, 1].
        """
        def mean_latent(x):
            x = x.reshape(-1, *x.shape[-3:])
            batch_labels = None if labels is None else torch.as_tensor(labels).reshape(-1)[:1].repeat(x.shape[0])
            return self.encode(x, batch_labels).latent_dist.mode().mean(0, keepdim=True)

        z = mean_latent(x_a) - mean_latent(x_b) + mean_latent(x_c)
        return self.decode(z, None if labels is None else torch.as_tensor(labels).reshape(-1)[:1])


__all__ = ["HfxVAEModel", "HfxVAEPreTrainedModel", "HfxVAEOutput", "HfxVAEEncoderOutput", "DiagonalGaussian"]
