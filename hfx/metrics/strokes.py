"""A domain measure for images of strokes (the digits' CycleGAN domains): how thick the strokes are.

``stroke_width(pixels)`` is the mean, over the ink pixels of each image (brighter than the midpoint of
its range), of their Euclidean distance to the nearest background pixel: a quarter of the stroke's width
plus half a pixel for a long straight stroke (a little less near its ends), independent of how much ink the digit has (a "1" and an "8"
of one pen agree).
"""

from __future__ import annotations

import numpy as np
import torch


def ink_masks(pixels: torch.Tensor | np.ndarray, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """Greyscale images (B, 1, H, W) or (B, H, W) -> (B, H, W) bool: the pixels above the middle of ``[low, high]``.

    Raises:
        ValueError: another shape (or more than one channel).
    """
    array = pixels.detach().float().cpu().numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels, float)
    if array.ndim == 4:
        if array.shape[1] != 1:
            raise ValueError(f"pixels must be greyscale (B, 1, H, W) or (B, H, W), got shape {array.shape}")
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"pixels must be greyscale (B, 1, H, W) or (B, H, W), got shape {array.shape}")
    return array > (low + high) / 2


def stroke_width(pixels: torch.Tensor | np.ndarray, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """Mean distance to the background of the ink pixels, per image: (B, 1, H, W) or (B, H, W) -> (B,) float64.

    Args:
        pixels: greyscale images, ink bright, values in ``[low, high]`` ([-1, 1] as hfx's models make them).
        low, high: the value range; a pixel is ink when it lies above ``(low + high) / 2``.

    Returns:
        (B,) distances in pixels; 0 for an image without ink.
    """
    from scipy import ndimage

    ink = ink_masks(pixels, low, high)
    widths = [ndimage.distance_transform_edt(mask)[mask].mean() if mask.any() else 0.0 for mask in ink]
    return torch.tensor(widths, dtype=torch.float64)
