"""Gradient attributions: saliency (Simonyan et al. 2014), SmoothGrad (Smilkov et al. 2017), guided
backpropagation (Springenberg et al. 2015) and the deconvnet (Zeiler & Fergus 2014).

Each returns input-space attributions: (B, C, H, W) for images, (B, T, D) over the input embeddings for text.
Gradients are taken with ``torch.autograd.grad`` with respect to a copy of the input, so nothing accumulates
in the parameters' ``.grad``.

Guided backpropagation and the deconvnet change how gradients pass through activation modules, for the
duration of one backward pass (hooks, removed afterwards). Handled activations: ``nn.ReLU``, ``nn.ReLU6``,
``nn.LeakyReLU``, ``nn.ELU``, ``nn.GELU``, ``nn.SiLU``, ``nn.Mish``, ``nn.Softplus`` and the activation modules
of ``transformers.activations`` (``GELUActivation``, ...). With ``g`` the gradient arriving at the activation's
output and ``x`` its input, guided backprop passes ``f'(x) * max(g, 0)`` (for ReLU: the original
``1[x > 0] * max(g, 0)``), the deconvnet ``max(g, 0)``. Activations applied as functions
(``F.relu(x)`` inside a ``forward``) are not seen: their gradient stays the plain one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hfx.interpret._inspect import (
    ImageBatch,
    TextBatch,
    hooks,
    input_embeddings,
    logits_of,
    target_logits,
)

#: activation module -> the same function without in-place writes (its derivative is what guided backprop keeps).
ACTIVATIONS: dict[type, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    nn.ReLU: lambda m, x: F.relu(x),
    nn.ReLU6: lambda m, x: F.relu6(x),
    nn.LeakyReLU: lambda m, x: F.leaky_relu(x, m.negative_slope),
    nn.ELU: lambda m, x: F.elu(x, m.alpha),
    nn.GELU: lambda m, x: F.gelu(x, approximate=m.approximate),
    nn.SiLU: lambda m, x: F.silu(x),
    nn.Mish: lambda m, x: F.mish(x),
    nn.Softplus: lambda m, x: F.softplus(x, m.beta, m.threshold),
}


def activation_function(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The out-of-place function an activation module computes, or None for a module that is not one."""
    for kind, fn in ACTIVATIONS.items():
        if isinstance(module, kind):
            return lambda x, m=module, fn=fn: fn(m, x)
    if type(module).__module__ == "transformers.activations":  # stateless and out of place; .forward skips the hooks
        return module.forward
    return None


class _RectifiedGradient(torch.autograd.Function):
    """Identity on the activation's output; backward sends ``rule(x, g)`` to the activation's input ``x``
    instead of the activation's own gradient."""

    @staticmethod
    def forward(ctx, x, out, fn, guided):
        ctx.save_for_backward(x)
        ctx.fn, ctx.guided = fn, guided
        return out.clone()  # a fresh tensor: later in-place ops on it are the model's own business

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        positive = grad.clamp(min=0)
        if not ctx.guided:  # deconvnet: the backward ReLU sees only the signal from above
            return positive, None, None, None
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            (local,) = torch.autograd.grad(ctx.fn(leaf), leaf, positive)
        return local, None, None, None


def rectified_activations(model: nn.Module, guided: bool, handles: list) -> int:
    """Hook every activation module of ``model`` (see the module docstring); returns how many. The hook
    handles are appended to ``handles`` for the caller to remove."""
    count = 0
    for module in model.modules():
        fn = activation_function(module)
        if fn is None:
            continue
        inputs: list[torch.Tensor] = []

        def before(mod, args, inputs=inputs):
            inputs.append(args[0])
            if getattr(mod, "inplace", False):  # keep x: an in-place activation would overwrite it
                return (args[0].clone(), *args[1:])
            return None

        def after(mod, args, output, inputs=inputs, fn=fn):
            return _RectifiedGradient.apply(inputs.pop(), output, fn, guided)

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        count += 1
    return count


# ---------------------------------------------------------------------------------------------- images
def image_gradient(model: nn.Module, batch: ImageBatch, target) -> tuple[torch.Tensor, torch.Tensor]:
    """d logit[target] / d pixels (B, C, H, W) and the targets (B,)."""
    pixels = batch.pixels.detach().requires_grad_()
    score, chosen = target_logits(logits_of(model(pixels)), target, batch)
    (grad,) = torch.autograd.grad(score.sum(), pixels)
    return grad, chosen


def saliency(model: nn.Module, batch: ImageBatch, target) -> tuple[torch.Tensor, torch.Tensor]:
    """|d logit / d pixels| (B, C, H, W): captum's ``Saliency(model).attribute(x, target, abs=True)``."""
    grad, chosen = image_gradient(model, batch, target)
    return grad.abs(), chosen


def smoothgrad(model: nn.Module, batch: ImageBatch, target, samples: int = 25, noise: float = 0.15,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of |gradient| over ``samples`` copies of the input with Gaussian noise of standard deviation
    ``noise * (max - min)`` of each image (Smilkov et al.'s 10-20 %), drawn from ``seed``. The target is
    fixed on the clean input."""
    _, chosen = target_logits(logits_of(model(batch.pixels)), target, batch)
    pixels = batch.pixels
    spread = (pixels.flatten(1).amax(1) - pixels.flatten(1).amin(1)).view(-1, 1, 1, 1) * noise
    generator = torch.Generator(device=pixels.device).manual_seed(seed)
    total = torch.zeros_like(pixels)
    for _ in range(samples):
        noisy = pixels + spread * torch.randn(pixels.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
        grad, _ = image_gradient(model, ImageBatch(noisy), chosen)
        total += grad.abs()
    return total / samples, chosen


def rectified_gradient(model: nn.Module, batch: ImageBatch, target, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided backpropagation (``guided``) or the deconvnet: the signed input-space signal (B, C, H, W)."""
    with hooks() as handles:
        if rectified_activations(model, guided, handles) == 0:
            name = "guided_backprop" if guided else "deconvnet"
            raise ValueError(f"method {name!r}: {type(model).__name__} has no activation modules to rectify "
                             "(nn.ReLU, nn.GELU, ...); its activations are functions, so the result would be the plain "
                             "gradient: use 'saliency'")
        return image_gradient(model, batch, target)


# ---------------------------------------------------------------------------------------------- text
def embedding_gradient(model: nn.Module, batch: TextBatch, target, noise=None):
    """d logit[target] / d input embeddings (B, T, D), the targets (B,), and the clean embeddings.

    The model is called on its ``input_ids`` (so that it still sees padding, as a Llama classifier does to find
    each row's last token); a hook on the input embedding swaps its output for a leaf (plus ``noise(clean)``)."""
    swapped: dict[str, torch.Tensor] = {}

    def swap(module, args, output):
        swapped["clean"] = output.detach()
        swapped["leaf"] = (swapped["clean"] + (0 if noise is None else noise(swapped["clean"]))).requires_grad_()
        return swapped["leaf"]

    with hooks(input_embeddings(model).register_forward_hook(swap)):
        output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.extra)
    score, chosen = target_logits(logits_of(output), target, batch)
    (grad,) = torch.autograd.grad(score.sum(), swapped["leaf"])
    return grad, chosen, swapped["clean"]


def text_saliency(model: nn.Module, batch: TextBatch, target) -> tuple[torch.Tensor, torch.Tensor]:
    """|d logit / d embeddings| (B, T, D); the token score is its L2 norm over D."""
    grad, chosen, _ = embedding_gradient(model, batch, target)
    return grad.abs(), chosen


def text_smoothgrad(model: nn.Module, batch: TextBatch, target, samples: int = 25, noise: float = 0.15,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """SmoothGrad on the input embeddings: noise of ``noise`` times the (max - min) of each row's embeddings."""
    _, chosen, clean = embedding_gradient(model, batch, target)
    spread = (clean.flatten(1).amax(1) - clean.flatten(1).amin(1)).view(-1, 1, 1) * noise
    generator = torch.Generator(device=clean.device).manual_seed(seed)

    def draw(embeds):
        return spread * torch.randn(embeds.shape, generator=generator, device=embeds.device, dtype=embeds.dtype)

    total = torch.zeros_like(clean)
    for _ in range(samples):
        grad, _, _ = embedding_gradient(model, batch, chosen, draw)
        total += grad.abs()
    return total / samples, chosen
