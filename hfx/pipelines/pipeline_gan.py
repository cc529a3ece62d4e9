"""Sampling a trained GAN: one generator call, no iterative denoising.

    z ~ N(0, I)                                   (from ``generator``, or the ``latents`` given)
    images = G(z, y, truncation_psi)              (y: the class labels of a conditional generator)

The pipeline holds the generator (the EMA weights of a run) and, optionally, the discriminator it was trained
against (for continued training or scoring; sampling never calls it). For a StyleGAN-style generator,
``truncation_psi`` < 1 pulls each w towards the tracked mean w (of its class): fidelity for diversity.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from hfx.pipelines.loading import FolderOrRepoLoading
from hfx.pipelines.pipeline_class_conditional import _checked_count, _checked_number
from hfx.pipelines.utils import image_output

ClassLabels = int | str | Sequence[int | str] | torch.Tensor | np.ndarray


class GANPipeline(FolderOrRepoLoading, DiffusionPipeline):
    r"""Pipeline for (class-conditional) image generation with a GAN generator.

    Components:
        generator: a :class:`~hfx.models.gan.DCGANGenerator` or :class:`~hfx.models.gan.StyleGANGenerator` (any
            model with ``config.latent_dim``, ``config.num_classes`` and ``forward(latents, class_labels,
            truncation_psi, generator)`` returning ``sample`` in [-1, 1]).
        discriminator (optional): the :class:`~hfx.models.gan.DCGANDiscriminator` it was trained against.

    Config (saved in ``model_index.json``):
        class_names: one name per class id of a conditional generator (stored as an id -> name mapping, as
            :class:`~hfx.pipelines.ClassConditionalPipeline` stores them), or None.

    ``from_pretrained`` accepts a local folder or a Hub repo id; after ``import hfx``,
    ``DiffusionPipeline.from_pretrained`` returns this class for a folder or repo saved from it.

    Example::

        >>> import torch
        >>> from hfx.pipelines import GANPipeline
        >>> pipe = GANPipeline.from_pretrained("outputs/cgan-digits/final")
        >>> images = pipe(class_labels=[3, 3, 7], generator=torch.Generator().manual_seed(0)).images  # 3 PIL images
    """

    model_cpu_offload_seq = "generator"
    _optional_components = ["discriminator"]

    def __init__(self, generator, discriminator=None, class_names: Sequence[str] | Mapping[str, str] | None = None):
        super().__init__()
        config = getattr(generator, "config", None)
        if not isinstance(generator, torch.nn.Module) or not isinstance(getattr(config, "latent_dim", None), int):
            raise ValueError("generator must be a GAN generator (a model with config.latent_dim, e.g. DCGANGenerator "
                             f"or StyleGANGenerator), got {type(generator).__name__}")
        num_classes = config.num_classes
        if discriminator is not None:
            d_config = getattr(discriminator, "config", None)
            if not isinstance(discriminator, torch.nn.Module) or d_config is None or "in_channels" not in d_config:
                raise ValueError(f"discriminator must be a GAN discriminator (e.g. DCGANDiscriminator) or None, got "
                                 f"{type(discriminator).__name__}")
            if d_config.num_classes != num_classes:
                raise ValueError(f"the discriminator has num_classes={d_config.num_classes}, the generator "
                                 f"{num_classes}: they must match")
        class_names = self._checked_class_names(class_names, num_classes)
        self.register_modules(generator=generator, discriminator=discriminator)
        stored = None if class_names is None else {str(i): name for i, name in enumerate(class_names)}
        self.register_to_config(class_names=stored)

    @staticmethod
    def _checked_class_names(class_names, num_classes: int | None) -> list[str] | None:
        if class_names is None:
            return None
        if isinstance(class_names, Mapping):  # as saved: {"0": name, ...}
            class_names = [class_names.get(str(i)) for i in range(len(class_names))]
        if isinstance(class_names, (str, bytes)) or not isinstance(class_names, Sequence):
            raise ValueError(f"class_names must be a list of strings or None, got {type(class_names).__name__}")
        if num_classes is None:
            raise ValueError("class_names given, but the generator is unconditional (num_classes=None)")
        if len(class_names) != num_classes or not all(isinstance(n, str) and n for n in class_names) \
                or len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be {num_classes} unique non-empty strings, one per class, "
                             f"got {list(class_names)!r}")
        return list(class_names)

    # ------------------------------------------------------------------------------------------ model card
    hub_pipeline_tag = "unconditional-image-generation"

    @classmethod
    def hub_card_usage(cls, folder: str | os.PathLike) -> str:
        """The model card's line that samples once from the pipeline saved in ``folder``."""
        import json

        with open(os.path.join(folder, "generator", "config.json")) as handle:
            config = json.load(handle)
        call = f"class_labels={list(range(min(4, config['num_classes'])))}" if config.get("num_classes") else "batch_size=4"
        psi = ", truncation_psi=0.7" if config.get("_class_name") == "StyleGANGenerator" else ""
        return f"images = pipe({call}{psi}).images  # PIL images"

    @classmethod
    def hub_card_samples(cls, folder: str | os.PathLike, seed: int = 0) -> tuple[torch.Tensor, int]:
        """The card's sample grid: 8 samples of each of (up to) the first ten classes, or 64 samples in 8 rows,
        as ``(images (N, C, H, W) in [-1, 1], rows)``."""
        pipe = cls.from_pretrained(folder)
        generator = torch.Generator().manual_seed(seed)
        if pipe.num_classes:
            classes = list(range(min(pipe.num_classes, 10)))
            labels = [c for c in classes for _ in range(8)]
            images = pipe(class_labels=labels, generator=generator, output_type="pt").images
            return images * 2 - 1, len(classes)
        return pipe(batch_size=64, generator=generator, output_type="pt").images * 2 - 1, 8

    # ------------------------------------------------------------------------------------------ labels
    @property
    def num_classes(self) -> int | None:
        """The number of classes of a conditional generator; None for an unconditional one."""
        return self.generator.config.num_classes

    @property
    def class_names(self) -> list[str] | None:
        stored = self.config.class_names
        return None if stored is None else [stored[str(i)] for i in range(len(stored))]

    def class_ids(self, class_labels: ClassLabels) -> list[int]:
        """Class names and/or ids -> a list of ids in ``[0, num_classes)``.

        Raises:
            ValueError: labels for an unconditional generator, an unknown name, an id out of range, a bool or
                float, an empty list.
        """
        if self.num_classes is None:
            raise ValueError("class_labels given, but this pipeline's generator is unconditional: use batch_size")
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            if (class_labels.is_floating_point() if isinstance(class_labels, torch.Tensor)
                    else class_labels.dtype.kind == "f") or class_labels.ndim > 1:
                raise ValueError(f"class_labels must be integer ids, 0-d or 1-d, got {class_labels.dtype} of shape "
                                 f"{tuple(class_labels.shape)}")
            class_labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (numbers.Integral, str)):
            class_labels = [class_labels]
        elif not isinstance(class_labels, Sequence):
            raise ValueError(f"class_labels must be an id, a name, a list of them or a 1-d integer tensor, got "
                             f"{type(class_labels).__name__}")
        if not class_labels:
            raise ValueError("class_labels is empty: give at least one class id or name")
        names, ids = self.class_names or [], []
        for label in class_labels:
            if isinstance(label, str):
                if label not in names:
                    raise ValueError(f"unknown class name {label!r}: expected one of {names}" if names else
                                     f"unknown class name {label!r}: this pipeline has ids only, in [0, {self.num_classes})")
                ids.append(names.index(label))
            elif isinstance(label, (bool, np.bool_)) or not isinstance(label, numbers.Integral):
                raise ValueError(f"class label {label!r} must be an int id or a class name, not {type(label).__name__}")
            elif not 0 <= label < self.num_classes:
                raise ValueError(f"class id {label} is out of range [0, {self.num_classes})")
            else:
                ids.append(int(label))
        return ids

    # ------------------------------------------------------------------------------------------ sampling
    def check_inputs(self, batch_size, class_labels, truncation_psi, output_type, return_dict) -> None:
        """Raise a ValueError naming the first bad argument and what it allows."""
        if (batch_size is None) == (class_labels is None):
            raise ValueError("give exactly one of batch_size (an unconditional generator) and class_labels "
                             "(a conditional one)")
        if batch_size is not None:
            _checked_count("batch_size", batch_size)
            if self.num_classes is not None:
                raise ValueError(f"this pipeline's generator is class-conditional ({self.num_classes} classes): "
                                 "pass class_labels instead of batch_size")
        _checked_number("truncation_psi", truncation_psi, "a finite number in [0, 1] (0: the mean w, 1: no truncation)",
                        lambda psi: 0 <= psi <= 1)
        if truncation_psi != 1 and not getattr(self.generator, "supports_truncation", False):
            raise ValueError(f"truncation_psi={truncation_psi!r} needs a generator with a mapping network "
                             f"(StyleGANGenerator); this {type(self.generator).__name__} samples at 1.0 only")
        if not isinstance(output_type, str) or output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if not isinstance(return_dict, bool):
            raise ValueError(f"return_dict must be True or False, got {return_dict!r}")

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        class_labels: ClassLabels | None = None,
        truncation_psi: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate ``batch_size`` images (unconditional generator) or one image per class label (conditional).

        Args:
            batch_size (`int`, *optional*): how many images, for an unconditional generator.
            class_labels (`int`, `str`, `list` or 1-d integer `torch.Tensor`, *optional*): class ids and/or names
                (:attr:`class_names`), one image each, for a conditional generator.
            truncation_psi (`float`, *optional*, defaults to 1.0): in [0, 1]; below 1 (StyleGAN-style generators
                only) each w moves towards the mean w: ``w_avg + psi (w - w_avg)``.
            generator (`torch.Generator` or a list of one per image, *optional*): for reproducible latents (and
                a StyleGAN-style generator's per-layer noise, drawn after the latents).
            latents (`torch.Tensor`, *optional*): z itself, (n, latent_dim); drawn from ``generator`` when None.
            output_type (`str`, *optional*, defaults to `"pil"`): ``"pil"``, ``"np"`` (float (n, H, W, C) in
                [0, 1]) or ``"pt"`` (float (n, C, H, W) in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`): an ``ImagePipelineOutput`` or a tuple.

        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)``.

        Raises:
            ValueError: both or neither of ``batch_size`` and ``class_labels``; class labels for an unconditional
                generator (or a batch size for a conditional one); an unknown or out-of-range label; a
                ``truncation_psi`` outside [0, 1], or below 1 for a generator without a mapping network;
                ``latents`` of the wrong shape; an unknown ``output_type``.
        """
        # 1. Check the arguments; one class id per image.
        self.check_inputs(batch_size, class_labels, truncation_psi, output_type, return_dict)
        device = self._execution_device
        labels = None
        if class_labels is not None:
            labels = torch.tensor(self.class_ids(class_labels), device=device, dtype=torch.long)
            batch_size = len(labels)

        # 2. The latents z ~ N(0, I).
        shape = (batch_size, self.generator.config.latent_dim)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.generator.dtype)
        elif not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape or not latents.is_floating_point():
            raise ValueError(f"latents must be a float tensor of shape {shape}, got "
                             f"{getattr(latents, 'dtype', type(latents).__name__)} {tuple(getattr(latents, 'shape', ()))}")
        else:
            latents = latents.to(device=device, dtype=self.generator.dtype)

        # 3. One generator call; the noise of a StyleGAN-style generator comes from the same generator.
        noise_generator = generator[0] if isinstance(generator, list) else generator
        images = self.generator(latents, class_labels=labels, truncation_psi=float(truncation_psi),
                                generator=noise_generator).sample

        # 4. [-1, 1] -> [0, 1] images.
        return image_output(self, images, output_type, return_dict)
