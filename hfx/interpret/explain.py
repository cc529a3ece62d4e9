"""``explain(model, inputs, method=...)``: one entry point for every method, on timm and transformers image
classifiers and on transformers text models (classifiers and causal LMs, hfx's included).

What it does for every call, so that no caller writes it: finds the layer to explain and a ViT's
token-to-grid reshape (:mod:`hfx.interpret._inspect`), reads the logits out of a ``ModelOutput`` or a
tuple, picks the predicted class when no target is given, turns gradients on (also under
``torch.no_grad()`` or ``torch.inference_mode()``), runs the model in eval mode, and gives the model back
as it came (modes, ``requires_grad``, ``.grad``, no hooks left).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hfx.interpret import attention as attn
from hfx.interpret import cam as cams
from hfx.interpret import gradients as grads
from hfx.interpret._inspect import (
    ImageBatch,
    TextBatch,
    as_batch,
    find_target_layer,
    logits_of,
    named_target_layer,
    preserved,
    target_logits,
    token_embedding,
    token_grid,
    trace,
)


@dataclass
class Explanation:
    """What :func:`explain` returns.

    Attributes:
        heatmaps: images: (B, H, W) at the input's resolution, each min-max normalised to [0, 1]; text:
            (B, T) token scores, normalised over each row's attended tokens (0 at padding). ``attention``
            gives every layer and head: (B, layers, heads, T, T) probabilities for text, (B, layers, heads,
            H, W) maps of the class token's attention for a ViT (each normalised).
        target: (B,) class (or, for a causal LM, next-token) ids explained.
        method: the method's name.
        layer: the module name a CAM method used (None for the others).
        attributions: the raw input-space attribution before reduction and normalisation, where the method
            has one: (B, C, H, W) for pixel methods, (B, T, D) over the input embeddings for text, (B, h, w)
            for CAM methods (the map at the layer's resolution), (B, layers, heads, N, N) for attention on a ViT.
    """

    heatmaps: torch.Tensor
    target: torch.Tensor
    method: str
    layer: str | None = None
    attributions: torch.Tensor | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Method:
    """One method: the inputs it explains, its options with their defaults, whether it takes ``layer=``."""

    run: Callable[..., Explanation]
    inputs: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    uses_layer: bool = False


def normalise(maps: torch.Tensor, dims: int = 2, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Min-max normalise each map over its last ``dims`` dimensions to [0, 1] (a constant map becomes 0);
    with ``mask`` (broadcastable to ``maps``), over the masked entries only, 0 elsewhere."""
    flat = maps.detach().float().flatten(-dims)
    keep = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.bool().expand_as(maps).flatten(-dims)
    low = flat.masked_fill(~keep, float("inf")).amin(-1, keepdim=True)
    high = flat.masked_fill(~keep, float("-inf")).amax(-1, keepdim=True)
    span = high - low
    out = torch.where(span > 0, (flat - low) / span.clamp(min=torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.masked_fill(~keep, 0.0).reshape(maps.shape)


# ---------------------------------------------------------------------------------------------- the runs
def _pixels(fn):
    """A pixel method: heatmap = max over channels of |attribution|, normalised."""
    def run(model, batch, target, layer, name, **options):
        attributions, chosen = fn(model, batch, target, **options)
        return Explanation(normalise(attributions.abs().amax(1)), chosen, name, None, attributions.detach())
    return run


def _tokens(fn):
    """A text gradient method: token score = L2 norm of the embedding attribution, normalised over the mask."""
    def run(model, batch, target, layer, name, **options):
        attributions, chosen = fn(model, batch, target, **options)
        scores = attributions.float().norm(dim=-1)
        return Explanation(normalise(scores, 1, batch.attention_mask.to(scores.device)), chosen, name, None, attributions.detach())
    return run


def _target_layer(model, batch: ImageBatch, layer: str | None, final: bool = False):
    first = batch.pixels[:1]  # the layout of one image is the layout of all
    records, _ = trace(model, lambda: model(first))
    if layer is not None:
        return named_target_layer(model, records, layer, first)
    return find_target_layer(model, records, first, final=final)


def _run_cam(fn, final=False):
    def run(model, batch, target, layer, name, **options):
        chosen_layer = _target_layer(model, batch, layer, final=final)
        low, heat, chosen = fn(model, batch, target, chosen_layer)
        return Explanation(normalise(heat), chosen, name, chosen_layer.name, low.detach())
    return run


def _run_guided_gradcam(model, batch, target, layer, name):
    chosen_layer = _target_layer(model, batch, layer)
    attributions, chosen = cams.guided_gradcam(model, batch, target, chosen_layer, normalise)
    return Explanation(normalise(attributions.abs().amax(1)), chosen, name, chosen_layer.name, attributions.detach())


def _prediction(model, batch, target) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(batch, ImageBatch):
            output = model(batch.pixels)
        else:
            output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.extra)
    return target_logits(logits_of(output).float(), target, batch)[1]


def _patch_maps(model, rows: torch.Tensor, batch: ImageBatch) -> torch.Tensor:
    """(..., N) attention over ViT tokens -> (..., H, W) maps of the patches, upsampled to the input."""
    h, w = batch.pixels.shape[-2:]
    grid = token_grid(model, rows.shape[-1], (h, w))
    lead = rows.shape[:-1]
    patches = rows[..., grid.prefix:].reshape(-1, grid.height, grid.width)
    return cams.upsample(patches, (h, w)).reshape(*lead, h, w)


def _run_attention(model, batch, target, layer, name):
    chosen = _prediction(model, batch, target)
    maps = attn.attention_maps(model, batch)
    if isinstance(batch, TextBatch):
        return Explanation(maps, chosen, name)
    grid = token_grid(model, maps.shape[-1], tuple(batch.pixels.shape[-2:]))
    heat = _patch_maps(model, attn.readout_rows(maps, batch, grid.prefix), batch)
    return Explanation(normalise(heat), chosen, name, None, maps)


def _run_rollout(model, batch, target, layer, name, head_fusion="mean"):
    if head_fusion not in attn.HEAD_FUSIONS:
        raise ValueError(f"head_fusion {head_fusion!r}: choose one of {', '.join(attn.HEAD_FUSIONS)}")
    chosen = _prediction(model, batch, target)
    maps = attn.attention_maps(model, batch)
    rolled = attn.rollout(maps, head_fusion)
    if isinstance(batch, TextBatch):
        scores = attn.readout_rows(rolled, batch, prefix=0)
        return Explanation(normalise(scores, 1, batch.attention_mask.to(scores.device)), chosen, name, None, rolled)
    grid = token_grid(model, maps.shape[-1], tuple(batch.pixels.shape[-2:]))
    heat = _patch_maps(model, attn.readout_rows(rolled, batch, grid.prefix), batch)
    return Explanation(normalise(heat), chosen, name, None, rolled)


def _by_input(image, text):
    def run(model, batch, *args, **options):
        return (image if isinstance(batch, ImageBatch) else text)(model, batch, *args, **options)
    return run


_SMOOTHGRAD = {"samples": 25, "noise": 0.15, "seed": 0}

#: method name -> what it runs; the inputs it explains; its options (with defaults); whether it takes ``layer=``.
METHODS: dict[str, Method] = {
    "saliency": Method(_by_input(_pixels(grads.saliency), _tokens(grads.text_saliency)), ("image", "text")),
    "smoothgrad": Method(_by_input(_pixels(grads.smoothgrad), _tokens(grads.text_smoothgrad)), ("image", "text"), _SMOOTHGRAD),
    "guided_backprop": Method(_pixels(lambda m, b, t: grads.rectified_gradient(m, b, t, guided=True)), ("image",)),
    "deconvnet": Method(_pixels(lambda m, b, t: grads.rectified_gradient(m, b, t, guided=False)), ("image",)),
    "cam": Method(_run_cam(cams.cam, final=True), ("image",), uses_layer=True),
    "gradcam": Method(_run_cam(cams.gradcam), ("image",), uses_layer=True),
    "guided_gradcam": Method(_run_guided_gradcam, ("image",), uses_layer=True),
    "attention": Method(_run_attention, ("image", "text")),
    "attention_rollout": Method(_run_rollout, ("image", "text"), {"head_fusion": "mean"}),
}


def _check(model: nn.Module, method: str, layer: str | None, options: dict) -> Method:
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1)
        raise ValueError(f"method {method!r} is not one of: {', '.join(METHODS)}"
                         + (f"; did you mean {close[0]!r}?" if close else ""))
    spec = METHODS[method]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise ValueError(f"method {method!r} has no option {unknown[0]!r} (its options: {allowed})")
    if layer is not None and not spec.uses_layer:
        raise ValueError(f"layer= applies to {', '.join(n for n, m in METHODS.items() if m.uses_layer)}; "
                         f"method {method!r} does not take a layer")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return spec


def explain(model: nn.Module, inputs: Any, method: str = "gradcam", target: Any = None, layer: str | None = None,
            **method_options: Any) -> Explanation:
    """Explain a model's decision on ``inputs`` with one of :data:`METHODS`.

    Args:
        model: a timm or transformers image classifier, a transformers text classifier or causal LM (hfx's
            ``HfxLMForCausalLM`` included), or any ``nn.Module`` returning logits (a tensor, a tuple starting
            with them, or an output with ``.logits``).
        inputs: images (B, C, H, W) as the model takes them (normalised), or a mapping / ``BatchEncoding``
            with ``input_ids`` (B, T) (and ``attention_mask``), or an integer tensor of token ids.
        method: ``saliency``, ``smoothgrad``, ``guided_backprop``, ``deconvnet``, ``cam``, ``gradcam``,
            ``guided_gradcam`` (images); ``saliency``, ``smoothgrad`` (text, on the input embeddings);
            ``attention``, ``attention_rollout`` (ViTs and text transformers).
        target: the class to explain: an int for every input, one per input, or None for the predicted class.
            A causal LM explains the next token after each row's last attended token.
        layer: for ``cam`` / ``gradcam`` / ``guided_gradcam``, the module name whose output is weighed
            (``"layer3"``, ``"blocks.5.norm1"``); None picks the last feature map larger than 1x1 of a CNN
            (``cam``: the one pooled) or the first norm of a ViT's last block.
        **method_options: ``smoothgrad``: ``samples=25``, ``noise=0.15`` (of the input range), ``seed=0``;
            ``attention_rollout``: ``head_fusion="mean"`` (or ``"max"``, ``"min"``).

    Returns:
        An :class:`Explanation`: ``heatmaps`` (B, H, W) in [0, 1] for images, (B, T) for text.

    Raises:
        ValueError: an unknown method or option (with the closest name), a method that does not apply to
            these inputs or this model, a target out of range, a layer the model does not have.
    """
    spec = _check(model, method, layer, method_options)
    with preserved(model):
        batch = as_batch(inputs)
        kind = "image" if isinstance(batch, ImageBatch) else "text"
        if kind not in spec.inputs:
            text_methods = ", ".join(n for n, m in METHODS.items() if "text" in m.inputs)
            raise ValueError(f"method {method!r} explains images (B, C, H, W); for text inputs use one of: {text_methods}")
        if kind == "image" and isinstance(token_embedding(model), nn.Embedding):
            raise ValueError(f"inputs are images (B, C, H, W) but {type(model).__name__} is a text model (it embeds "
                             "tokens): pass {'input_ids': ..., 'attention_mask': ...}")
        device = next((p.device for p in model.parameters()), None)
        if device is not None:
            batch = _to(batch, device)
        return spec.run(model, batch, target, layer, method, **{**spec.options, **method_options})


def _to(batch, device):
    if isinstance(batch, ImageBatch):
        return ImageBatch(batch.pixels.to(device))
    return TextBatch(batch.input_ids.to(device), batch.attention_mask.to(device),
                     {k: v.to(device) for k, v in batch.extra.items()})

