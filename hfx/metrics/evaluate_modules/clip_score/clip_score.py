"""hfx `clip_score` as an `evaluate` module: `evaluate.load(hfx.metrics.module_path("clip_score"))`.

The implementation is hfx.metrics.modules.CLIPScoreMetric; this script only exposes it to the loader.
"""

from hfx.metrics.modules import CLIPScoreMetric  # noqa: F401
