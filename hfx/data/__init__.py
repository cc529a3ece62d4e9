"""Datasets: the embedded ones (no download) and one loader for every other source."""

from hfx.data.builtin import (
    BUILTIN_DATASETS,
    CAPTION_ATTRIBUTES,
    DIGIT_NAMES,
    HELDOUT_COMBINATIONS,
    STROKE_DOMAINS,
    builtin_dataset,
    caption_for,
    digits,
    digits_captions,
    digits_strokes,
    stdlib_files,
    stdlib_text,
)
from hfx.data.loading import load

__all__ = ["BUILTIN_DATASETS", "CAPTION_ATTRIBUTES", "DIGIT_NAMES", "HELDOUT_COMBINATIONS", "STROKE_DOMAINS",
           "builtin_dataset", "caption_for", "digits", "digits_captions", "digits_strokes", "load", "stdlib_files",
           "stdlib_text"]
