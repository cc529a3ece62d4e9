"""Configuration of hfx's convolutional (conditional) variational autoencoder."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class HfxVAEConfig(PreTrainedConfig):
    r"""Configuration of :class:`HfxVAEModel`: a convolutional VAE with a spatial latent.

    The encoder maps an image of ``in_channels x image_size x image_size`` to the mean and log-variance
    of a Gaussian over latents of ``latent_channels x (image_size / f) x (image_size / f)``, where the
    downsampling factor ``f = 2 ** (len(block_out_channels) - 1)``. The decoder maps latents back to images.
    Images are in [-1, 1] on both sides.

    Args:
        in_channels: image channels.
        image_size: side of the square training images; fixes the latent shape used by ``sample``.
        block_out_channels: channels of each resolution level; every level but the last halves the side.
        layers_per_block: residual blocks per level.
        latent_channels: channels of the latent.
        norm_num_groups: groups of the GroupNorm layers (must divide every entry of ``block_out_channels``).
        beta: weight of the KL term in the loss (beta-VAE). ``0`` turns the model into a deterministic
            autoencoder: the latent is the encoder's mean, with no sampling.
        reconstruction_loss: ``"gaussian"`` (negative log-likelihood of a Gaussian with fixed standard
            deviation ``gaussian_std``, i.e. a scaled squared error) or ``"bernoulli"`` (pixels rescaled to
            [0, 1] and scored with binary cross-entropy on the decoder's logits).
        gaussian_std: the fixed standard deviation of the Gaussian likelihood, in [-1, 1] pixel units.
        num_classes: when set, a conditional VAE: a label embedding enters the encoder and the decoder.
        class_embed_dim: channels of the label embedding map.
        scaling_factor: multiplier that brings latents to unit variance for latent diffusion
            (``z * scaling_factor`` is what a diffusion model sees); measured on data after training.
    """

    model_type = "hfx_vae"

    in_channels: int = 1
    image_size: int = 16
    block_out_channels: list[int] | tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    beta: float = 1.0
    reconstruction_loss: str = "gaussian"
    gaussian_std: float = 0.1
    num_classes: int | None = None
    class_embed_dim: int = 8
    scaling_factor: float = 1.0

    def __post_init__(self, **kwargs):
        self.block_out_channels = list(self.block_out_channels)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checked by ``@strict`` at construction: inconsistent settings fail before a model is built."""
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels entry; {bad} do not")
        if self.reconstruction_loss not in ("gaussian", "bernoulli"):
            raise ValueError(f"reconstruction_loss must be 'gaussian' or 'bernoulli', got {self.reconstruction_loss!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.gaussian_std <= 0:
            raise ValueError(f"gaussian_std must be > 0, got {self.gaussian_std}")
        if self.image_size % self.downsample_factor:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by the downsampling factor {self.downsample_factor} "
                f"(2 ** (len(block_out_channels) - 1))"
            )
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {self.num_classes}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor


__all__ = ["HfxVAEConfig"]
