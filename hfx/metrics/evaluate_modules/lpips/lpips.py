"""hfx `lpips` as an `evaluate` module: `evaluate.load(hfx.metrics.module_path("lpips"))`.

The implementation is hfx.metrics.modules.LearnedPerceptualImagePatchSimilarity; this script only exposes it to the loader.
"""

from hfx.metrics.modules import LearnedPerceptualImagePatchSimilarity  # noqa: F401
