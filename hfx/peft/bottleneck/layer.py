"""The bottleneck adapter layer: a targeted sublayer followed by ``h + up(act(down(h)))``."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from hfx.peft.bottleneck.config import BottleneckAdapterConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapterLayer(nn.Module, BaseTunerLayer):
    """Wraps a linear sublayer; its output ``h`` (shape ``(..., out_features)``) becomes
    ``h + sum_a up_a(dropout_a(act_a(down_a(h))))`` over the active adapters ``a``."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_act", "bottleneck_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckAdapterConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict()
        self.bottleneck_up = nn.ModuleDict()
        self.bottleneck_act = nn.ModuleDict()
        self.bottleneck_dropout = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.out_features = base.out_features
        elif isinstance(base, Conv1D):
            self.out_features = base.weight.shape[1]
        else:
            raise ValueError(
                f"bottleneck adapters follow linear sublayers (torch.nn.Linear, transformers Conv1D), not "
                f"{type(base).__name__}; remove it from target_modules"
            )
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BottleneckAdapterConfig, **kwargs) -> None:
        down = nn.Linear(self.out_features, config.bottleneck_size)
        up = nn.Linear(config.bottleneck_size, self.out_features)
        for projection in (down, up):
            nn.init.normal_(projection.weight, std=config.init_std)
            nn.init.zeros_(projection.bias)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        self.bottleneck_act[adapter_name] = _ACTIVATIONS[config.non_linearity]()
        self.bottleneck_dropout[adapter_name] = nn.Dropout(config.adapter_dropout)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError("bottleneck adapters are nonlinear and cannot be merged into the base weights; use unload()")

    def unmerge(self) -> None:
        pass  # nothing is ever merged

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hidden = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return hidden
        result = hidden
        for name in self.active_adapters:
            if name not in self.bottleneck_down:
                continue
            down = self.bottleneck_down[name]
            h = hidden.to(down.weight.dtype)
            update = self.bottleneck_up[name](self.bottleneck_dropout[name](self.bottleneck_act[name](down(h))))
            result = result + update.to(hidden.dtype)
        return result

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()
