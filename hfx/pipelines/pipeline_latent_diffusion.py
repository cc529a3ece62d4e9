"""Class-conditional latent diffusion (Rombach et al. 2022): diffuse in an autoencoder's latent space.

The sampling loop, classifier-free and classifier guidance, guidance rescale and dynamic thresholding are
:class:`~hfx.pipelines.ClassConditionalPipeline`'s, unchanged: the UNet simply works on latents
(``unet.config.in_channels`` = the VAE's latent channels, ``sample_size`` = the latent side). At the end the
latents are divided by the VAE's ``scaling_factor`` (the factor that gave the diffusion model
unit-variance inputs in training) and decoded to images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from diffusers import SchedulerMixin, UNet2DModel

from hfx.models.noisy_classifier import NoisyClassifier
from hfx.pipelines.pipeline_class_conditional import ClassConditionalPipeline, _checked_number


class LatentDiffusionPipeline(ClassConditionalPipeline):
    r"""Pipeline for class-conditional generation in the latent space of a VAE.

    Components:
        vae: an unconditional :class:`~hfx.models.vae.HfxVAEModel` or a diffusers ``AutoencoderKL``; its
            ``config.scaling_factor`` maps latents to the diffusion model's scale (``z * scaling_factor``).
        unet, scheduler, classifier: as in :class:`ClassConditionalPipeline`, on latents.

    Call it exactly like :class:`ClassConditionalPipeline`; ``latents`` (the starting noise, and the
    ``"latents"`` a ``callback_on_step_end`` sees), when given, have the latent shape.
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(
        self,
        vae,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        classifier: NoisyClassifier | None = None,
        class_names: Sequence[str] | Mapping[str, str] | None = None,
        default_guidance_scale: float = 2.0,
    ):
        super().__init__(unet=unet, scheduler=scheduler, classifier=classifier, class_names=class_names,
                         default_guidance_scale=default_guidance_scale)
        vae_config = getattr(vae, "config", None)
        if vae_config is None or not callable(getattr(vae, "decode", None)):
            raise ValueError("vae must be an HfxVAEModel or a diffusers AutoencoderKL (a model with a config and "
                             f"decode), got {type(vae).__name__}")
        _checked_number("the vae's config.scaling_factor", getattr(vae_config, "scaling_factor", None),
                        "a finite number > 0 (latents are divided by it before decoding)", lambda factor: factor > 0)
        if getattr(vae.config, "num_classes", None) is not None:
            raise ValueError("the vae of a LatentDiffusionPipeline must be unconditional (its config.num_classes "
                             f"is {vae.config.num_classes}); the UNet carries the class condition")
        latent_channels = getattr(vae.config, "latent_channels", None)
        if latent_channels != unet.config.in_channels:
            raise ValueError(f"the unet takes {unet.config.in_channels} channels but the vae's latents have "
                             f"{latent_channels}: train the unet on this vae's latents")
        if scheduler.config.get("clip_sample", False):
            raise ValueError(f"{type(scheduler).__name__} has clip_sample=True, which clips every predicted x_0 to "
                             "[-1, 1]: right for pixels, wrong for latents. Pass the scheduler with clip_sample=False "
                             "(e.g. DDIMScheduler.from_config(scheduler.config, clip_sample=False))")
        self.register_modules(vae=vae)

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent position covers along each side."""
        blocks = getattr(self.vae.config, "block_out_channels", [0])
        return 2 ** (len(blocks) - 1)

    def decode_latents(self, sample: torch.Tensor) -> torch.Tensor:
        """Latents at the diffusion scale -> images in [-1, 1] through the VAE's decoder."""
        latents = sample / self.vae.config.scaling_factor
        decoded = self.vae.decode(latents.to(self.vae.dtype))
        return decoded.sample if hasattr(decoded, "sample") else decoded
