"""hfx `zero_shot_accuracy` as an `evaluate` module: `evaluate.load(hfx.metrics.module_path("zero_shot_accuracy"))`.

The implementation is hfx.metrics.modules.ZeroShotAccuracy; this script only exposes it to the loader.
"""

from hfx.metrics.modules import ZeroShotAccuracy  # noqa: F401
