"""What the methods need to know about a model, found from the model itself: how to call it and read its
logits, which layer to explain, how its tokens map to an image grid, and how to leave it as it was.

Nothing here is specific to one library: a timm model, a transformers model and a plain ``nn.Module`` are
told apart by what they have (``patch_embed.patch_size`` or ``config.patch_size``, ``num_prefix_tokens``,
``get_input_embeddings``), never by their class name.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class ImageBatch:
    """Pixels (B, C, H, W), called as ``model(pixels)``."""

    pixels: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.pixels.shape[0]


@dataclass
class TextBatch:
    """Token ids (B, T) with their mask and any other keyword the model takes (``token_type_ids``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


def as_batch(inputs: Any) -> ImageBatch | TextBatch:
    """``inputs`` of :func:`~hfx.interpret.explain` as an :class:`ImageBatch` or a :class:`TextBatch`.

    Takes a float tensor (B, C, H, W), a mapping (dict, ``BatchEncoding``) with ``input_ids`` (and
    optionally ``attention_mask``, ``token_type_ids``), or an integer tensor (B, T) of token ids.
    Tensors are copied out of any inference mode and detached from the caller's graph.
    """
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            keys = ", ".join(map(str, inputs)) or "none"
            raise ValueError(f"inputs: a mapping needs 'input_ids' (got keys: {keys}); pass images as a (B, C, H, W) tensor")
        ids = torch.as_tensor(inputs["input_ids"])
        if ids.ndim == 1:
            ids = ids[None]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        extra = {k: torch.as_tensor(v).clone() for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "labels")}
        return TextBatch(ids.clone(), mask.clone(), extra)
    if not torch.is_tensor(inputs):
        raise ValueError(f"inputs must be a tensor (B, C, H, W) or a mapping with 'input_ids', got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        ids = inputs if inputs.ndim == 2 else inputs[None]
        return TextBatch(ids.clone(), torch.ones_like(ids))
    if inputs.ndim == 3:
        inputs = inputs[None]
    if inputs.ndim != 4:
        raise ValueError(f"inputs: images must be (B, C, H, W) (or (C, H, W)), got shape {tuple(inputs.shape)}")
    return ImageBatch(inputs.detach().clone())


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, a ``ModelOutput`` / dict with ``logits``, or a tuple whose first
    element is the logits."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits") and torch.is_tensor(output.logits):
        return output.logits
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise ValueError(f"cannot find logits in the model's output ({type(output).__name__}): return a tensor, a tuple "
                     "starting with the logits, or an object with .logits")


def token_embedding(model: nn.Module) -> nn.Module | None:
    """``model.get_input_embeddings()``, or None for a model without one (transformers' vision models raise)."""
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def input_embeddings(model: nn.Module) -> nn.Module:
    embeddings = token_embedding(model)
    if embeddings is None:
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings(): text methods need a transformers-style "
                         "model that takes inputs_embeds")
    return embeddings


def readout_positions(batch: TextBatch) -> torch.Tensor:
    """(B,) index of the last attended token of each row (right or left padding)."""
    positions = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
    return (batch.attention_mask.bool() * (positions + 1)).argmax(-1)


def target_logits(logits: torch.Tensor, target: Any, batch: ImageBatch | TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B,) logit of each row's target class (the predicted one where ``target`` is None), and the (B,)
    targets. A causal LM's logits (B, T, V) are read at each row's last attended token."""
    if logits.ndim == 3:
        logits = logits[torch.arange(logits.shape[0], device=logits.device), readout_positions(batch).to(logits.device)]
    if logits.ndim != 2:
        raise ValueError(f"the model's logits have shape {tuple(logits.shape)}; expected (B, classes) or (B, T, vocab)")
    b, k = logits.shape
    if target is None:
        chosen = logits.detach().argmax(-1)
    else:
        chosen = torch.as_tensor(target, device=logits.device).long().reshape(-1)
        if chosen.numel() == 1:
            chosen = chosen.expand(b)
        if chosen.numel() != b:
            raise ValueError(f"target: give one class id or one per input ({b}), got {chosen.numel()}")
        bad = chosen[(chosen < 0) | (chosen >= k)]
        if bad.numel():
            raise ValueError(f"target {int(bad[0])} is out of range: the model has {k} classes (0..{k - 1})")
    return logits.gather(1, chosen[:, None])[:, 0], chosen


# ---------------------------------------------------------------------------------------------- state
@contextlib.contextmanager
def preserved(model: nn.Module):
    """Run in eval mode with gradients on (even under ``torch.no_grad`` or ``torch.inference_mode``), then give
    the model back as it came: every module's training flag, the attention implementation of a transformers
    config and timm's ``fused_attn`` flags. Parameters are never touched: gradients are taken with
    ``torch.autograd.grad`` with respect to inputs and activations, so ``requires_grad`` and ``.grad`` stay."""
    modes = [(m, m.training) for m in model.modules()]
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        for module, flag in fused:
            module.fused_attn = flag
        if attn is not None and getattr(config, "_attn_implementation", None) != attn:
            model.set_attn_implementation(attn)


@contextlib.contextmanager
def hooks(*handles):
    """Remove every hook handle given (a list of handles may be appended to inside) on exit."""
    registered = list(handles)
    try:
        yield registered
    finally:
        for handle in registered:
            handle.remove()


# ---------------------------------------------------------------------------------------------- layers
def submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, or a ValueError naming the closest module names."""
    names = [n for n, _ in model.named_modules() if n]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; modules: {', '.join(names[:12])}, ..."
        raise ValueError(f"layer {name!r} is not a module of {type(model).__name__}{hint}")
    return model.get_submodule(name)


@dataclass
class Record:
    """One module's output in a traced forward pass (in completion order)."""

    name: str
    module: nn.Module
    output: torch.Tensor


def trace(model: nn.Module, call: Callable[[], Any]) -> tuple[list[Record], Any]:
    """Run ``call()`` once without gradients and record every module's tensor output, in the order the
    modules finished (a block after its children)."""
    records: list[Record] = []

    def record(name):
        def hook(module, args, output):
            if torch.is_tensor(output):
                records.append(Record(name, module, output))
        return hook

    with hooks(*(m.register_forward_hook(record(n)) for n, m in model.named_modules() if n)), torch.no_grad():
        output = call()
    return records, output


_IN_BLOCK = re.compile(r"^(.*\.\d+)\.")  # "blocks.11.norm1" -> "blocks.11"


@dataclass
class TargetLayer:
    """The layer whose output a CAM method weighs: its name, and for a vision transformer the grid its
    patch tokens form (``tokens`` is None for a feature map)."""

    name: str
    module: nn.Module
    tokens: TokenGrid | None = None

    def as_map(self, output: torch.Tensor) -> torch.Tensor:
        """The layer's output as a feature map (B, C, h, w)."""
        return output if self.tokens is None else self.tokens.to_map(output)


@dataclass
class TokenGrid:
    """How a ViT's tokens (B, N, D) lay out: ``prefix`` class / distillation / register tokens, then the
    ``height`` x ``width`` patches row by row."""

    prefix: int
    height: int
    width: int

    def to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, D, height, width) patch map (prefix tokens dropped)."""
        b, n, d = tokens.shape
        if n != self.prefix + self.height * self.width:
            raise ValueError(f"{n} tokens do not make {self.prefix} prefix tokens + a {self.height}x{self.width} grid")
        return tokens[:, self.prefix:].reshape(b, self.height, self.width, d).permute(0, 3, 1, 2)


def patch_size(model: nn.Module) -> tuple[int, int] | None:
    """The patch size a ViT declares: timm's ``patch_embed.patch_size`` or a transformers ``config.patch_size``."""
    size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if size is None:
        size = getattr(getattr(model, "config", None), "patch_size", None)
    if size is None:
        return None
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return int(size[0]), int(size[-1])


def token_grid(model: nn.Module, num_tokens: int, image_hw: tuple[int, int]) -> TokenGrid:
    """The grid of ``num_tokens`` tokens for an input of ``image_hw``: patches from the model's patch size
    (``image / patch``), prefix tokens from timm's ``num_prefix_tokens`` or what remains (transformers' ViT:
    1 class token; DeiT: 2). Tokens that do not fit the patch grid (no declared patch size; a Swin stage after
    patch merging): a square grid and the fewest prefix tokens."""
    patch = patch_size(model)
    declared = getattr(model, "num_prefix_tokens", None)
    if patch is not None:
        height, width = image_hw[0] // patch[0], image_hw[1] // patch[1]
        prefix = num_tokens - height * width
        if prefix >= 0 and (not isinstance(declared, int) or declared == prefix):
            return TokenGrid(prefix, height, width)
    side = math.isqrt(num_tokens)
    if side == 0 or (isinstance(declared, int) and num_tokens - declared != side * side):
        raise ValueError(f"{num_tokens} tokens do not fit a patch grid"
                         + (f" plus num_prefix_tokens={declared}" if isinstance(declared, int) else "")
                         + "; pass layer= a module whose output is a feature map")
    return TokenGrid(num_tokens - side * side, side, side)


def _outermost(records: list[Record], index: int) -> Record:
    """Of the modules that returned the very tensor of ``records[index]`` (a block, its last child, that
    child's activation), the one with the shortest name."""
    same = [r for r in records if r.output is records[index].output]
    return min(same, key=lambda r: (r.name.count("."), len(r.name)))


def find_target_layer(model: nn.Module, records: list[Record], pixels: torch.Tensor, final: bool = False) -> TargetLayer:
    """The layer Grad-CAM explains by default, from one traced forward pass.

    - A CNN: the last module whose output is a feature map (B, C, h, w) larger than 1x1 (a 1x1 map cannot
      localise anything), the outermost of the modules returning that tensor (``layer4``, not
      ``layer4.1.act2``). With ``final``, the last feature map of any size that a pooling module did not
      make (the one CAM pools).
    - A vision transformer (norms of token outputs (B, N, D) inside numbered blocks after the last feature
      map, which is its patch embedding): the first norm of the last block (``blocks.11.norm1``,
      ``vit.layers.11.layernorm_before``, a Swin's last stage's ``layernorm_before``), with the token grid of
      :func:`token_grid`.
    """
    b, _, h, w = pixels.shape
    token_norms = [i for i, r in enumerate(records) if r.output.ndim == 3 and r.output.shape[0] == b
                   and _IN_BLOCK.match(r.name) and (isinstance(r.module, nn.LayerNorm) or "norm" in type(r.module).__name__.lower())]
    blocks = {_IN_BLOCK.match(records[i].name).group(1) + "." for i in token_norms}
    # 4-D outputs inside transformer blocks (per-head queries and keys) are not feature maps
    maps = [i for i, r in enumerate(records) if r.output.ndim == 4 and r.output.shape[0] == b
            and not any(r.name.startswith(block) for block in blocks)
            and (r.output.shape[2] * r.output.shape[3] > 1 if not final else "pool" not in type(r.module).__name__.lower())]
    last_map = maps[-1] if maps else -1
    norms = [records[i] for i in token_norms if i > last_map]
    if norms and not final:
        block = _IN_BLOCK.match(norms[-1].name).group(1)
        chosen = next(r for r in norms if _IN_BLOCK.match(r.name).group(1) == block)
        return TargetLayer(chosen.name, chosen.module, token_grid(model, chosen.output.shape[1], (h, w)))
    if not maps:
        raise ValueError(f"found no feature map (B, C, h, w) larger than 1x1 in {type(model).__name__}'s forward pass: "
                         "pass layer= the name of a convolutional block")
    chosen = _outermost(records, last_map)
    return TargetLayer(chosen.name, chosen.module)


def named_target_layer(model: nn.Module, records: list[Record], name: str, pixels: torch.Tensor) -> TargetLayer:
    """The layer called ``name``, read as a feature map or (a 3-D output) as ViT tokens."""
    module = submodule(model, name)
    outputs = [r.output for r in records if r.module is module]
    if not outputs:
        raise ValueError(f"layer {name!r} returned no tensor in the forward pass (it is not called, or returns a tuple)")
    out = outputs[-1]
    if out.ndim == 4:
        return TargetLayer(name, module)
    if out.ndim == 3:
        return TargetLayer(name, module, token_grid(model, out.shape[1], tuple(pixels.shape[-2:])))
    raise ValueError(f"layer {name!r} returns shape {tuple(out.shape)}: CAM methods need a feature map (B, C, h, w) "
                     "or ViT tokens (B, N, D)")
