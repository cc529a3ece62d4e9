"""The errors a run can end with; each message is one line that names the key, the path or the value."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe that cannot run: unknown key, wrong type, a value out of range, missing value."""


class ResumeError(ConfigError):
    """A resume that could not be exact (an incomplete checkpoint, a changed config, another task's
    checkpoint): refused with the reason, never silently approximate."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite and ``train.nan_policy`` is ``stop``."""
