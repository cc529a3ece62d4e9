"""Attention maps per layer and head, and attention rollout (Abnar & Zuidema 2020).

Maps come from ``output_attentions=True`` for transformers models (switched to ``eager`` attention for the
call when the model's own implementation returns none) and, for timm's ViTs, from the softmax output of
each ``Attention`` module, with ``fused_attn`` off for the call. Rollout multiplies, layer by layer, the
head-fused attention plus the identity (the residual connection), each row renormalised:
``R = Ã_L ... Ã_1`` with ``Ã = rownorm(fuse(A) + I)``.
"""

from __future__ import annotations

import torch
from torch import nn

from hfx.interpret._inspect import ImageBatch, TextBatch, hooks, readout_positions

#: how the heads of one layer are fused for rollout.
HEAD_FUSIONS = {
    "mean": lambda a: a.mean(1),
    "max": lambda a: a.amax(1),
    "min": lambda a: a.amin(1),
}


def _timm_attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)]


def attention_maps(model: nn.Module, batch: ImageBatch | TextBatch) -> torch.Tensor:
    """(B, layers, heads, N, N) attention probabilities, in layer order."""
    if isinstance(batch, TextBatch):
        def call():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.extra,
                         output_attentions=True)
    else:
        def call():
            return model(batch.pixels, output_attentions=True)

    maps: list[torch.Tensor] = []
    timm_modules = _timm_attention_modules(model)
    with torch.no_grad():
        if timm_modules:
            for module in timm_modules:
                module.fused_attn = False  # restored by the caller's ``preserved``
            with hooks(*(m.attn_drop.register_forward_hook(lambda mod, args, out: maps.append(out)) for m in timm_modules)):
                model(batch.pixels) if isinstance(batch, ImageBatch) else model(batch.input_ids)
        elif getattr(model, "config", None) is not None:
            can_switch = getattr(model, "_can_set_attn_implementation", lambda: hasattr(model, "set_attn_implementation"))
            if getattr(model.config, "_attn_implementation", "eager") != "eager" and can_switch():
                # sdpa and flash attention return no maps; the caller's ``preserved`` switches back
                model.set_attn_implementation("eager")
            maps = list(getattr(call(), "attentions", None) or [])
    if not maps:
        raise ValueError(f"methods 'attention' and 'attention_rollout' need a model with attention layers; "
                         f"{type(model).__name__} returned no attention maps")
    return torch.stack([m.float() for m in maps], 1)


def rollout(attentions: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, L, heads, N, N) -> (B, N, N): how much each output token draws on each input token through all
    layers, the residual stream included."""
    eye = torch.eye(attentions.shape[-1], dtype=attentions.dtype, device=attentions.device)
    result = eye.expand(attentions.shape[0], -1, -1)
    for layer in range(attentions.shape[1]):
        fused = HEAD_FUSIONS[head_fusion](attentions[:, layer]) + eye
        result = (fused / fused.sum(-1, keepdim=True)) @ result
    return result


def is_causal(attentions: torch.Tensor) -> bool:
    """True when no token attends to a later one (a decoder's mask)."""
    above = attentions[:, 0].triu(1)
    return above.numel() == 0 or bool(above.abs().amax() < 1e-6)


def readout_rows(attentions: torch.Tensor, batch: ImageBatch | TextBatch, prefix: int) -> torch.Tensor:
    """(B, ..., N, N) -> (B, ..., N): the row of the token the classifier reads. A ViT with class tokens:
    the first; one without: the mean over patch queries. Text: the first token for an encoder (``[CLS]``),
    each row's last attended token for a decoder (what a causal LM predicts from)."""
    if isinstance(batch, ImageBatch):
        return attentions[..., 0, :] if prefix > 0 else attentions.mean(-2)
    if not is_causal(attentions if attentions.ndim == 5 else attentions[:, None, None]):
        return attentions[..., 0, :]
    positions = readout_positions(batch).to(attentions.device)
    index = positions.view(-1, *([1] * (attentions.ndim - 1))).expand(*attentions.shape[:-2], 1, attentions.shape[-1])
    return attentions.gather(-2, index).squeeze(-2)
