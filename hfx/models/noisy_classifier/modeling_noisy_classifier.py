"""A noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol, 2021).

It is the encoder half of a diffusers ``UNet2DModel`` (the same timestep embedding and down blocks, so
it sees noisy images the way the denoiser does) followed by a GroupNorm-SiLU-average-pool head, like
the ADM classifier ("EncoderUNetModel" with adaptive pooling). It is a diffusers ``ModelMixin`` and
``ConfigMixin`` so that it saves and loads as a component of ``ClassConditionalPipeline``; diffusers
finds that base class by name on this module, hence the explicit import below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import get_down_block
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class NoisyClassifierOutput(BaseOutput):
    """``logits``: (batch, num_classes) unnormalised class scores for the noisy input."""

    logits: torch.Tensor


class NoisyClassifier(ModelMixin, ConfigMixin):
    r"""Classifies a noisy image ``x_t`` at diffusion timestep ``t``.

    Args:
        sample_size: height (= width) of the images; informative, the network pools globally.
        in_channels: channels of ``x_t``.
        num_classes: number of classes (without any null class).
        block_out_channels: channels of each down block; every block but the last halves the resolution.
        down_block_types: diffusers down-block names, e.g. ``"DownBlock2D"`` or ``"AttnDownBlock2D"``.
        layers_per_block: ResNet layers in each down block.
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        attention_head_dim: channels per attention head in attention blocks.
        dropout: dropout inside the ResNet layers.
        flip_sin_to_cos, freq_shift: the sinusoidal timestep embedding, as in ``UNet2DModel``.
    """

    @classmethod
    def hub_card_usage(cls, folder) -> str:
        """The model card's lines that use a loaded ``model`` once: classifier guidance in a pipeline."""
        return ("from hfx.pipelines import ClassConditionalPipeline\n"
                "pipe = ClassConditionalPipeline.from_pretrained(\"PATH/TO/the/diffusion/pipeline\", classifier=model)\n"
                "images = pipe([3], guidance_scale=1.0, classifier_scale=2.0).images")

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        in_channels: int = 1,
        num_classes: int = 10,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        attention_head_dim: int = 8,
        dropout: float = 0.0,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if len(block_out_channels) != len(down_block_types):
            raise ValueError(
                f"block_out_channels ({len(block_out_channels)} entries) and down_block_types "
                f"({len(down_block_types)} entries) must have the same length"
            )
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide every block_out_channels entry, not {bad}")
        time_embed_dim = block_out_channels[0] * 4

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)

        self.down_blocks = nn.ModuleList()
        channels = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=channels,
                    out_channels=block_out_channels[i],
                    temb_channels=time_embed_dim,
                    add_downsample=i < len(block_out_channels) - 1,
                    resnet_eps=1e-5,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim,
                    downsample_padding=1,
                    dropout=dropout,
                )
            )
            channels = block_out_channels[i]

        self.norm_out = nn.GroupNorm(norm_num_groups, channels)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, return_dict: bool = True
    ) -> NoisyClassifierOutput | tuple[torch.Tensor]:
        """Class logits for noisy images.

        Args:
            sample: (batch, in_channels, height, width) noisy images ``x_t``.
            timestep: one timestep for the whole batch (int or 0-d tensor) or one per image, shape (batch,).
            return_dict: return a :class:`NoisyClassifierOutput` rather than a tuple.

        Returns:
            ``logits`` of shape (batch, num_classes).
        """
        timesteps = torch.as_tensor(timestep, device=sample.device)
        timesteps = timesteps.reshape(-1).expand(sample.shape[0]) if timesteps.numel() == 1 else timesteps
        if timesteps.shape != (sample.shape[0],):
            raise ValueError(f"timestep must be a scalar or have shape ({sample.shape[0]},), got {tuple(timesteps.shape)}")
        # The sinusoidal projection always returns float32; the embedding MLP may run in half precision.
        emb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))

        hidden = self.conv_in(sample)
        for block in self.down_blocks:
            hidden, _ = block(hidden, emb)
        hidden = nn.functional.silu(self.norm_out(hidden))
        logits = self.classifier(hidden.mean(dim=(2, 3)))
        if not return_dict:
            return (logits,)
        return NoisyClassifierOutput(logits=logits)
