"""LPIPS (Zhang et al. 2018): a perceptual distance between two images from a network's feature maps.

For each chosen layer of a trunk network: unit-normalise the feature vector at every position (over
channels), square the difference between the two images, weight the channels with a learned 1x1
convolution (a "linear head"), average over positions; the distance is the sum over layers. Inputs are
images in [-1, 1].

The trunk is torchvision's AlexNet or VGG-16 (the paper's) or any timm model (its ``features_only``
stages). Nothing is downloaded: trunk weights and heads come from local files. The paper's heads
(``lpips`` package, ``weights/v0.1/alex.pth``, keys ``lin<i>.model.1.weight``) load as they are.
Without heads every channel weighs 1 (the paper's unlearned baseline): the module warns and records it.
"""

from __future__ import annotations

import os
import re
import warnings

import torch
from torch import nn

from hfx.metrics.extractors import RANDOM_INIT, file_fingerprint, load_state_dict

# The paper's input scaling (ImageNet statistics expressed for inputs in [-1, 1]).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# Where each trunk is tapped: the ReLU outputs relu1..relu5 (indices into torchvision's `features`).
_TORCHVISION_TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
UNLEARNED_HEADS = "none (every channel weighs 1: unlearned baseline)"


def _normalise_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class _TorchvisionTrunk(nn.Module):
    """AlexNet or VGG-16 ``features``, returning the activations at the five LPIPS taps."""

    def __init__(self, net: str):
        super().__init__()
        from torchvision import models

        self.taps = _TORCHVISION_TAPS[net]
        # Built on the meta device, then only the convolutions materialised: the classifier's 100M+
        # fully-connected weights would take seconds to initialise and are never used.
        with torch.device("meta"):
            features = (models.alexnet if net == "alex" else models.vgg16)(weights=None).features
        self.layers = features[: self.taps[-1] + 1].to_empty(device="cpu")
        for layer in self.layers:
            if isinstance(layer, nn.Conv2d):
                layer.reset_parameters()
        self.channels = [self._out_channels(tap) for tap in self.taps]

    def _out_channels(self, tap: int) -> int:
        return [m for m in self.layers[: tap + 1] if isinstance(m, nn.Conv2d)][-1].out_channels

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        # A whole torchvision model ("features.0.weight", "classifier...") or just its features ("0.weight").
        features = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier")}
        features = {k: v for k, v in features.items() if int(k.split(".")[0]) <= self.taps[-1]}
        self.layers.load_state_dict(features)

    def forward(self, x):
        outputs = []
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index in self.taps:
                outputs.append(x)
        return outputs


class _TimmTrunk(nn.Module):
    def __init__(self, model_name: str):
        super().__init__()
        import timm

        try:
            self.model = timm.create_model(model_name, pretrained=False, features_only=True)
        except RuntimeError as err:
            raise ValueError(f"timm cannot build {model_name!r} with features_only: {err}") from None
        self.channels = list(self.model.feature_info.channels())

    def load_weights(self, state):
        self.model.load_state_dict(state, strict=False)

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    """``lpips(images_a, images_b) -> [B]`` perceptual distances; images ``[B, 3 or 1, H, W]`` in [-1, 1].

    Args:
        net: ``"alex"``, ``"vgg"`` or ``"timm:<model name>"``.
        trunk_weights: local weights of the trunk (a torchvision ``alexnet``/``vgg16`` state dict, or a
            timm one); ``None``: random trunk (warns, recorded as ``"random-init"``).
        heads: local file of the linear heads (the paper's ``.pth`` or a :meth:`save_heads` file);
            ``None``: all-ones heads (warns, recorded as unlearned).
    """

    def __init__(self, net: str = "alex", trunk_weights: str | os.PathLike | None = None,
                 heads: str | os.PathLike | None = None):
        super().__init__()
        if net in _TORCHVISION_TAPS:
            self.trunk = _TorchvisionTrunk(net)
        elif net.startswith("timm:"):
            self.trunk = _TimmTrunk(net.removeprefix("timm:"))
        else:
            raise ValueError(f"unknown LPIPS trunk {net!r}; use 'alex', 'vgg' or 'timm:<model name>'")
        self.net = net
        if trunk_weights is not None:
            self.trunk.load_weights(load_state_dict(trunk_weights))
        self.trunk_weights = file_fingerprint(trunk_weights) if trunk_weights else RANDOM_INIT
        self.heads = nn.ParameterList([nn.Parameter(torch.ones(c), requires_grad=False) for c in self.trunk.channels])
        if heads is not None:
            self.load_heads(heads)
        self.head_weights = file_fingerprint(heads) if heads else UNLEARNED_HEADS
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        for missing, what in ((trunk_weights is None, "a random trunk"), (heads is None, "no learned heads")):
            if missing:
                warnings.warn(f"LPIPS({net}) uses {what}: distances are not the paper's LPIPS", stacklevel=2)
        self.requires_grad_(False)
        self.eval()

    def load_heads(self, path: str | os.PathLike) -> None:
        """Read linear heads: keys ``lin<i>.model.1.weight`` (the paper's files) or ``lin<i>.weight``."""
        state = load_state_dict(path)
        found = {}
        for key, value in state.items():
            match = re.fullmatch(r"lin(\d+)(?:\.model\.1)?\.weight", key)
            if match:
                found[int(match.group(1))] = value.flatten()
        if sorted(found) != list(range(len(self.heads))):
            raise ValueError(f"{path} has heads {sorted(found)}; LPIPS({self.net}) needs lin0..lin{len(self.heads) - 1}")
        for index, head in enumerate(self.heads):
            if found[index].numel() != head.numel():
                raise ValueError(f"{path}: head lin{index} has {found[index].numel()} channels, the trunk has "
                                 f"{head.numel()}")
            head.data.copy_(found[index])

    def save_heads(self, path: str | os.PathLike) -> None:
        """Write the heads as ``.safetensors`` with the paper's key names (``lin<i>.model.1.weight``)."""
        from safetensors.torch import save_file

        save_file({f"lin{i}.model.1.weight": h.detach().view(1, -1, 1, 1).contiguous().cpu()
                   for i, h in enumerate(self.heads)}, str(path))

    def describe(self) -> dict[str, str]:
        return {"lpips_net": self.net, "trunk_weights": self.trunk_weights, "heads": self.head_weights}

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be [B, 3 or 1, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        images = images.to(self.shift.device, torch.float32)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return (images - self.shift) / self.scale

    @torch.no_grad()
    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
        if images_a.shape != images_b.shape:
            raise ValueError(f"image batches differ in shape: {tuple(images_a.shape)} vs {tuple(images_b.shape)}")
        distance = 0
        for feats_a, feats_b, head in zip(self.trunk(self._prepare(images_a)), self.trunk(self._prepare(images_b)),
                                          self.heads):
            squared = (_normalise_channels(feats_a) - _normalise_channels(feats_b)) ** 2
            distance = distance + (squared * head.view(1, -1, 1, 1)).sum(dim=1).mean(dim=(1, 2))
        return distance
