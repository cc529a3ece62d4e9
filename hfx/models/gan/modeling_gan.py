"""DCGAN generator and discriminator (Radford et al. 2016), their class-conditional variants and spectral norm.

- :class:`DCGANGenerator`: z (B, latent_dim) -> a 4x4 map by a transposed convolution, then stride-2
  transposed convolutions (batch norm, ReLU) that double the side up to ``image_size``, tanh at the end.
  With ``num_classes`` it is conditional: a learned class embedding is concatenated to z (Mirza & Osindero).
- :class:`DCGANDiscriminator`: stride-2 convolutions (LeakyReLU 0.2; no norm on the first) down to 4x4,
  flattened to features phi(x), then a linear score psi(phi(x)). With ``num_classes`` it is the projection
  discriminator of Miyato & Koyama (2018): ``D(x, y) = psi(phi(x)) + <embed(y), phi(x)>``. With
  ``spectral_norm=True`` every convolution, linear layer and the class embedding is spectrally normalised
  (Miyato et al. 2018, ``torch.nn.utils.parametrizations.spectral_norm``: one power iteration per training
  forward), which bounds the critic's Lipschitz constant layer by layer.

Why diffusers' ``ModelMixin`` / ``ConfigMixin`` rather than transformers' ``PreTrainedModel``: these models are
components of :class:`~hfx.pipelines.GANPipeline`, a ``DiffusionPipeline``. diffusers saves and loads a
ModelMixin component natively (``save_pretrained`` / ``from_pretrained`` with ``subfolder``, dtype and device
handling, ``config.json`` from the ``__init__`` arguments via ``register_to_config``), and the engine's
``with_weights`` and diffusers' ``EMAModel`` work on it directly. A PreTrainedModel would also load in a
pipeline (hfx's VAE does), but it needs a separate config class, an ``AutoConfig`` registration under a
``model_type`` and ``post_init``, and buys nothing here: no tokenizer, no ``generate``, no Auto class a user
would reach for. diffusers finds a component's base class by name on its module, hence the explicit import.

Self-contained (torch, diffusers and the sibling configuration file only), so it can be exported as remote code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as apply_spectral_norm

from .configuration_gan import (
    DISCRIMINATOR_NORMS,
    check_choice,
    check_class_labels,
    check_image_size,
    check_int,
    check_num_classes,
)


@dataclass
class GANGeneratorOutput(BaseOutput):
    """``sample``: (batch, channels, height, width) generated images, in [-1, 1] for a tanh output."""

    sample: torch.Tensor


@dataclass
class GANDiscriminatorOutput(BaseOutput):
    """``scores``: (batch,) raw scores (logits for the minimax losses, critic values for WGAN);
    ``features``: (batch, feature_dim) the flattened features phi(x) the score is computed from."""

    scores: torch.Tensor
    features: torch.Tensor


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: convolution and linear weights ~ N(0, 0.02), norm scales ~ N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _levels(image_size: int) -> int:
    """How many factor-2 resolution changes lie between 4x4 and ``image_size``."""
    return int(math.log2(image_size)) - 2


class GeneratorShapes:
    """What the task and the pipeline read off any generator: its latent's shape and its number of classes."""

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one latent z, without the batch dimension."""
        return (self.config.latent_dim,)

    @property
    def num_classes(self) -> int | None:
        return self.config.num_classes


class DCGANGenerator(GeneratorShapes, ModelMixin, ConfigMixin):
    r"""The DCGAN generator, optionally class-conditional.

    Args:
        image_size: side of the square output, a power of two >= 8.
        out_channels: image channels (1 grey, 3 RGB).
        latent_dim: dimension of z ~ N(0, I).
        base_channels: channels of the last hidden layer (at half the output side); each layer before it
            has twice as many, up to ``max_channels``.
        max_channels: the cap on any layer's channels.
        num_classes: None (unconditional) or the number of classes (>= 2): a class embedding of
            ``class_embed_dim`` is concatenated to z.
        class_embed_dim: the embedding's size (default: ``latent_dim``).
    """

    #: Whether ``forward`` takes a ``truncation_psi`` other than 1 (it needs a mapping network: StyleGAN's).
    supports_truncation = False

    @register_to_config
    def __init__(self, image_size: int = 16, out_channels: int = 1, latent_dim: int = 64, base_channels: int = 64,
                 max_channels: int = 512, num_classes: int | None = None, class_embed_dim: int | None = None):
        super().__init__()
        levels = _levels(check_image_size(image_size))
        check_int("out_channels", out_channels)
        check_int("latent_dim", latent_dim)
        check_int("base_channels", base_channels)
        check_int("max_channels", max_channels)
        check_num_classes(num_classes)
        if class_embed_dim is not None:
            check_int("class_embed_dim", class_embed_dim)
            if num_classes is None:
                raise ValueError("class_embed_dim is set, but num_classes is None: an unconditional generator has no "
                                 "class embedding")
        embed_dim = (class_embed_dim or latent_dim) if num_classes is not None else 0
        self.class_embedding = nn.Embedding(num_classes, embed_dim) if num_classes is not None else None
        # Channels from 4x4 up to half the output side: base * 2^(levels - 1), ..., base.
        channels = [min(max_channels, base_channels * 2 ** (levels - 1 - i)) for i in range(levels)]
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim + embed_dim, channels[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(channels[0]), nn.ReLU(True)]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(channels[-1], out_channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, latents: torch.Tensor, class_labels: torch.Tensor | None = None, truncation_psi: float = 1.0,
                generator: torch.Generator | None = None, return_dict: bool = True) -> GANGeneratorOutput | tuple:
        """Images for latents.

        Args:
            latents: (batch, latent_dim) draws of z ~ N(0, I).
            class_labels: (batch,) integer ids for a conditional generator; None for an unconditional one.
            truncation_psi: must be 1 (a DCGAN has no mapping network whose mean w it could truncate towards).
            generator: unused (a DCGAN draws no noise of its own); accepted so every generator is called alike.

        Returns:
            ``sample``: (batch, out_channels, image_size, image_size) in [-1, 1].
        """
        if truncation_psi != 1.0:
            raise ValueError(f"truncation_psi={truncation_psi!r} needs a generator with a mapping network "
                             "(StyleGANGenerator); a DCGANGenerator samples only at truncation_psi=1.0")
        if latents.ndim != 2 or latents.shape[1] != self.config.latent_dim:
            raise ValueError(f"latents must have shape (batch, {self.config.latent_dim}), got {tuple(latents.shape)}")
        labels = check_class_labels(class_labels, self.config.num_classes, latents.shape[0], "generator")
        h = latents if labels is None else torch.cat([latents, self.class_embedding(labels)], dim=1)
        images = self.net(h[:, :, None, None])
        return GANGeneratorOutput(sample=images) if return_dict else (images,)


class DCGANDiscriminator(ModelMixin, ConfigMixin):
    r"""The DCGAN discriminator (critic), optionally a projection discriminator, optionally spectrally normalised.

    Args:
        image_size: side of the square input, a power of two >= 8.
        in_channels: image channels.
        base_channels: channels of the first convolution; each following one doubles, up to ``max_channels``.
        max_channels: the cap on any layer's channels.
        num_classes: None (unconditional) or the number of classes (>= 2) of the projection term.
        norm: between the convolutions (not after the first): ``batch`` (DCGAN), ``layer`` (one-group
            GroupNorm, per sample: safe with a gradient penalty) or ``none``.
        spectral_norm: spectrally normalise every convolution, linear layer and the class embedding.
    """

    @register_to_config
    def __init__(self, image_size: int = 16, in_channels: int = 1, base_channels: int = 64, max_channels: int = 512,
                 num_classes: int | None = None, norm: str = "batch", spectral_norm: bool = False):
        super().__init__()
        levels = _levels(check_image_size(image_size))
        check_int("in_channels", in_channels)
        check_int("base_channels", base_channels)
        check_int("max_channels", max_channels)
        check_num_classes(num_classes)
        check_choice("norm", norm, DISCRIMINATOR_NORMS)
        if not isinstance(spectral_norm, bool):
            raise ValueError(f"spectral_norm must be True or False, got {spectral_norm!r}")
        norms = {"batch": nn.BatchNorm2d, "layer": lambda c: nn.GroupNorm(1, c), "none": lambda c: nn.Identity()}
        channels = [min(max_channels, base_channels * 2 ** i) for i in range(levels)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=norm == "none"), norms[norm](c_out), nn.LeakyReLU(0.2, True)]
        self.net = nn.Sequential(*layers)
        self.feature_dim = channels[-1] * 4 * 4
        self.head = nn.Linear(self.feature_dim, 1)
        self.class_projection = nn.Embedding(num_classes, self.feature_dim) if num_classes is not None else None
        self.apply(_dcgan_init)
        if self.class_projection is not None:
            nn.init.normal_(self.class_projection.weight, 0.0, 0.02)
        if spectral_norm:  # after the initialisation, which must reach the raw weights
            for module in [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]:
                apply_spectral_norm(module)

    @property
    def num_classes(self) -> int | None:
        return self.config.num_classes

    def forward(self, sample: torch.Tensor, class_labels: torch.Tensor | None = None, return_dict: bool = True
                ) -> GANDiscriminatorOutput | tuple:
        """Scores for images.

        Args:
            sample: (batch, in_channels, image_size, image_size) images in [-1, 1].
            class_labels: (batch,) integer ids for a projection discriminator; None for an unconditional one.

        Returns:
            ``scores`` (batch,) and ``features`` (batch, feature_dim).
        """
        size = self.config.image_size
        if sample.ndim != 4 or tuple(sample.shape[1:]) != (self.config.in_channels, size, size):
            raise ValueError(f"sample must have shape (batch, {self.config.in_channels}, {size}, {size}), "
                             f"got {tuple(sample.shape)}")
        labels = check_class_labels(class_labels, self.config.num_classes, sample.shape[0], "discriminator")
        features = self.net(sample).flatten(1)
        scores = self.head(features).squeeze(1)
        if labels is not None:  # the projection term <embed(y), phi(x)>
            scores = scores + (self.class_projection(labels) * features).sum(1)
        return GANDiscriminatorOutput(scores=scores, features=features) if return_dict else (scores, features)


__all__ = ["DCGANDiscriminator", "DCGANGenerator", "GANDiscriminatorOutput", "GANGeneratorOutput"]
