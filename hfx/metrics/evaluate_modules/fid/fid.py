"""hfx `fid` as an `evaluate` module: `evaluate.load(hfx.metrics.module_path("fid"))`.

The implementation is hfx.metrics.modules.FrechetInceptionDistance; this script only exposes it to the loader.
"""

from hfx.metrics.modules import FrechetInceptionDistance  # noqa: F401
