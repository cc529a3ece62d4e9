"""hfx `knn_accuracy` as an `evaluate` module: `evaluate.load(hfx.metrics.module_path("knn_accuracy"))`.

The implementation is hfx.metrics.modules.KNNAccuracy; this script only exposes it to the loader.
"""

from hfx.metrics.modules import KNNAccuracy  # noqa: F401
