"""hfx `precision_recall` as an `evaluate` module: `evaluate.load(hfx.metrics.module_path("precision_recall"))`.

The implementation is hfx.metrics.modules.PrecisionRecallMetric; this script only exposes it to the loader.
"""

from hfx.metrics.modules import PrecisionRecallMetric  # noqa: F401
