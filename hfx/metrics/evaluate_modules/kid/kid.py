"""hfx `kid` as an `evaluate` module: `evaluate.load(hfx.metrics.module_path("kid"))`.

The implementation is hfx.metrics.modules.KernelInceptionDistance; this script only exposes it to the loader.
"""

from hfx.metrics.modules import KernelInceptionDistance  # noqa: F401
