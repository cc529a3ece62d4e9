"""Datasets: the embedded ones (no download) and one loader for every other source."""

from hfx.data.builtin import BUILTIN_DATASETS, DIGIT_NAMES, builtin_dataset, digits, stdlib_files, stdlib_text
from hfx.data.loading import load

__all__ = ["BUILTIN_DATASETS", "DIGIT_NAMES", "builtin_dataset", "digits", "load", "stdlib_files", "stdlib_text"]
