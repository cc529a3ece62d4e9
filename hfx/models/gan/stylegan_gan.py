"""A StyleGAN-style generator (Karras et al. 2019, 2020), small enough for 16x16 digits.

Read top to bottom:

1. **Mapping network** z -> w: z normalised to unit second moment (a conditional model appends its normalised
   class embedding), then ``mapping_layers`` equalised-learning-rate linear layers with LeakyReLU, their
   learning rate scaled by ``mapping_lr_multiplier`` (0.01, as in StyleGAN).
2. **Style layers**: each 3x3 convolution takes a style ``A(w)``, either by weight **modulation and
   demodulation** (StyleGAN2: scale the kernel's input channels by the style, then normalise each output
   filter to unit norm) or by **AdaIN** (StyleGAN: instance-normalise the input, then scale and shift it by the
   style). After the convolution a per-layer **noise input** (one learned strength per layer) is added, then
   a bias and LeakyReLU(0.2) x sqrt(2).
3. **Synthesis** from a learned constant 4x4 input: one style layer at 4x4, then two per doubled side (the first
   upsamples bilinearly); a modulated 1x1 ToRGB at every resolution whose images are upsampled and summed
   (StyleGAN2's skip generator). The output is linear (no tanh), as in StyleGAN.
4. **w per layer**: the synthesis takes ``num_ws`` vectors, one per style input (ToRGB shares the index of the
   next resolution's first layer). **Style mixing** takes layers before ``mixing_cutoff`` from one w and the
   rest from another: coarse layers set the shape, fine ones the stroke.
5. **Truncation**: the generator tracks the mean w (an EMA of the batch means seen in training, per class for
   a conditional model) and samples ``w' = w_avg + psi (w - w_avg)``: psi = 0 gives the mean image, psi = 1 the
   model itself, psi in between trades diversity for fidelity.

A diffusers ``ModelMixin`` for the reason given in :mod:`.modeling_gan`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .configuration_gan import (
    NOISE_MODES,
    STYLE_MODES,
    check_choice,
    check_class_labels,
    check_image_size,
    check_int,
    check_num_classes,
    check_number,
)
from .modeling_gan import GANGeneratorOutput, GeneratorShapes


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row of (B, D) to unit mean square."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class EqualLinear(nn.Module):
    """A linear layer with the equalised learning rate: weights ~ N(0, 1) / lr_multiplier, scaled at run time by
    ``lr_multiplier / sqrt(in_features)``, so every layer learns at one speed under Adam."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_multiplier: float = 1.0,
                 activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return F.leaky_relu(x, 0.2) * math.sqrt(2) if self.activation else x


class MappingNetwork(nn.Module):
    """z (B, latent_dim) [+ class ids (B,)] -> w (B, w_dim)."""

    def __init__(self, latent_dim: int, w_dim: int, num_layers: int, num_classes: int | None, lr_multiplier: float):
        super().__init__()
        self.class_embedding = nn.Embedding(num_classes, w_dim) if num_classes is not None else None
        width = latent_dim + (w_dim if num_classes is not None else 0)
        self.layers = nn.ModuleList(
            EqualLinear(width if i == 0 else w_dim, w_dim, lr_multiplier=lr_multiplier, activation=True)
            for i in range(num_layers))

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        x = normalize_2nd_moment(z)
        if self.class_embedding is not None:
            x = torch.cat([x, normalize_2nd_moment(self.class_embedding(class_labels))], dim=1)
        for layer in self.layers:
            x = layer(x)
        return x


class ModulatedConv2d(nn.Module):
    """StyleGAN2's convolution: the kernel's input channels scaled by the style ``A(w)`` per sample, then (with
    ``demodulate``) each output filter normalised to unit L2 norm.

    Run as StyleGAN2's non-fused form: scaling the kernel's input channels by ``s`` equals scaling the input
    activations by ``s``, and demodulating each filter equals scaling the output by the per-sample coefficient
    ``rsqrt(sum_i s_i^2 sum_k W_oik^2)``, so one shared-weight convolution serves the whole batch (a grouped
    convolution with one group per sample was 10x slower on the CPU)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, w_dim: int, demodulate: bool = True):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.demodulate, self.padding = demodulate, kernel_size // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w)  # (B, in)
        weight = self.weight * self.weight_gain  # (out, in, k, k)
        out = F.conv2d(x * styles[:, :, None, None], weight, padding=self.padding)
        if self.demodulate:  # 1 / the L2 norm of each sample's modulated filter, (B, out)
            coefficients = (styles.square() @ weight.square().sum(dim=(2, 3)).T + 1e-8).rsqrt()
            out = out * coefficients[:, :, None, None]
        return out


class AdaINConv2d(nn.Module):
    """StyleGAN's adaptive instance normalisation, then a plain (equalised) convolution: the input is
    instance-normalised and scaled and shifted per channel by the style ``A(w) = (scale, shift)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, w_dim: int):
        super().__init__()
        self.affine = EqualLinear(w_dim, 2 * in_channels)
        with torch.no_grad():
            self.affine.bias[:in_channels] = 1.0  # scale starts at 1, shift at 0
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        scale, shift = self.affine(w)[:, :, None, None].chunk(2, dim=1)
        x = F.instance_norm(x) * scale + shift
        return F.conv2d(x, self.weight * self.weight_gain, padding=self.padding)


#: style_mode -> the convolution that takes the style.
STYLE_CONVOLUTIONS = {"modulated": ModulatedConv2d, "adain": AdaINConv2d}


class StyleLayer(nn.Module):
    """[upsample x2 ->] style convolution 3x3 -> + noise x learned strength -> + bias -> LeakyReLU(0.2) x sqrt(2).
    Keeps a fixed noise image (``noise_const``) for ``noise_mode="const"``."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, style_mode: str,
                 upsample: bool):
        super().__init__()
        self.upsample = upsample
        self.conv = STYLE_CONVOLUTIONS[style_mode](in_channels, out_channels, 3, w_dim)
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(1, 1, resolution, resolution))
        self.resolution = resolution

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str, generator: torch.Generator | None
                ) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.conv(x, w)
        if noise_mode == "random":
            shape = (x.shape[0], 1, self.resolution, self.resolution)
            x = x + randn_tensor(shape, generator=generator, device=x.device, dtype=x.dtype) * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const * self.noise_strength
        return F.leaky_relu(x + self.bias[None, :, None, None], 0.2) * math.sqrt(2)


class ToRGB(nn.Module):
    """A modulated 1x1 convolution without demodulation (plus a bias): features -> image channels."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None]


class StyleGANGenerator(GeneratorShapes, ModelMixin, ConfigMixin):
    r"""A StyleGAN-style generator: mapping network, style layers with per-layer noise, skip ToRGBs, truncation
    and style mixing (see the module docstring).

    Args:
        image_size: side of the square output, a power of two >= 8.
        out_channels: image channels.
        latent_dim: dimension of z ~ N(0, I).
        w_dim: dimension of w (and of the class embedding of a conditional model).
        mapping_layers: linear layers of the mapping network (>= 1; StyleGAN has 8, StyleGAN2-ADA 2).
        mapping_lr_multiplier: learning-rate factor of the mapping network, in (0, 1].
        base_channels: channels at the output side; each halving of the side towards 4x4 doubles them, up to
            ``max_channels``.
        max_channels: the cap on any layer's channels.
        num_classes: None (unconditional) or the number of classes (>= 2), embedded into the mapping's input.
        style_mode: ``modulated`` (StyleGAN2 modulation / demodulation) or ``adain`` (StyleGAN).
        w_avg_beta: decay of the tracked mean w, in [0, 1).
    """

    supports_truncation = True

    @register_to_config
    def __init__(self, image_size: int = 16, out_channels: int = 1, latent_dim: int = 64, w_dim: int = 64,
                 mapping_layers: int = 2, mapping_lr_multiplier: float = 0.01, base_channels: int = 64,
                 max_channels: int = 256, num_classes: int | None = None, style_mode: str = "modulated",
                 w_avg_beta: float = 0.995):
        super().__init__()
        levels = int(math.log2(check_image_size(image_size))) - 2
        check_int("out_channels", out_channels)
        check_int("latent_dim", latent_dim)
        check_int("w_dim", w_dim)
        check_int("mapping_layers", mapping_layers)
        check_number("mapping_lr_multiplier", mapping_lr_multiplier, 1e-6, 1.0, "in (0, 1]")
        check_int("base_channels", base_channels)
        check_int("max_channels", max_channels)
        check_num_classes(num_classes)
        check_choice("style_mode", style_mode, STYLE_MODES)
        check_number("w_avg_beta", w_avg_beta, 0.0, 1.0 - 1e-12, "in [0, 1)")

        self.mapping = MappingNetwork(latent_dim, w_dim, mapping_layers, num_classes, mapping_lr_multiplier)
        # The mean w, per class for a conditional model (truncation keeps the class); row 0 otherwise.
        self.register_buffer("w_avg", torch.zeros(num_classes or 1, w_dim))
        resolutions = [4 * 2 ** i for i in range(levels + 1)]
        channels = [min(max_channels, base_channels * 2 ** (levels - i)) for i in range(levels + 1)]
        self.const = nn.Parameter(torch.randn(channels[0], 4, 4))
        self.layers = nn.ModuleList([StyleLayer(channels[0], channels[0], w_dim, 4, style_mode, upsample=False)])
        self.to_rgb = nn.ModuleList([ToRGB(channels[0], out_channels, w_dim)])
        for i in range(1, levels + 1):
            self.layers.append(StyleLayer(channels[i - 1], channels[i], w_dim, resolutions[i], style_mode, upsample=True))
            self.layers.append(StyleLayer(channels[i], channels[i], w_dim, resolutions[i], style_mode, upsample=False))
            self.to_rgb.append(ToRGB(channels[i], out_channels, w_dim))

    # ------------------------------------------------------------------------------------------ shapes
    @property
    def num_ws(self) -> int:
        """How many w vectors the synthesis takes: one per style layer, plus the last ToRGB's."""
        return len(self.layers) + 1

    # ------------------------------------------------------------------------------------------ z -> w
    def map(self, latents: torch.Tensor, class_labels: torch.Tensor | None = None, truncation_psi: float = 1.0
            ) -> torch.Tensor:
        """z (B, latent_dim) -> w per layer (B, num_ws, w_dim), truncated towards the (class's) mean w. In
        training mode it also moves the tracked mean towards this batch's mean w."""
        if latents.ndim != 2 or latents.shape[1] != self.config.latent_dim:
            raise ValueError(f"latents must have shape (batch, {self.config.latent_dim}), got {tuple(latents.shape)}")
        check_number("truncation_psi", truncation_psi, 0.0, 1.0, "a number in [0, 1] (0: the mean w, 1: no truncation)")
        labels = check_class_labels(class_labels, self.config.num_classes, latents.shape[0], "generator")
        w = self.mapping(latents, labels)
        rows = labels if labels is not None else torch.zeros(len(w), dtype=torch.long, device=w.device)
        if self.training:
            self._track_w_avg(w.detach(), rows)
        if truncation_psi != 1.0:
            w_avg = self.w_avg[rows].to(w.dtype)
            w = w_avg + truncation_psi * (w - w_avg)
        return w[:, None].expand(-1, self.num_ws, -1)

    @torch.no_grad()
    def _track_w_avg(self, w: torch.Tensor, rows: torch.Tensor) -> None:
        """w_avg[c] <- lerp(w_avg[c], mean of this batch's w of class c, 1 - beta), for the classes present."""
        sums = torch.zeros_like(self.w_avg).index_add_(0, rows, w.float())
        counts = torch.bincount(rows, minlength=len(self.w_avg)).to(sums)[:, None]
        present = counts > 0
        means = sums / counts.clamp(min=1)
        updated = torch.lerp(self.w_avg, means, 1.0 - self.config.w_avg_beta)
        self.w_avg.copy_(torch.where(present, updated, self.w_avg))

    # ------------------------------------------------------------------------------------------ w -> image
    def synthesize(self, ws: torch.Tensor, noise_mode: str = "random", generator: torch.Generator | None = None
                   ) -> torch.Tensor:
        """w per layer (B, num_ws, w_dim) -> images (B, out_channels, image_size, image_size).

        ``noise_mode``: ``random`` (fresh noise from ``generator``), ``const`` (each layer's fixed noise image) or
        ``none``."""
        check_choice("noise_mode", noise_mode, NOISE_MODES)
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.config.w_dim):
            raise ValueError(f"ws must have shape (batch, {self.num_ws}, {self.config.w_dim}), got {tuple(ws.shape)}")
        x = self.const[None].expand(ws.shape[0], -1, -1, -1).to(ws.dtype)
        x = self.layers[0](x, ws[:, 0], noise_mode, generator)
        image = self.to_rgb[0](x, ws[:, 1])
        for level in range(1, len(self.to_rgb)):
            first = 2 * level - 1  # this resolution's two style layers take ws[first] and ws[first + 1]
            x = self.layers[first](x, ws[:, first], noise_mode, generator)
            x = self.layers[first + 1](x, ws[:, first + 1], noise_mode, generator)
            image = F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)
            image = image + self.to_rgb[level](x, ws[:, first + 2])
        return image

    def forward(self, latents: torch.Tensor, class_labels: torch.Tensor | None = None, truncation_psi: float = 1.0,
                generator: torch.Generator | None = None, mixing_latents: torch.Tensor | None = None,
                mixing_cutoff: int | None = None, noise_mode: str = "random", return_dict: bool = True
                ) -> GANGeneratorOutput | tuple:
        """Images for latents.

        Args:
            latents: (batch, latent_dim) draws of z ~ N(0, I).
            class_labels: (batch,) integer ids for a conditional generator; None for an unconditional one.
            truncation_psi: in [0, 1]; ``w_avg + psi (w - w_avg)``.
            generator: the source of the per-layer noise (``noise_mode="random"``).
            mixing_latents: (batch, latent_dim) a second z; layers from ``mixing_cutoff`` on take its w.
            mixing_cutoff: in [1, num_ws), required with ``mixing_latents``.
            noise_mode: ``random``, ``const`` or ``none``.

        Returns:
            ``sample``: (batch, out_channels, image_size, image_size), roughly in [-1, 1] (no tanh: clamp to show).
        """
        ws = self.map(latents, class_labels, truncation_psi)
        if mixing_latents is not None or mixing_cutoff is not None:
            if mixing_latents is None or mixing_cutoff is None:
                raise ValueError("style mixing needs both mixing_latents and mixing_cutoff")
            cutoff = check_int("mixing_cutoff", mixing_cutoff, 1)
            if cutoff >= self.num_ws:
                raise ValueError(f"mixing_cutoff must be in [1, {self.num_ws}) (this generator takes {self.num_ws} "
                                 f"w vectors), got {mixing_cutoff!r}")
            if mixing_latents.shape != latents.shape:
                raise ValueError(f"mixing_latents must have the shape of latents {tuple(latents.shape)}, "
                                 f"got {tuple(mixing_latents.shape)}")
            mixed = self.map(mixing_latents, class_labels, truncation_psi)
            ws = torch.cat([ws[:, :cutoff], mixed[:, cutoff:]], dim=1)
        images = self.synthesize(ws, noise_mode, generator)
        return GANGeneratorOutput(sample=images) if return_dict else (images,)


__all__ = ["AdaINConv2d", "MappingNetwork", "ModulatedConv2d", "StyleGANGenerator"]
