"""Translating images between two domains with a trained CycleGAN: one generator call.

    a_to_b:  images of domain A -> generator_ab -> images of domain B
    b_to_a:  images of domain B -> generator_ba -> images of domain A

The pipeline holds both generators and, optionally, the two PatchGAN discriminators they were trained
against (for continued training or scoring; translation never calls them). The generators are
deterministic: the same images give the same translations, with no generator argument.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

from hfx.pipelines.loading import FolderOrRepoLoading
from hfx.pipelines.utils import image_output

PipelineImages = PIL.Image.Image | np.ndarray | torch.Tensor | Sequence[PIL.Image.Image | np.ndarray | torch.Tensor]
DIRECTIONS = ("a_to_b", "b_to_a")


class CycleGANPipeline(FolderOrRepoLoading, DiffusionPipeline):
    r"""Pipeline for unpaired image-to-image translation with CycleGAN generators.

    Components:
        generator_ab: a :class:`~hfx.models.gan.CycleGANGenerator` from domain A to domain B.
        generator_ba: the generator from B to A (same image size and channels).
        discriminator_a, discriminator_b (optional): the :class:`~hfx.models.gan.PatchGANDiscriminator` s that
            judged domain A and domain B images in training.

    Config (saved in ``model_index.json``):
        domain_names: the names of domain A and domain B (e.g. ``["thin", "thick"]``; stored as ``{"a": ..., "b": ...}``).

    ``from_pretrained`` accepts a local folder or a Hub repo id; after ``import hfx``,
    ``DiffusionPipeline.from_pretrained`` returns this class for a folder or repo saved from it.

    Example::

        >>> from PIL import Image
        >>> from hfx.pipelines import CycleGANPipeline
        >>> pipe = CycleGANPipeline.from_pretrained("outputs/cyclegan-digits/final")
        >>> thick = pipe(Image.open("thin_digit.png"), direction="a_to_b").images[0]
    """

    model_cpu_offload_seq = "generator_ab->generator_ba"
    _optional_components = ["discriminator_a", "discriminator_b"]

    def __init__(self, generator_ab, generator_ba, discriminator_a=None, discriminator_b=None,
                 domain_names: Sequence[str] | Mapping[str, str] = ("a", "b")):
        super().__init__()
        shapes = []
        for name, model in (("generator_ab", generator_ab), ("generator_ba", generator_ba)):
            config = getattr(model, "config", None)
            if not isinstance(model, torch.nn.Module) or config is None or "num_blocks" not in config:
                raise ValueError(f"{name} must be a CycleGANGenerator, got {type(model).__name__}")
            shapes.append((config.in_channels, config.out_channels, config.sample_size))
        if shapes[0] != (shapes[1][1], shapes[1][0], shapes[1][2]):
            raise ValueError(f"generator_ab maps (channels, size) {shapes[0][0]}, {shapes[0][2]} -> {shapes[0][1]} and "
                             f"generator_ba {shapes[1][0]}, {shapes[1][2]} -> {shapes[1][1]}: they must be inverse")
        for name, model, channels in (("discriminator_a", discriminator_a, shapes[0][0]),
                                      ("discriminator_b", discriminator_b, shapes[0][1])):
            if model is None:
                continue
            config = getattr(model, "config", None)
            if not isinstance(model, torch.nn.Module) or config is None or "num_layers" not in config:
                raise ValueError(f"{name} must be a PatchGANDiscriminator or None, got {type(model).__name__}")
            if config.in_channels != channels:
                raise ValueError(f"{name} takes {config.in_channels} channels, its domain's images have {channels}")
        if isinstance(domain_names, Mapping) and set(domain_names) == {"a", "b"}:  # as saved in model_index.json
            domain_names = [domain_names["a"], domain_names["b"]]
        if (isinstance(domain_names, (str, bytes)) or not isinstance(domain_names, Sequence) or len(domain_names) != 2
                or not all(isinstance(n, str) and n for n in domain_names) or domain_names[0] == domain_names[1]):
            raise ValueError(f"domain_names must be two different non-empty strings (A, B), got {domain_names!r}")
        self.register_modules(generator_ab=generator_ab, generator_ba=generator_ba, discriminator_a=discriminator_a,
                              discriminator_b=discriminator_b)
        # A mapping, not a list: diffusers reads a two-item list in model_index.json as a (library, class) component.
        self.register_to_config(domain_names={"a": domain_names[0], "b": domain_names[1]})

    # ------------------------------------------------------------------------------------------ model card
    hub_pipeline_tag = "image-to-image"

    @classmethod
    def hub_card_usage(cls, folder: str | os.PathLike) -> str:
        """The model card's lines that translate one (blank) image of domain A, as a first use."""
        import json

        with open(os.path.join(folder, "generator_ab", "config.json")) as handle:
            config = json.load(handle)
        mode, side = ("L" if config["in_channels"] == 1 else "RGB"), config.get("sample_size") or 64
        return (f'image = PIL.Image.new("{mode}", ({side}, {side}))  # an image of domain A\n'
                'translated = pipe(image, direction="a_to_b").images[0]  # a PIL image of domain B')

    # ------------------------------------------------------------------------------------------ inputs
    @property
    def domain_names(self) -> list[str]:
        """The names of domain A and domain B."""
        return [self.config.domain_names["a"], self.config.domain_names["b"]]

    def _generator(self, direction) -> torch.nn.Module:
        if not isinstance(direction, str) or direction not in DIRECTIONS:
            a, b = self.domain_names
            raise ValueError(f"direction must be 'a_to_b' ({a} -> {b}) or 'b_to_a' ({b} -> {a}), got {direction!r}")
        return self.generator_ab if direction == "a_to_b" else self.generator_ba

    def preprocess(self, images: PipelineImages, channels: int, size: int | None) -> torch.Tensor:
        """PIL images (converted to the model's mode), float arrays (H, W[, C]) or (N, H, W, C) and float tensors
        (C, H, W) or (N, C, H, W) in [0, 1] -> (N, C, H, W) in [-1, 1]. The size must be the model's.

        Raises:
            ValueError: naming ``images``: an empty list, another type, the wrong channels or size, values
                outside [0, 1], an integer tensor.
        """
        if isinstance(images, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            images = [images] if not (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4) else images
        if isinstance(images, (np.ndarray, torch.Tensor)):  # a 4-d batch
            items = list(images)
        elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
            items = list(images)
        else:
            raise ValueError(f"images must be a PIL image, an array, a tensor or a list of them, got {type(images).__name__}")
        if not items:
            raise ValueError("images is empty: give at least one image")
        mode = "L" if channels == 1 else "RGB"
        out = []
        for i, item in enumerate(items):
            if isinstance(item, PIL.Image.Image):
                array = np.asarray(item.convert(mode), dtype=np.float32) / 255.0
                tensor = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], channels)).permute(2, 0, 1)
            elif isinstance(item, np.ndarray):
                if item.dtype.kind not in "f" or item.ndim not in (2, 3):
                    raise ValueError(f"images[{i}] must be a float array (H, W) or (H, W, C) in [0, 1], got "
                                     f"{item.dtype} of shape {item.shape}")
                tensor = torch.from_numpy(np.ascontiguousarray(item, dtype=np.float32))
                tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
            elif isinstance(item, torch.Tensor):
                if not item.is_floating_point() or item.ndim not in (2, 3):
                    raise ValueError(f"images[{i}] must be a float tensor (C, H, W) in [0, 1], got {item.dtype} of "
                                     f"shape {tuple(item.shape)}")
                tensor = item.detach().float().cpu()
                tensor = tensor[None] if tensor.ndim == 2 else tensor
            else:
                raise ValueError(f"images[{i}] must be a PIL image, an array or a tensor, got {type(item).__name__}")
            if tensor.shape[0] != channels:
                raise ValueError(f"images[{i}] has {tensor.shape[0]} channels; this pipeline's generators take "
                                 f"{channels} ({mode} images)")
            if size is not None and tuple(tensor.shape[1:]) != (size, size):
                raise ValueError(f"images[{i}] is {tensor.shape[2]}x{tensor.shape[1]}; this pipeline translates "
                                 f"{size}x{size} images (resize it first)")
            if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
                raise ValueError(f"images[{i}] has values outside [0, 1] (min {float(tensor.min()):.3g}, max "
                                 f"{float(tensor.max()):.3g}): pass images scaled to [0, 1]")
            out.append(tensor)
        if len({tuple(t.shape) for t in out}) > 1:
            raise ValueError("images have different sizes: give images of one size")
        return torch.stack(out) * 2 - 1

    # ------------------------------------------------------------------------------------------ translation
    @torch.no_grad()
    def __call__(
        self,
        images: PipelineImages,
        direction: str = "a_to_b",
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""Translate ``images`` from one domain to the other.

        Args:
            images (PIL image, `np.ndarray`, `torch.Tensor` or a list of them): the images of the source domain.
                PIL images are converted to the generators' mode (``L`` or ``RGB``); arrays are float (H, W[, C])
                or (N, H, W, C) and tensors float (C, H, W) or (N, C, H, W), in [0, 1]. Their side must be the
                side the generators were trained on.
            direction (`str`, *optional*, defaults to `"a_to_b"`): ``"a_to_b"`` or ``"b_to_a"`` (the domains are
                :attr:`domain_names`).
            output_type (`str`, *optional*, defaults to `"pil"`): ``"pil"``, ``"np"`` (float (n, H, W, C) in
                [0, 1]) or ``"pt"`` (float (n, C, H, W) in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`): an ``ImagePipelineOutput`` or a tuple.

        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)``, one translated image per input.

        Raises:
            ValueError: an unknown ``direction`` or ``output_type``; images of the wrong size, channels, type or
                range (naming ``images``).
        """
        # 1. Check the arguments.
        generator = self._generator(direction)
        if not isinstance(output_type, str) or output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if not isinstance(return_dict, bool):
            raise ValueError(f"return_dict must be True or False, got {return_dict!r}")
        config = generator.config

        # 2. The images, in [-1, 1], on the generator's device.
        pixels = self.preprocess(images, config.in_channels, config.sample_size)
        pixels = pixels.to(device=self._execution_device, dtype=generator.dtype)

        # 3. One generator call; [-1, 1] -> [0, 1].
        return image_output(self, generator(pixels).sample, output_type, return_dict)
