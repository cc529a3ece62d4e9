"""Checks of the values users hand to hfx's PEFT configs and functions. Each error names the value (``where``,
e.g. ``"ReLoraConfig.prune_ratio"``), shows what was given and says what is allowed. Booleans are refused where
a count or a ratio is expected (``True`` is an ``int`` to Python, never a meaningful step count)."""

from __future__ import annotations

import math
import numbers


def check_int(where: str, value, *, minimum: int | None = None) -> int:
    """``value`` as an ``int``; a ``TypeError`` for anything but an integer, a ``ValueError`` below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}={value!r} must be an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}={value!r} must be >= {minimum}")
    return int(value)


def check_real(
    where: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` inside the given bounds (closed unless ``*_open``); a ``TypeError`` for a
    non-number, a ``ValueError`` for NaN, an infinity or a value outside the bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}={value!r} must be a number, got {type(value).__name__}")
    value = float(value)
    inside = math.isfinite(value)
    if low is not None:
        inside = inside and (value > low if low_open else value >= low)
    if high is not None:
        inside = inside and (value < high if high_open else value <= high)
    if not inside:
        raise ValueError(f"{where}={value!r} must be {_describe(low, high, low_open, high_open)}")
    return value


def _describe(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def check_choice(where: str, value, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices`` (strings), else a ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{where}={value!r} must be one of {', '.join(map(repr, choices))}")
    return value


def check_module_names(where: str, value, *, allow_regex: bool = True) -> None:
    """``None``, a regex string (when ``allow_regex``), or a list/set/tuple of module-name strings."""
    if value is None or (allow_regex and isinstance(value, str)):
        return
    if isinstance(value, (list, set, tuple)) and all(isinstance(v, str) for v in value):
        return
    kinds = "None, a regex string or a list of module names" if allow_regex else "None or a list of module names"
    raise TypeError(f"{where}={value!r} must be {kinds}")
