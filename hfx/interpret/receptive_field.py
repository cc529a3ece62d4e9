"""The receptive field of a layer of a convolutional network, computed from its convolutions and pools.

One forward pass runs under a ``TorchFunctionMode`` that follows every tensor from the input: a
convolution or pool with kernel k, stride s and dilation d turns a field of size r with jump j (the input
pixels between two neighbouring units) into ``r + (k - 1) * d * j`` with jump ``j * s``; any other operation
(activations, norms, residual sums, concatenations) keeps the largest field of its inputs. That is the
classical recurrence (Araujo et al. 2019, "Computing receptive fields of convolutional neural networks")
applied along every path of the graph, so a residual block's shortcut does not add its stride twice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hfx.interpret._inspect import hooks, submodule

_CONVOLUTIONS = {"conv2d"}
_POOLS = {"max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "lp_pool2d"}
_GLOBAL = {"adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_max_pool2d", "adaptive_max_pool2d_with_indices"}
#: operations that move pixels in ways the recurrence does not cover: a field through them is not reported.
_UNSUPPORTED = {"interpolate", "upsample", "pixel_shuffle", "pixel_unshuffle", "conv_transpose2d", "unfold", "fold",
                "grid_sample", "conv1d", "conv3d", "roll"}


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[-1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _argument(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    value = kwargs.get(name, args[index] if len(args) > index else None)
    return default if value is None else value


class _Field:
    """(size, jump) per spatial axis; ``size`` None once a global pool has seen the whole input; ``why`` names
    an operation the recurrence cannot follow."""

    __slots__ = ("size", "jump", "why")

    def __init__(self, size, jump, why=None):
        self.size, self.jump, self.why = size, jump, why


class _FieldTracker(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.fields: dict[int, _Field] = {}
        self._alive: list[torch.Tensor] = []  # keeps ids unique while the pass runs

    def tag(self, tensor: torch.Tensor, field: _Field) -> None:
        self.fields[id(tensor)] = field
        self._alive.append(tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        found = [self.fields[id(t)] for t in _tensors((args, kwargs)) if id(t) in self.fields]
        if not found:
            return out
        field = self._combine(found)
        name = getattr(func, "__name__", "")
        if field.why is None and field.size is not None:
            if name in _CONVOLUTIONS:
                kernel = tuple(args[1].shape[2:]) if len(args) > 1 else tuple(kwargs["weight"].shape[2:])
                stride = _pair(_argument(args, kwargs, 3, "stride", 1))
                dilation = _pair(_argument(args, kwargs, 5, "dilation", 1))
                field = self._grow(field, kernel, stride, dilation)
            elif name in _POOLS:
                index = 2 if name == "lp_pool2d" else 1
                kernel = _pair(_argument(args, kwargs, index, "kernel_size", 1))
                stride = _pair(_argument(args, kwargs, index + 1, "stride", kernel))
                dilation = _pair(_argument(args, kwargs, 4, "dilation", 1)) if "max" in name else (1, 1)
                field = self._grow(field, kernel, stride, dilation)
            elif name in _GLOBAL:
                field = _Field(None, None)
            elif name in _UNSUPPORTED:
                field = _Field(None, None, why=name)
        for tensor in _tensors(out):
            self.tag(tensor, field)
        return out

    @staticmethod
    def _combine(fields: list[_Field]) -> _Field:
        for f in fields:
            if f.why is not None or f.size is None:
                return f
        return _Field(tuple(max(f.size[i] for f in fields) for i in range(2)),
                      tuple(max(f.jump[i] for f in fields) for i in range(2)))

    @staticmethod
    def _grow(field: _Field, kernel, stride, dilation) -> _Field:
        size = tuple(field.size[i] + (kernel[i] - 1) * dilation[i] * field.jump[i] for i in range(2))
        return _Field(size, tuple(field.jump[i] * stride[i] for i in range(2)))


def _tensors(tree) -> list[torch.Tensor]:
    if torch.is_tensor(tree):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _input_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d: receptive_field is for convolutional networks")


def receptive_field(model: nn.Module, layer: str, image_size: int = 224) -> tuple[int, int]:
    """The receptive field of one unit of ``layer``'s output, in input pixels.

    Args:
        model: a convolutional network (timm or transformers CNNs, ``nn.Sequential`` stacks).
        layer: the module name (``"layer3"``, ``"features.10"``).
        image_size: the side of the square input traced (the result does not depend on it as long as no
            map shrinks to nothing; channels come from the first ``nn.Conv2d``).

    Returns:
        ``(size, stride)``: the side of the square of input pixels one unit sees (its theoretical field,
        before border clipping), and the input distance between neighbouring units. Axes that differ come
        back as ``((size_h, size_w), (stride_h, stride_w))``.

    Raises:
        ValueError: no such layer, a layer after global pooling (it sees the whole image), or an operation
            on the path the recurrence does not follow (upsampling, transposed convolution, ...).
    """
    module = submodule(model, layer)
    pixels = torch.zeros(1, _input_channels(model), image_size, image_size,
                         device=next((p.device for p in model.parameters()), None),
                         dtype=next((p.dtype for p in model.parameters()), torch.float32))
    outputs: list[torch.Tensor] = []
    training = [(m, m.training) for m in model.modules()]
    tracker = _FieldTracker()
    tracker.tag(pixels, _Field((1, 1), (1, 1)))
    try:
        model.eval()
        with hooks(module.register_forward_hook(lambda mod, args, out: outputs.extend(_tensors(out)[:1]))), \
                torch.no_grad(), tracker:
            model(pixels)
    finally:
        for m, flag in training:
            m.training = flag
    if not outputs:
        raise ValueError(f"layer {layer!r} returned no tensor in the forward pass")
    field = tracker.fields.get(id(outputs[-1]))
    if field is None:
        raise ValueError(f"layer {layer!r}: its output does not depend on the input")
    if field.why is not None:
        raise ValueError(f"layer {layer!r}: the path to it goes through {field.why!r}, which receptive_field does not follow")
    if field.size is None:
        raise ValueError(f"layer {layer!r} comes after a global pool: every unit sees the whole image")
    size, jump = field.size, field.jump
    return (size[0], jump[0]) if size[0] == size[1] and jump[0] == jump[1] else (size, jump)
