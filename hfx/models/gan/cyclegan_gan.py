"""CycleGAN's networks (Zhu et al. 2017, after pytorch-CycleGAN-and-pix2pix): a ResNet image-to-image
generator and a PatchGAN discriminator.

- :class:`CycleGANGenerator` (junyanz' ``ResnetGenerator``): reflection pad + 7x7 convolution to
  ``base_channels``, ``num_downsamples`` stride-2 3x3 convolutions (channels doubling), ``num_blocks``
  residual blocks (reflection pad, 3x3, norm, ReLU, 3x3, norm; ``x + block(x)``), as many stride-2 transposed
  convolutions back up, a 7x7 convolution to ``out_channels`` and tanh. Instance norm without affine
  parameters, as there. Fully convolutional, deterministic (no noise, no dropout by default).
- :class:`PatchGANDiscriminator` (junyanz' ``NLayerDiscriminator``): ``num_layers`` stride-2 4x4
  convolutions (LeakyReLU 0.2; no norm on the first), one stride-1 4x4 convolution with norm, and a stride-1
  4x4 convolution to one channel: a map of scores, each judging one overlapping patch of the image.

Both record the image side and channels they were trained on (``sample_size``, ``in_channels``), so a
pipeline can refuse images of another size or channel count with a message naming them. Weights are
initialised N(0, 0.02) as in the reference (``init_type='normal'``).

Self-contained (torch, diffusers and the sibling configuration file only), so it can be exported as remote code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from .configuration_gan import check_choice, check_int

#: Normalisation layers of the CycleGAN networks: ``instance`` (the reference's default), ``batch``, ``none``.
CYCLEGAN_NORMS = ("instance", "batch", "none")


@dataclass
class ImageToImageOutput(BaseOutput):
    """``sample``: (batch, channels, height, width) translated images in [-1, 1]."""

    sample: torch.Tensor


@dataclass
class PatchScoresOutput(BaseOutput):
    """``scores``: (batch, 1, h, w) raw scores, one per overlapping patch of the input."""

    scores: torch.Tensor


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def _init_normal(module: nn.Module) -> None:
    """The reference's ``init_weights(init_type='normal', init_gain=0.02)``."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def check_images(images: torch.Tensor, channels: int, size: int | None, name: str = "images") -> None:
    """Refuse anything but a float (B, channels, size, size) tensor (a ValueError naming ``name``)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (batch, {channels}, H, W), got "
                         f"{getattr(images, 'dtype', type(images).__name__)} of shape {tuple(getattr(images, 'shape', ()))}")
    if images.shape[1] != channels:
        raise ValueError(f"{name} have {images.shape[1]} channels; this model takes {channels}")
    if size is not None and tuple(images.shape[2:]) != (size, size):
        raise ValueError(f"{name} are {images.shape[2]}x{images.shape[3]}; this model was trained on {size}x{size} "
                         "images (resize them first)")


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, norm: str, dropout: float):
        super().__init__()
        bias = norm == "instance"  # the reference: a bias only where the norm has no shift of its own
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias), _norm(norm, channels), nn.ReLU(True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias), _norm(norm, channels)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class CycleGANGenerator(ModelMixin, ConfigMixin):
    r"""The ResNet generator of CycleGAN: images (B, in_channels, S, S) in [-1, 1] -> images of the other
    domain (B, out_channels, S, S) in [-1, 1].

    Args:
        in_channels, out_channels: image channels (1 greyscale, 3 RGB).
        sample_size: the side of the square images it is trained on (inputs of another side are refused);
            a multiple of ``2 ** num_downsamples``. None accepts any such side.
        base_channels: channels after the first convolution (the reference's ``ngf``, 64).
        num_downsamples: stride-2 stages down and up (2 in the reference).
        num_blocks: residual blocks at the lowest resolution (9 for 256x256 images, 6 for 128x128).
        norm: ``instance`` (the reference), ``batch`` or ``none``.
        dropout: dropout inside the residual blocks (the reference's ``--no_dropout`` default: 0).
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3, sample_size: int | None = None,
                 base_channels: int = 64, num_downsamples: int = 2, num_blocks: int = 9, norm: str = "instance",
                 dropout: float = 0.0):
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("out_channels", out_channels)
        check_int("base_channels", base_channels)
        check_int("num_downsamples", num_downsamples, 0)
        check_int("num_blocks", num_blocks, 0)
        check_choice("norm", norm, CYCLEGAN_NORMS)
        if sample_size is not None:
            check_int("sample_size", sample_size, 2 ** num_downsamples)
            if sample_size % 2 ** num_downsamples:
                raise ValueError(f"sample_size must be a multiple of 2 ** num_downsamples = {2 ** num_downsamples}, "
                                 f"got {sample_size!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        bias = norm == "instance"
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, base_channels, 7, bias=bias),
                  _norm(norm, base_channels), nn.ReLU(True)]
        channels = base_channels
        for _ in range(num_downsamples):
            layers += [nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1, bias=bias), _norm(norm, channels * 2),
                       nn.ReLU(True)]
            channels *= 2
        layers += [_ResidualBlock(channels, norm, dropout) for _ in range(num_blocks)]
        for _ in range(num_downsamples):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                       _norm(norm, channels // 2), nn.ReLU(True)]
            channels //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(channels, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.apply(_init_normal)

    def forward(self, images: torch.Tensor, return_dict: bool = True) -> ImageToImageOutput | tuple:
        check_images(images, self.config.in_channels, self.config.sample_size)
        if self.config.sample_size is None and (images.shape[2] % 2 ** self.config.num_downsamples
                                                or images.shape[3] % 2 ** self.config.num_downsamples):
            raise ValueError(f"images must have sides divisible by {2 ** self.config.num_downsamples}, got "
                             f"{images.shape[2]}x{images.shape[3]}")
        sample = self.model(images)
        return ImageToImageOutput(sample=sample) if return_dict else (sample,)


class PatchGANDiscriminator(ModelMixin, ConfigMixin):
    r"""The PatchGAN discriminator: images (B, in_channels, S, S) -> scores (B, 1, h, w), one per patch.

    Args:
        in_channels: image channels.
        sample_size: the side of the images it judges (others are refused); None accepts any side that
            leaves at least a 1x1 score map.
        base_channels: channels of the first convolution (the reference's ``ndf``, 64).
        num_layers: stride-2 convolutions (3 in the reference: 70x70 patches; 2 gives 34x34 patches).
        norm: ``instance`` (the reference), ``batch`` or ``none``.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, sample_size: int | None = None, base_channels: int = 64,
                 num_layers: int = 3, norm: str = "instance"):
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("base_channels", base_channels)
        check_int("num_layers", num_layers)
        check_choice("norm", norm, CYCLEGAN_NORMS)
        if sample_size is not None:
            check_int("sample_size", sample_size, 1)
            if self.score_side(sample_size, num_layers) < 1:
                raise ValueError(f"sample_size {sample_size} is too small for num_layers={num_layers} (no patch left)")
        bias = norm == "instance"
        layers = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        multiplier = 1
        for n in range(1, num_layers + 1):
            previous, multiplier = multiplier, min(2 ** n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(base_channels * previous, base_channels * multiplier, 4, stride=stride, padding=1,
                                 bias=bias), _norm(norm, base_channels * multiplier), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(base_channels * multiplier, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        self.apply(_init_normal)

    @staticmethod
    def score_side(side: int, num_layers: int) -> int:
        """The side of the score map for ``side`` x ``side`` inputs."""
        for _ in range(num_layers):
            side = (side + 2 - 4) // 2 + 1
        return side - 2  # two stride-1 4x4 convolutions with padding 1

    def forward(self, images: torch.Tensor, return_dict: bool = True) -> PatchScoresOutput | tuple:
        check_images(images, self.config.in_channels, self.config.sample_size)
        scores = self.model(images)
        return PatchScoresOutput(scores=scores) if return_dict else (scores,)
