"""hfx `inception_score` as an `evaluate` module: `evaluate.load(hfx.metrics.module_path("inception_score"))`.

The implementation is hfx.metrics.modules.InceptionScore; this script only exposes it to the loader.
"""

from hfx.metrics.modules import InceptionScore  # noqa: F401
