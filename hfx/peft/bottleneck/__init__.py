"""Bottleneck adapters (Houlsby et al., 2019) as a peft method."""

from hfx.peft.bottleneck.config import BottleneckAdapterConfig
from hfx.peft.bottleneck.layer import BottleneckAdapterLayer
from hfx.peft.bottleneck.model import BottleneckAdapterModel

__all__ = ["BottleneckAdapterConfig", "BottleneckAdapterLayer", "BottleneckAdapterModel"]
