"""Text-to-image latent diffusion (Rombach et al. 2022): a UNet that cross-attends to a pretrained text encoder's
hidden states, denoising an autoencoder's latents, with classifier-free guidance against the empty prompt.

    h = text_encoder(tokenizer(prompt))                      (B, L, width), with its attention mask
    eps = eps(z_t, t, h_empty) + s (eps(z_t, t, h) - eps(z_t, t, h_empty))     (s = guidance_scale)
    image = vae.decode(z_0 / scaling_factor)

The call is ``StableDiffusionPipeline``'s (``prompt``, ``negative_prompt``, ``guidance_scale``,
``num_inference_steps``, ``num_images_per_prompt``, ``generator``, ``latents``, ``output_type``). Why not that
class itself: its VAE must be a diffusers ``AutoencoderKL`` and it feeds the text encoder no attention mask
(right for CLIP's causal encoder, wrong for a BERT encoder such as all-MiniLM-L6-v2, whose padded positions
would then change every hidden state); this pipeline takes hfx's VAE or an ``AutoencoderKL``, any transformers
encoder, and passes the mask to both the encoder and the UNet's cross-attention.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from hfx.pipelines.loading import FolderOrRepoLoading
from hfx.pipelines.pipeline_class_conditional import _checked_count, _checked_number
from hfx.pipelines.utils import image_output

logger = logging.getLogger(__name__)


class TextToImagePipeline(FolderOrRepoLoading, DiffusionPipeline):
    r"""Pipeline for text-to-image generation in the latent space of a VAE.

    Components:
        vae: an unconditional :class:`~hfx.models.vae.HfxVAEModel` or a diffusers ``AutoencoderKL``
            (``config.scaling_factor`` maps its latents to the UNet's scale).
        text_encoder: a transformers encoder (e.g. ``BertModel``) whose ``last_hidden_state`` the UNet attends to.
        tokenizer: its tokenizer; ``model_max_length`` is the longest prompt, in tokens (longer ones are
            truncated, with a warning).
        unet: a diffusers ``UNet2DConditionModel`` with ``cross_attention_dim`` = the encoder's width.
        scheduler: any diffusers scheduler (DDIM by default), without ``clip_sample`` (latents are not in [-1, 1]).

    Config (saved in ``model_index.json``):
        default_guidance_scale: the guidance scale of a call that gives none.

    Example::

        >>> import torch
        >>> from hfx.pipelines import TextToImagePipeline
        >>> pipe = TextToImagePipeline.from_pretrained("outputs/t2i-digits/final")
        >>> image = pipe("a large thick 3 on the left", generator=torch.Generator().manual_seed(0)).images[0]
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet: UNet2DConditionModel, scheduler: SchedulerMixin,
                 default_guidance_scale: float = 3.0):
        super().__init__()
        if getattr(vae, "config", None) is None or not callable(getattr(vae, "decode", None)):
            raise ValueError(f"vae must be an HfxVAEModel or a diffusers AutoencoderKL, got {type(vae).__name__}")
        if getattr(vae.config, "num_classes", None) is not None:
            raise ValueError("the vae of a TextToImagePipeline must be unconditional (config.num_classes is "
                             f"{vae.config.num_classes})")
        if not isinstance(unet, UNet2DConditionModel):
            raise ValueError(f"unet must be a diffusers UNet2DConditionModel, got {type(unet).__name__}")
        width = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
        if width != unet.config.cross_attention_dim:
            raise ValueError(f"the unet cross-attends to {unet.config.cross_attention_dim}-wide states, the text "
                             f"encoder gives {width}: they must match")
        if getattr(vae.config, "latent_channels", None) != unet.config.in_channels:
            raise ValueError(f"the unet takes {unet.config.in_channels} channels, the vae's latents have "
                             f"{getattr(vae.config, 'latent_channels', None)}")
        if scheduler.config.get("clip_sample", False):
            raise ValueError(f"{type(scheduler).__name__} has clip_sample=True, which clips every predicted latent to "
                             "[-1, 1]: pass it with clip_sample=False")
        _checked_number("default_guidance_scale", default_guidance_scale, "a finite number >= 0", lambda s: s >= 0)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.register_to_config(default_guidance_scale=float(default_guidance_scale))

    # ------------------------------------------------------------------------------------------ model card
    hub_pipeline_tag = "text-to-image"

    @classmethod
    def hub_card_usage(cls, folder: str | os.PathLike) -> str:
        """The model card's line that samples one image from the pipeline saved in ``folder``."""
        return 'image = pipe("a large thick 3 on the left", generator=torch.Generator().manual_seed(0)).images[0]'

    # ------------------------------------------------------------------------------------------ text
    @property
    def max_length(self) -> int:
        """The longest prompt the encoder reads, in tokens (its tokenizer's ``model_max_length``)."""
        return int(min(self.tokenizer.model_max_length, getattr(self.text_encoder.config, "max_position_embeddings",
                                                                  self.tokenizer.model_max_length)))

    def encode_prompt(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ``(hidden states (B, max_length, width), attention mask (B, max_length))``. Prompts longer
        than :attr:`max_length` tokens are truncated, with a warning that names how many tokens were dropped;
        the empty prompt is the unconditional one (the encoder still sees its special tokens), and so is a prompt
        with nothing the tokenizer keeps (spaces, zero-width characters), with a warning."""
        encoded = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt")
        full = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        special = self.tokenizer.num_special_tokens_to_add()
        for prompt, ids in zip(prompts, full):
            if prompt.strip() and len(ids) <= special:
                logger.warning("the prompt %r has no token the text encoder knows: it is the empty prompt (the "
                               "unconditional model)", prompt[:60])
            if len(ids) > self.max_length:
                logger.warning("the prompt %r is %d tokens long; the text encoder reads %d: the last %d were "
                               "dropped", prompt[:60], len(ids), self.max_length, len(ids) - self.max_length)
        ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden.to(self.unet.dtype), mask

    @staticmethod
    def _prompts(name: str, value, count: int | None = None) -> list[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, Sequence) or not value or not all(isinstance(p, str) for p in value):
            raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
        value = list(value)
        if count is not None and len(value) not in (1, count):
            raise ValueError(f"{name} has {len(value)} entries; give one, or one per prompt ({count})")
        return value * count if count is not None and len(value) == 1 else value

    # ------------------------------------------------------------------------------------------ sampling
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(getattr(self.vae.config, "block_out_channels", [0])) - 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int = 25,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images for text prompts.

        Args:
            prompt (`str` or `list[str]`): what to draw.
            negative_prompt (`str` or `list[str]`, *optional*): what guidance steers away from; the empty prompt
                when None (the unconditional model the training's prompt dropout made).
            guidance_scale (`float`, *optional*): classifier-free guidance: 0 the unconditional model, 1 the
                conditional one, above 1 further from the negative prompt; default ``default_guidance_scale``.
            num_inference_steps (`int`, *optional*, defaults to 25): denoising steps of the scheduler.
            num_images_per_prompt (`int`, *optional*, defaults to 1).
            generator (`torch.Generator` or a list of them, *optional*): for reproducible noise.
            latents (`torch.Tensor`, *optional*): the starting noise, (n, C, h, w) in the latent shape.
            output_type (`str`, *optional*, defaults to `"pil"`): ``"pil"``, ``"np"`` (float (n, H, W, C) in
                [0, 1]) or ``"pt"`` (float (n, C, H, W) in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`): an ``ImagePipelineOutput`` or a tuple.

        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)``: ``num_images_per_prompt`` images per prompt, in
            prompt order.

        Raises:
            ValueError: an empty or non-string prompt, a negative prompt list of another length, a guidance scale
                that is not a finite number >= 0, a step or image count < 1, latents of the wrong shape, an
                unknown ``output_type``.
        """
        # 1. Check the arguments.
        prompts = self._prompts("prompt", prompt)
        negatives = self._prompts("negative_prompt", "" if negative_prompt is None else negative_prompt, len(prompts))
        scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        scale = _checked_number("guidance_scale", scale, "a finite number >= 0", lambda s: s >= 0)
        steps = _checked_count("num_inference_steps", num_inference_steps)
        per_prompt = _checked_count("num_images_per_prompt", num_images_per_prompt)
        if not isinstance(output_type, str) or output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        device = self._execution_device

        # 2. The text condition(s): the prompts' states and, for guidance, the negative prompts'.
        prompts = [p for p in prompts for _ in range(per_prompt)]
        negatives = [p for p in negatives for _ in range(per_prompt)]
        if scale == 0:
            hidden, mask = self.encode_prompt(negatives, device)
        elif scale == 1:
            hidden, mask = self.encode_prompt(prompts, device)
        else:
            hidden, mask = self.encode_prompt(negatives + prompts, device)

        # 3. The starting noise.
        n = len(prompts)
        side = self.unet.config.sample_size
        shape = (n, self.unet.config.in_channels, side, side)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
            raise ValueError(f"latents must be a tensor of shape {shape}, got {tuple(getattr(latents, 'shape', ()))}")
        else:
            latents = latents.to(device=device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma

        # 4. Denoise, guiding each step (one batched UNet call for both halves).
        guided = scale not in (0, 1)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            eps = self.unet(model_input, t, encoder_hidden_states=hidden, encoder_attention_mask=mask).sample
            if guided:
                uncond, cond = eps.chunk(2)
                eps = uncond + scale * (cond - uncond)
            latents = self.scheduler.step(eps, t, latents, generator=generator).prev_sample

        # 5. Decode; [-1, 1] -> [0, 1].
        decoded = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype))
        return image_output(self, decoded.sample if hasattr(decoded, "sample") else decoded, output_type, return_dict)
