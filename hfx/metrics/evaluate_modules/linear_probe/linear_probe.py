"""hfx `linear_probe` as an `evaluate` module: `evaluate.load(hfx.metrics.module_path("linear_probe"))`.

The implementation is hfx.metrics.modules.LinearProbeAccuracy; this script only exposes it to the loader.
"""

from hfx.metrics.modules import LinearProbeAccuracy  # noqa: F401
