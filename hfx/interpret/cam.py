"""Class activation maps: CAM (Zhou et al. 2016), Grad-CAM and guided Grad-CAM (Selvaraju et al. 2017).

All three weigh the channels of one layer's feature map A (B, K, h, w): CAM with the classifier's weights
(the model must end in global average pooling + one linear layer), Grad-CAM with the spatial mean of
d logit / dA. A ViT's tokens are first laid out as a map (:class:`~hfx.interpret._inspect.TokenGrid`).
The map is rectified, upsampled bilinearly to the input size and (by the caller) min-max normalised per
image: the conventions of pytorch-grad-cam's ``GradCAM``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hfx.interpret._inspect import ImageBatch, TargetLayer, hooks, logits_of, target_logits, trace
from hfx.interpret.gradients import rectified_gradient


def layer_output_and_gradient(model: nn.Module, batch: ImageBatch, target, layer: TargetLayer):
    """The layer's output as a map (B, K, h, w), d logit[target] / d that output (same shape), the logits and
    the targets. The input is made to require grad so that a frozen model still has a graph."""
    captured: list[torch.Tensor] = []
    with hooks(layer.module.register_forward_hook(lambda module, args, output: captured.append(output))):
        logits = logits_of(model(batch.pixels.detach().requires_grad_()))
    if not captured or not torch.is_tensor(captured[-1]):
        raise ValueError(f"layer {layer.name!r} returned no tensor in the forward pass")
    score, chosen = target_logits(logits, target, batch)
    output = captured[-1]  # a module called several times: its last call, as pytorch-grad-cam's last gradient
    (grad,) = torch.autograd.grad(score.sum(), output)
    return layer.as_map(output), layer.as_map(grad), logits, chosen


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W), bilinear with half-pixel centres (OpenCV's ``INTER_LINEAR``)."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def gradcam(model: nn.Module, batch: ImageBatch, target, layer: TargetLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM: ``relu(sum_k mean_ij(dy/dA_k) * A_k)``. Returns the map at the layer's resolution (B, h, w),
    upsampled to the input (B, H, W), and the targets."""
    activation, grad, _, chosen = layer_output_and_gradient(model, batch, target, layer)
    weights = grad.mean((2, 3), keepdim=True)
    low = F.relu((weights * activation).sum(1))
    return low, upsample(low, batch.pixels.shape[-2:]), chosen


def classifier_weights(model: nn.Module, batch: ImageBatch, layer: TargetLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The (classes, K) weights of the linear layer that maps the global average of ``layer``'s map to the
    logits, and that map. Checked on the batch: a head that is anything else is a ValueError."""
    records, output = trace(model, lambda: model(batch.pixels))
    logits = logits_of(output)
    linears = [r for r in records if isinstance(r.module, nn.Linear) and r.output.shape == logits.shape]
    maps = [layer.as_map(r.output) for r in records if r.module is layer.module]
    if linears and maps:
        head = linears[-1].module
        pooled = maps[-1].float().mean((2, 3))
        if pooled.shape[1] == head.in_features:
            expected = F.linear(pooled, head.weight.float(), None if head.bias is None else head.bias.float())
            if torch.allclose(expected, logits.float(), rtol=1e-3, atol=1e-4 * (1 + float(logits.abs().max()))):
                return head.weight.detach().float(), maps[-1].float()
    raise ValueError(f"method 'cam' needs a model whose logits are one linear layer on the global average of "
                     f"{layer.name!r} (Zhou et al. 2016); {type(model).__name__} is not: use 'gradcam'")


def cam(model: nn.Module, batch: ImageBatch, target, layer: TargetLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CAM: ``relu(sum_k W[c, k] * A_k)`` with A the map before global pooling. Returns (B, h, w), (B, H, W)
    and the targets."""
    weights, activation = classifier_weights(model, batch, layer)
    if activation.shape[-2:].numel() == 1:
        raise ValueError(f"method 'cam': the map before global pooling ({layer.name!r}) is 1x1 for a "
                         f"{tuple(batch.pixels.shape[-2:])} input, so there is nothing to localise; use 'gradcam' "
                         "(it picks the last map larger than 1x1) or a larger input")
    with torch.no_grad():
        _, chosen = target_logits(logits_of(model(batch.pixels)), target, batch)
    low = F.relu(torch.einsum("bk,bkhw->bhw", weights[chosen], activation))
    return low, upsample(low, batch.pixels.shape[-2:]), chosen


def guided_gradcam(model: nn.Module, batch: ImageBatch, target, layer: TargetLayer, normalise) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided Grad-CAM: guided backpropagation (B, C, H, W) times the normalised, upsampled Grad-CAM map."""
    _, heat, chosen = gradcam(model, batch, target, layer)
    guided, _ = rectified_gradient(model, batch, chosen, guided=True)
    return guided * normalise(heat)[:, None], chosen
