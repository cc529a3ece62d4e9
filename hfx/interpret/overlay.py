"""A heatmap drawn over its image, for figures and model cards."""

from __future__ import annotations

import difflib

import numpy as np
import torch


def _rgb_array(image) -> np.ndarray:
    """A PIL image, an array (H, W) / (H, W, C) (uint8, or floats in [0, 1]) or a tensor (C, H, W) / (H, W)
    in [0, 1] -> float RGB (H, W, 3) in [0, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    else:
        if torch.is_tensor(image):
            image = image.detach().float().cpu()
            image = image.permute(1, 2, 0) if image.ndim == 3 else image
            image = image.numpy()
        array = np.asarray(image)
        array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image: expected (H, W), (H, W, C) or a tensor (C, H, W), got shape {array.shape}")
        array = np.repeat(array, 3, -1) if array.shape[-1] == 1 else array[..., :3]
    return np.clip(array, 0.0, 1.0)


def overlay(image, heatmap, alpha: float = 0.5, colormap: str = "jet"):
    """Blend a colour-mapped heatmap over an image.

    Args:
        image: a PIL image, a numpy array (H, W) / (H, W, C) (uint8, or floats in [0, 1]), or a tensor
            (C, H, W) / (H, W) with values in [0, 1] (undo the model's normalisation first).
        heatmap: (h, w) values in [0, 1] (a row of :attr:`Explanation.heatmaps`); resized bilinearly to the
            image when the sizes differ.
        alpha: weight of the heatmap: ``(1 - alpha) * image + alpha * colours``.
        colormap: a matplotlib colormap name (``"jet"``, ``"viridis"``, ``"inferno"``, ...).

    Returns:
        An RGB ``PIL.Image`` of the image's size.
    """
    import matplotlib
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if colormap not in matplotlib.colormaps:
        close = difflib.get_close_matches(colormap, list(matplotlib.colormaps), n=1)
        raise ValueError(f"colormap {colormap!r} is not a matplotlib colormap" + (f"; did you mean {close[0]!r}?" if close else ""))
    base = _rgb_array(image)
    heat = torch.as_tensor(np.asarray(heatmap.detach().cpu() if torch.is_tensor(heatmap) else heatmap), dtype=torch.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be (h, w), got shape {tuple(heat.shape)}")
    if tuple(heat.shape) != base.shape[:2]:
        heat = torch.nn.functional.interpolate(heat[None, None], size=base.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    colours = matplotlib.colormaps[colormap](heat.clamp(0, 1).numpy())[..., :3]
    blended = (1 - alpha) * base + alpha * colours
    return Image.fromarray(np.round(blended * 255).astype(np.uint8))  # (H, W, 3) uint8: RGB
