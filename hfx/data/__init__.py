"""Datasets: the embedded ones (no download) and one loader for every other source."""

from hfx.data.builtin import (
    BUILTIN_DATASETS,
    DIGIT_NAMES,
    STROKE_DOMAINS,
    builtin_dataset,
    digits,
    digits_strokes,
    stdlib_files,
    stdlib_text,
)
from hfx.data.loading import load

__all__ = ["BUILTIN_DATASETS", "DIGIT_NAMES", "STROKE_DOMAINS", "builtin_dataset", "digits", "digits_strokes", "load",
           "stdlib_files", "stdlib_text"]
