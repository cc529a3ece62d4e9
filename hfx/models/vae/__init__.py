"""hfx's convolutional VAE / CVAE / autoencoder family (``model_type="hfx_vae"``)."""

from .configuration_vae import HfxVAEConfig
from .modeling_vae import DiagonalGaussian, HfxVAEModel, HfxVAEOutput

__all__ = ["DiagonalGaussian", "HfxVAEConfig", "HfxVAEModel", "HfxVAEOutput"]
