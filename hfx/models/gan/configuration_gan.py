"""The arguments of the GAN family, checked once for every model of it.

The models are diffusers ``ModelMixin`` + ``ConfigMixin`` classes (see :mod:`.modeling_gan` for why), so
their configuration is their ``__init__`` arguments, recorded by ``register_to_config`` in ``config.json``.
What those arguments mean and allow is written here, next to the checks every constructor calls: an
argument outside its range is a one-line ValueError naming it and saying what is allowed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

#: Normalisation layers a DCGAN discriminator may use between its convolutions. ``batch`` is DCGAN's;
#: ``none`` or ``layer`` for a WGAN-GP critic (the penalty is per sample, batch norm couples the samples).
DISCRIMINATOR_NORMS = ("batch", "layer", "none")
#: How a StyleGAN-style generator injects its style: StyleGAN2's weight (de)modulation or StyleGAN's AdaIN.
STYLE_MODES = ("modulated", "adain")
#: Where a StyleGAN-style generator's per-layer noise comes from: the call's generator, a fixed buffer, none.
NOISE_MODES = ("random", "const", "none")


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` when it is an integer (not a bool) >= ``minimum``; else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(name: str, value, low: float, high: float, what: str) -> float:
    """``value`` when it is a finite real number in ``[low, high]``; else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    """``value`` when it is one of ``choices``; else a ValueError naming ``name`` and listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_image_size(value) -> int:
    """The side of the square images: 4 times a power of two (8, 16, 32, 64, ...), as the generators double
    a 4x4 start and the discriminators halve down to 4x4."""
    side = check_int("image_size", value, 8)
    if side & (side - 1):
        raise ValueError(f"image_size must be a power of two >= 8 (the networks double from / halve to 4x4), got {value!r}")
    return side


def check_num_classes(value) -> int | None:
    """None for an unconditional model, else an integer >= 2."""
    return None if value is None else check_int("num_classes", value, 2)


def check_class_labels(class_labels, num_classes: int | None, batch_size: int, model: str):
    """Refuse labels for an unconditional model, missing labels for a conditional one, and labels of the wrong
    shape or outside ``[0, num_classes)`` (a ValueError naming ``class_labels``)."""
    if num_classes is None:
        if class_labels is not None:
            raise ValueError(f"class_labels given, but this {model} is unconditional (num_classes=None)")
        return None
    if class_labels is None:
        raise ValueError(f"this {model} is class-conditional (num_classes={num_classes}): pass class_labels (batch,)")
    if class_labels.shape != (batch_size,) or class_labels.is_floating_point():
        raise ValueError(f"class_labels must be integer ids of shape ({batch_size},), got {class_labels.dtype} "
                         f"of shape {tuple(class_labels.shape)}")
    if len(class_labels) and not (0 <= int(class_labels.min()) and int(class_labels.max()) < num_classes):
        raise ValueError(f"class_labels must lie in [0, {num_classes}), got ids from {int(class_labels.min())} "
                         f"to {int(class_labels.max())}")
    return class_labels
