"""Measuring programs for the attributes of the ``digits-captions`` images: size, position and stroke thickness.

Each ``measure_<attribute>(pixels)`` takes greyscale images (B, 1, H, W) or (B, H, W), ink bright, values in
``[low, high]`` ([-1, 1] as hfx's models make them), and returns the (B,) id of the attribute's value
(the index into its names in :data:`DIGIT_ATTRIBUTES`), or -1 for an image without ink (never correct).

The thresholds come from how :func:`hfx.data.digits_captions` draws a digit on a canvas of side ``C`` (given
here at ``C = 32``; everything scales with ``C / 32``). This leaf cannot import the data module, so the
construction's numbers are restated here, and ``tests/test_digit_captions.py`` checks that the two agree:

- The digit is thinned to a skeleton, which is fitted to a box 12 px (``small``) or 20 px (``large``) high,
  and redrawn with a round pen: ink is every pixel nearer than 0.8 px (``thin``) or 1.9 px (``thick``) to the
  skeleton, so strokes are about 1.6 or 3.8 px wide whatever the digit and its size.
- ``size``: a small digit's ink is at most 12 + 2 x 1.9 = 15.8 px high, a large one's at least 20 px; the
  threshold is their midpoint, 17.9 px.
- ``position``: the skeleton's centre of mass is put at ``C / 4`` (left) or ``3 C / 4`` (right), moved
  inwards where the ink would come within 1 px of the border (a large wide digit: the ink's centre then stays
  about 3 px or more from the middle: 11.2 and 18.9 px at the extremes of the real images); the threshold is
  the middle of the canvas.
- ``thickness``: :func:`~hfx.metrics.stroke_width` of a long straight band ``w`` px wide is about
  ``w / 4 + 0.5``, and at least 1 (every ink pixel of a thin stroke touches the background): 1.0 for thin
  pens and 1.45 for thick ones; the threshold is their midpoint, 1.23 px.

Ink is the pixels above the middle of the value range, less specks: connected pieces (8-neighbour) with fewer
than a tenth of the largest piece's pixels, which a generated image may have and a drawn digit does not.
"""

from __future__ import annotations

import numpy as np
import torch

from hfx.metrics.strokes import ink_masks, stroke_width

SIZE_NAMES = ("small", "large")
POSITION_NAMES = ("left", "right")
THICKNESS_NAMES = ("thin", "thick")

#: How ``digits-captions`` draws on a 32-px canvas (both scale with the canvas): the skeleton's box height of
#: each size and the pen radius of each thickness, in px.
GLYPH_HEIGHTS = {"small": 12, "large": 20}
PEN_RADII = {"thin": 0.8, "thick": 1.9}


def _ink(pixels: torch.Tensor | np.ndarray, low: float, high: float) -> np.ndarray:
    """(B, 1, H, W) or (B, H, W) -> (B, H, W) bool: ink pixels, specks removed."""
    from scipy import ndimage

    ink = ink_masks(pixels, low, high)
    for mask in ink:  # in place, image by image
        pieces, count = ndimage.label(mask, structure=np.ones((3, 3)))
        if count > 1:
            sizes = np.bincount(pieces.ravel())[1:]
            mask &= np.isin(pieces, 1 + np.flatnonzero(sizes >= sizes.max() / 10))
    return ink


def _ids(values: list[float | None], threshold: float) -> torch.Tensor:
    """0 below ``threshold``, 1 at or above it, -1 where there was nothing to measure."""
    return torch.tensor([-1 if v is None else int(v >= threshold) for v in values], dtype=torch.int64)


def size_threshold(image_height: int) -> float:
    """The ink height between ``small`` and ``large`` on an image of this height (17.9 px at 32)."""
    tallest_small = GLYPH_HEIGHTS["small"] + 2 * PEN_RADII["thick"]
    return (tallest_small + GLYPH_HEIGHTS["large"]) / 2 * image_height / 32


def measure_size(pixels: torch.Tensor | np.ndarray, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """(B, 1, H, W) -> (B,) int64: 0 ``small``, 1 ``large`` (ink at least :func:`size_threshold` rows high), -1 no ink."""
    ink = _ink(pixels, low, high)
    heights = []
    for mask in ink:
        rows = np.flatnonzero(mask.any(axis=1))
        heights.append(float(rows[-1] - rows[0] + 1) if rows.size else None)
    return _ids(heights, size_threshold(ink.shape[1]))


def measure_position(pixels: torch.Tensor | np.ndarray, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """(B, 1, H, W) -> (B,) int64: 0 ``left``, 1 ``right`` (ink's centre of mass right of the middle), -1 no ink."""
    ink = _ink(pixels, low, high)
    columns = np.arange(ink.shape[2]) + 0.5  # pixel centres: the middle of the image is at W / 2
    centres = [float(columns[np.nonzero(mask)[1]].mean()) if mask.any() else None for mask in ink]
    return _ids(centres, ink.shape[2] / 2)


def _band_stroke_width(width: float) -> float:
    """stroke_width of a long straight band ``width`` px wide: a quarter of it plus half a pixel, at least 1."""
    return max(1.0, width / 4 + 0.5)


def thickness_threshold(image_height: int) -> float:
    """The stroke_width between ``thin`` and ``thick`` on an image of this height (1.23 px at 32)."""
    scale = image_height / 32
    return (_band_stroke_width(2 * PEN_RADII["thin"] * scale) + _band_stroke_width(2 * PEN_RADII["thick"] * scale)) / 2


def measure_thickness(pixels: torch.Tensor | np.ndarray, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """(B, 1, H, W) -> (B,) int64: 0 ``thin``, 1 ``thick`` (:func:`~hfx.metrics.stroke_width` of the ink at least
    :func:`thickness_threshold`), -1 no ink."""
    ink = _ink(pixels, low, high)
    widths = stroke_width(ink.astype(np.float64), low=0.0, high=1.0).tolist()
    return _ids([w if w > 0 else None for w in widths], thickness_threshold(ink.shape[1]))


#: The measurable attributes of ``digits-captions``: name -> (measure, value names in id order).
DIGIT_ATTRIBUTES = {
    "size": (measure_size, SIZE_NAMES),
    "position": (measure_position, POSITION_NAMES),
    "thickness": (measure_thickness, THICKNESS_NAMES),
}
