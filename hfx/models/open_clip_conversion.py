"""Exact conversion between open_clip's CLIP and transformers' ``CLIPModel``, both ways.

open_clip trains most public CLIP checkpoints; transformers serves them (``CLIPModel``, the
``zero-shot-image-classification`` pipeline). The two are the same network written twice: a ViT image tower
(patch conv, class token, learned positions, pre-LN, pre-norm blocks, post-LN, linear projection) and a causal
text transformer pooled at the end-of-text token. This module maps one onto the other weight for weight, and
refuses (``ValueError`` naming the field) the open_clip options that ``CLIPModel`` cannot express::

    import open_clip
    from hfx.models.open_clip_conversion import (
        clip_processor_from_open_clip, open_clip_to_transformers, transformers_to_open_clip)

    model = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2,
                           head_width=32), text_cfg=dict(context_length=16, width=64, heads=2, layers=2))
    hf_model = open_clip_to_transformers(model)                 # transformers.CLIPModel, same outputs
    processor = clip_processor_from_open_clip(model)            # CLIPTokenizer + CLIPImageProcessor
    hf_model.save_pretrained("clip-hf"); processor.save_pretrained("clip-hf")
    back, model_cfg = transformers_to_open_clip(hf_model)       # open_clip.CLIP + its model_cfg dict

Folder to folder: :func:`convert_open_clip_folder` reads open_clip's Hub layout (``open_clip_config.json`` +
``open_clip_model.safetensors``, what ``open_clip.create_model("local-dir:...")`` loads) and writes a
``CLIPModel.save_pretrained`` folder with its processor; :func:`convert_clip_model_folder` goes the other way,
and :func:`save_open_clip` writes the open_clip layout for a model in memory.

What is mapped (open_clip -> transformers):

- ``visual.conv1`` -> ``embeddings.patch_embedding``; ``class_embedding``; ``positional_embedding`` ->
  ``position_embedding``; ``ln_pre`` -> ``pre_layrnorm``; ``ln_post`` -> ``post_layernorm``;
  ``visual.proj`` (width x embed) -> ``visual_projection.weight`` (transposed).
- each resblock: ``attn.in_proj_{weight,bias}`` split into ``q_proj``/``k_proj``/``v_proj``, ``attn.out_proj``,
  ``ln_1``/``ln_2`` -> ``layer_norm1``/``layer_norm2``, ``mlp.c_fc``/``mlp.c_proj`` -> ``mlp.fc1``/``mlp.fc2``;
  a LayerScale (``ls_init_value``) is folded into ``out_proj``/``fc2`` (one way: the reverse has none).
- ``token_embedding``, text ``positional_embedding``, ``ln_final`` -> ``final_layer_norm``,
  ``text_projection`` (transposed), ``logit_scale``.
- config: ``nn.GELU`` -> ``hidden_act="gelu"``, ``quick_gelu`` -> ``"quick_gelu"``, ``act_kwargs={"approximate":
  "tanh"}`` -> ``"gelu_pytorch_tanh"``; LayerNorm eps -> ``layer_norm_eps``; ``width // head_width`` -> vision
  heads; ``context_length`` -> ``max_position_embeddings``.
- pooling: open_clip's ``argmax`` pools at the highest token id (``<end_of_text>`` = 49407 for its BPE);
  ``CLIPTextModel`` pools at the first ``eos_token_id`` (or at the argmax when ``eos_token_id == 2``, a legacy
  case). The config gets ``eos_token_id = vocab_size - 1``, the same token whenever the sequence contains it,
  which every tokenized sequence does (both tokenizers keep it when truncating). ``pool_type="eos"`` maps to
  its ``eos_id`` exactly.

Carried over as the values they hold, not as options: a fixed ``pos_embed_type="sin_cos_2d"`` table becomes a
learned ``position_embedding`` with the same values; training-only ``patch_dropout`` is dropped; a
``nonscalar_logit_scale`` becomes a scalar. The reverse always builds a plain ``open_clip.CLIP``.

Known differences (not weights): open_clip cleans text with ``ftfy`` and a double ``html.unescape`` before
lowercasing, ``CLIPTokenizer`` only NFC-normalizes, collapses whitespace and lowercases, so ``"&amp;"`` or
mojibake tokenize differently; open_clip pads with id 0, ``CLIPTokenizer`` with ``<|endoftext|>`` (padding sits
after the pooled token of a causal model, so features agree). ``CLIPImageProcessor`` (torchvision backend, the
pipeline's default) resizes with a slightly different antialias than PIL (about 0.015 in normalized pixels;
``backend="pil"`` matches open_clip exactly) and rounds an odd center-crop margin down where torchvision
rounds it to nearest: a one-pixel shift for those image sizes.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import safetensors.torch
import torch
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from open_clip.transform import PreprocessCfg
from open_clip.transformer import (
    LayerScale,
    QuickGELU,
    ResidualAttentionBlock,
    TextTransformer,
    VisionTransformer,
)
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

#: open_clip's Hub layout: the config (``model_cfg`` + ``preprocess_cfg``) and the weights file it looks for first.
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_NAME = "open_clip_model.safetensors"

#: open_clip special token names -> the names ``CLIPTokenizer``'s pre-tokenizer splits on (same ids).
SPECIAL_TOKENS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}

#: open_clip activation (module class, approximate) -> ``hidden_act``; the reverse for building towers.
ACTIVATIONS = {(nn.GELU, "none"): "gelu", (nn.GELU, "tanh"): "gelu_pytorch_tanh", (QuickGELU, None): "quick_gelu"}

#: open_clip ``interpolation`` -> PIL resample code stored in ``preprocessor_config.json``.
RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


# --------------------------------------------------------------------------------------------------------------
# open_clip -> transformers
# --------------------------------------------------------------------------------------------------------------


def _text_tower(model: nn.Module) -> dict[str, Any]:
    """The parts of ``model``'s text tower, wherever the class keeps them (``CLIP`` flattens them onto itself,
    ``CustomTextCLIP`` keeps a ``TextTransformer`` in ``.text``), after refusing what ``CLIPTextModel`` lacks."""
    if isinstance(model, open_clip.CustomTextCLIP):
        text = model.text
        if not isinstance(text, TextTransformer):
            raise ValueError(
                f"text_cfg.hf_model_name: the text tower is {type(text).__name__}, not open_clip's TextTransformer; "
                "CLIPModel has only the CLIP text transformer"
            )
        if text.cls_emb is not None:
            raise ValueError("text_cfg.embed_cls=True (a CoCa-style class token) has no CLIPTextModel equivalent")
        if text.use_pad_mask:
            raise ValueError("text_cfg.use_pad_mask=True has no CLIPTextModel equivalent")
        parts = {name: getattr(text, name) for name in ("token_embedding", "positional_embedding", "transformer",
                                                       "ln_final", "text_projection", "attn_mask")}
        parts.update(pool_type=text.pool_type, eos_id=text.eos_id, context_length=text.context_length)
        return parts
    parts = {name: getattr(model, name) for name in ("token_embedding", "positional_embedding", "transformer",
                                                     "ln_final", "text_projection", "attn_mask")}
    parts.update(pool_type=model.text_pool_type, eos_id=getattr(model, "text_eos_id", None),
                 context_length=model.context_length)
    if parts["positional_embedding"].shape[0] != model.context_length:
        raise ValueError("text_cfg.embed_cls=True (a CoCa-style class token) has no CLIPTextModel equivalent")
    return parts


def _blocks_facts(transformer: nn.Module, tower: str) -> dict[str, Any]:
    """Activation and LayerNorm eps shared by every block of an open_clip ``Transformer``; refuses custom blocks."""
    blocks = list(transformer.resblocks)
    for block in blocks:
        if not isinstance(block, ResidualAttentionBlock):
            raise ValueError(
                f"{tower}.block_type: {type(block).__name__} (qk_norm / scaled_cosine_attn / scale_heads / "
                "scale_attn / scale_fc) has no CLIPModel equivalent; only the default ResidualAttentionBlock maps"
            )
        if hasattr(block, "ln_1_kv"):
            raise ValueError(f"{tower}: cross-attention blocks have no CLIPModel equivalent")
    acts = set()
    for block in blocks:
        act = block.mlp.gelu
        acts.add(ACTIVATIONS.get((type(act), getattr(act, "approximate", None))))
    if None in acts or len(acts) != 1:
        names = sorted({type(b.mlp.gelu).__name__ for b in blocks})
        raise ValueError(f"{tower}.act_kwargs / quick_gelu: activation {names} has no CLIPModel hidden_act")
    norms = [m for b in blocks for m in (b.ln_1, b.ln_2)]
    eps = {m.eps for m in norms}
    if len(eps) != 1 or any(not m.elementwise_affine or m.bias is None for m in norms):
        raise ValueError(f"{tower}.norm_kwargs: LayerNorms must share one eps and have weight and bias")
    first = blocks[0]
    return {
        "hidden_act": acts.pop(),
        "layer_norm_eps": eps.pop(),
        "num_hidden_layers": len(blocks),
        "num_attention_heads": first.attn.num_heads,
        "hidden_size": first.attn.embed_dim,
        "intermediate_size": first.mlp.c_fc.out_features,
    }


def _check_vision(visual: nn.Module) -> dict[str, Any]:
    """``CLIPVisionConfig`` fields of an open_clip ``VisionTransformer``; refuses what ``CLIPVisionModel`` lacks."""
    if not isinstance(visual, VisionTransformer):
        field = {"TimmModel": "vision_cfg.timm_model_name", "ModifiedResNet": "vision_cfg.layers (a tuple: ResNet)"}
        name = type(visual).__name__
        raise ValueError(f"{field.get(name, 'vision_cfg')}: the image tower is {name}; CLIPModel has only a ViT")
    if visual.attn_pool is not None:
        raise ValueError("vision_cfg.attentional_pool: attentional pooling has no CLIPVisionModel equivalent")
    if visual.pool_type != "tok":
        raise ValueError(f"vision_cfg.pool_type={visual.pool_type!r}: CLIPVisionModel pools the class token ('tok')")
    if isinstance(visual.ln_pre, nn.Identity):
        raise ValueError("vision_cfg.no_ln_pre=True: CLIPVisionModel always applies pre_layrnorm")
    if visual.proj is None:
        raise ValueError("vision_cfg: the image tower has no projection (proj is None); CLIPModel needs one")
    (height, width), (patch_h, patch_w) = visual.image_size, visual.patch_size
    if height != width or patch_h != patch_w:
        raise ValueError(f"vision_cfg.image_size={visual.image_size} / patch_size={visual.patch_size}: "
                         "CLIPVisionConfig takes square images and patches only")
    facts = _blocks_facts(visual.transformer, "vision_cfg")
    if {visual.ln_pre.eps, visual.ln_post.eps} != {facts["layer_norm_eps"]}:
        raise ValueError("vision_cfg.norm_kwargs: ln_pre / ln_post eps differ from the blocks' eps")
    return {**facts, "image_size": height, "patch_size": patch_h, "num_channels": visual.conv1.in_channels}


def clip_config_from_open_clip(model: nn.Module) -> CLIPConfig:
    """The ``CLIPConfig`` of open_clip ``model`` (a ``CLIP`` or a ``CustomTextCLIP`` with its own text transformer).

    Raises:
        ValueError: ``model`` uses an option ``CLIPModel`` cannot express; the message names the config field.
    """
    if not isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP)) or isinstance(model, open_clip.CoCa):
        raise ValueError(f"model: expected open_clip.CLIP or CustomTextCLIP, got {type(model).__name__}")
    if getattr(model, "logit_bias", None) is not None:
        raise ValueError("init_logit_bias: a logit_bias (SigLIP-style sigmoid loss) has no CLIPModel equivalent")
    vision = _check_vision(model.visual)
    text = _text_tower(model)
    if text["attn_mask"] is None:
        raise ValueError("text_cfg.no_causal_mask=True: CLIPTextModel is always causal")
    if text["text_projection"] is None:
        raise ValueError("text_cfg.proj_type='none': CLIPModel needs a text projection")
    if isinstance(text["text_projection"], nn.Linear):
        raise ValueError("text_cfg.proj_bias=True: CLIPModel's text_projection has no bias")
    text_facts = _blocks_facts(text["transformer"], "text_cfg")
    if text["ln_final"].eps != text_facts["layer_norm_eps"]:
        raise ValueError("text_cfg.norm_kwargs: ln_final eps differs from the blocks' eps")
    if (vision["hidden_act"] == "quick_gelu") != (text_facts["hidden_act"] == "quick_gelu"):
        raise ValueError("quick_gelu: the towers disagree on QuickGELU")
    vocab_size = text["token_embedding"].num_embeddings
    if text["pool_type"] == "argmax":
        eos_token_id = vocab_size - 1  # the highest id, which is what argmax finds (see the module docstring)
    elif text["pool_type"] == "eos" and text["eos_id"] != 2:
        eos_token_id = text["eos_id"]
    else:
        raise ValueError(f"text_cfg.pool_type={text['pool_type']!r} (eos_id={text['eos_id']}): CLIPTextModel pools "
                         "at the end-of-text token ('argmax', or 'eos' with eos_id != 2)")
    embed_dim = model.visual.proj.shape[1]
    if text["text_projection"].shape[1] != embed_dim:
        raise ValueError("embed_dim: the image and text projections have different output sizes")
    text_config = {
        **text_facts,
        "vocab_size": vocab_size,
        "max_position_embeddings": text["context_length"],
        "bos_token_id": vocab_size - 2,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "projection_dim": embed_dim,
    }
    logit_scale = float(model.logit_scale.detach().reshape(()))
    return CLIPConfig(text_config=text_config, vision_config={**vision, "projection_dim": embed_dim},
                      projection_dim=embed_dim, logit_scale_init_value=logit_scale)


def _layer_scale(module: nn.Module) -> torch.Tensor | None:
    return module.gamma.detach() if isinstance(module, LayerScale) else None


def _blocks_to_transformers(transformer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``CLIPEncoder`` weights under ``prefix`` from an open_clip ``Transformer`` (q/k/v split, LayerScale folded)."""
    out: dict[str, torch.Tensor] = {}
    for i, block in enumerate(transformer.resblocks):
        p = f"{prefix}.layers.{i}"
        q, k, v = block.attn.in_proj_weight.detach().chunk(3, dim=0)
        qb, kb, vb = block.attn.in_proj_bias.detach().chunk(3, dim=0)
        out_w, out_b = block.attn.out_proj.weight.detach(), block.attn.out_proj.bias.detach()
        fc2_w, fc2_b = block.mlp.c_proj.weight.detach(), block.mlp.c_proj.bias.detach()
        if (gamma := _layer_scale(block.ls_1)) is not None:  # x + g * (W h + b) == x + (g W) h + g b
            out_w, out_b = out_w * gamma[:, None], out_b * gamma
        if (gamma := _layer_scale(block.ls_2)) is not None:
            fc2_w, fc2_b = fc2_w * gamma[:, None], fc2_b * gamma
        out.update({
            f"{p}.self_attn.q_proj.weight": q, f"{p}.self_attn.q_proj.bias": qb,
            f"{p}.self_attn.k_proj.weight": k, f"{p}.self_attn.k_proj.bias": kb,
            f"{p}.self_attn.v_proj.weight": v, f"{p}.self_attn.v_proj.bias": vb,
            f"{p}.self_attn.out_proj.weight": out_w, f"{p}.self_attn.out_proj.bias": out_b,
            f"{p}.layer_norm1.weight": block.ln_1.weight.detach(), f"{p}.layer_norm1.bias": block.ln_1.bias.detach(),
            f"{p}.layer_norm2.weight": block.ln_2.weight.detach(), f"{p}.layer_norm2.bias": block.ln_2.bias.detach(),
            f"{p}.mlp.fc1.weight": block.mlp.c_fc.weight.detach(), f"{p}.mlp.fc1.bias": block.mlp.c_fc.bias.detach(),
            f"{p}.mlp.fc2.weight": fc2_w, f"{p}.mlp.fc2.bias": fc2_b,
        })
    return out


def open_clip_state_dict_to_transformers(model: nn.Module) -> dict[str, torch.Tensor]:
    """``CLIPModel`` state dict of open_clip ``model`` (call :func:`clip_config_from_open_clip` first to refuse
    what does not map)."""
    visual, text = model.visual, _text_tower(model)
    out = {
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight.detach(),
        "vision_model.embeddings.class_embedding": visual.class_embedding.detach(),
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding.detach(),
        "vision_model.pre_layrnorm.weight": visual.ln_pre.weight.detach(),
        "vision_model.pre_layrnorm.bias": visual.ln_pre.bias.detach(),
        "vision_model.post_layernorm.weight": visual.ln_post.weight.detach(),
        "vision_model.post_layernorm.bias": visual.ln_post.bias.detach(),
        "visual_projection.weight": visual.proj.detach().T,
        "text_model.embeddings.token_embedding.weight": text["token_embedding"].weight.detach(),
        "text_model.embeddings.position_embedding.weight": text["positional_embedding"].detach(),
        "text_model.final_layer_norm.weight": text["ln_final"].weight.detach(),
        "text_model.final_layer_norm.bias": text["ln_final"].bias.detach(),
        "text_projection.weight": text["text_projection"].detach().T,
        "logit_scale": model.logit_scale.detach().reshape(()),
    }
    out.update(_blocks_to_transformers(visual.transformer, "vision_model.encoder"))
    out.update(_blocks_to_transformers(text["transformer"], "text_model.encoder"))
    return {k: v.contiguous() for k, v in out.items()}


def open_clip_to_transformers(model: nn.Module) -> CLIPModel:
    """A ``transformers.CLIPModel`` computing what open_clip ``model`` computes (same dtype, in eval mode).

    Raises:
        ValueError: ``model`` uses an option ``CLIPModel`` cannot express (attentional pooling, a timm or ResNet
            image tower, an HF text tower, ``no_causal_mask``, a pooling other than the end-of-text token, a
            ``logit_bias``, custom attention blocks, ...); the message names the config field.
    """
    config = clip_config_from_open_clip(model)
    state = open_clip_state_dict_to_transformers(model)
    dtype = state["visual_projection.weight"].dtype
    hf_model = CLIPModel(config).eval()
    hf_model.load_state_dict(state, strict=True)
    return hf_model.to(dtype)


# --------------------------------------------------------------------------------------------------------------
# transformers -> open_clip
# --------------------------------------------------------------------------------------------------------------


def _tower_cfg(config, tower: str) -> dict[str, Any]:
    """The open_clip tower fields shared by both towers (mlp_ratio, act_kwargs, norm_kwargs) of an HF sub-config."""
    ratio = config.intermediate_size / config.hidden_size
    if int(config.hidden_size * ratio) != config.intermediate_size:
        raise ValueError(f"{tower}.intermediate_size={config.intermediate_size} is not width * mlp_ratio")
    cfg: dict[str, Any] = {"mlp_ratio": ratio}
    if config.hidden_act == "gelu_pytorch_tanh":
        cfg["act_kwargs"] = {"approximate": "tanh"}
    elif config.hidden_act not in ("gelu", "quick_gelu"):
        raise ValueError(f"{tower}.hidden_act={config.hidden_act!r}: open_clip has gelu, gelu tanh and quick_gelu")
    if config.layer_norm_eps != 1e-5:
        cfg["norm_kwargs"] = {"eps": config.layer_norm_eps}
    return cfg


def open_clip_model_cfg(config: CLIPConfig) -> dict[str, Any]:
    """open_clip's ``model_cfg`` (``embed_dim``, ``quick_gelu``, ``vision_cfg``, ``text_cfg``) for ``CLIPConfig``.

    Raises:
        ValueError: the config has no open_clip equivalent (the message names the field).
    """
    vision, text = config.vision_config, config.text_config
    quick = {vision.hidden_act == "quick_gelu", text.hidden_act == "quick_gelu"}
    if len(quick) != 1:
        raise ValueError(f"hidden_act: vision {vision.hidden_act!r} vs text {text.hidden_act!r}; open_clip's "
                         "quick_gelu applies to both towers")
    if vision.hidden_size % vision.num_attention_heads:
        raise ValueError("vision_config.num_attention_heads does not divide hidden_size")
    if vision.num_channels != 3:
        raise ValueError(f"vision_config.num_channels={vision.num_channels}: open_clip takes RGB images")
    if text.eos_token_id is None:
        raise ValueError("text_config.eos_token_id is None: CLIPTextModel pools at it")
    vision_cfg = {
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "width": vision.hidden_size,
        "layers": vision.num_hidden_layers,
        "head_width": vision.hidden_size // vision.num_attention_heads,
        **_tower_cfg(vision, "vision_config"),
    }
    text_cfg: dict[str, Any] = {
        "context_length": text.max_position_embeddings,
        "vocab_size": text.vocab_size,
        "width": text.hidden_size,
        "heads": text.num_attention_heads,
        "layers": text.num_hidden_layers,
        **_tower_cfg(text, "text_config"),
    }
    if text.eos_token_id not in (2, text.vocab_size - 1):  # else argmax: open_clip's default (module docstring)
        text_cfg.update(pool_type="eos", eos_id=text.eos_token_id)
    return {"embed_dim": config.projection_dim, "quick_gelu": quick.pop(), "vision_cfg": vision_cfg,
            "text_cfg": text_cfg}


def _blocks_to_open_clip(state: dict[str, torch.Tensor], prefix: str, out_prefix: str, layers: int) -> dict:
    out = {}
    for i in range(layers):
        p, o = f"{prefix}.layers.{i}", f"{out_prefix}.resblocks.{i}"
        out[f"{o}.attn.in_proj_weight"] = torch.cat([state[f"{p}.self_attn.{n}_proj.weight"] for n in "qkv"])
        out[f"{o}.attn.in_proj_bias"] = torch.cat([state[f"{p}.self_attn.{n}_proj.bias"] for n in "qkv"])
        for theirs, ours in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for param in ("weight", "bias"):
                out[f"{o}.{ours}.{param}"] = state[f"{p}.{theirs}.{param}"]
    return out


def transformers_state_dict_to_open_clip(model: CLIPModel) -> dict[str, torch.Tensor]:
    """open_clip ``CLIP`` state dict of ``CLIPModel`` ``model`` (the inverse of
    :func:`open_clip_state_dict_to_transformers`)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = {
        "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": state["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": state["vision_model.post_layernorm.bias"],
        "visual.proj": state["visual_projection.weight"].T,
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T,
        "logit_scale": state["logit_scale"].reshape(()),
    }
    out.update(_blocks_to_open_clip(state, "vision_model.encoder", "visual.transformer",
                                    model.config.vision_config.num_hidden_layers))
    out.update(_blocks_to_open_clip(state, "text_model.encoder", "transformer",
                                    model.config.text_config.num_hidden_layers))
    return {k: v.contiguous() for k, v in out.items()}


def transformers_to_open_clip(model: CLIPModel) -> tuple[open_clip.CLIP, dict[str, Any]]:
    """An open_clip ``CLIP`` computing what ``CLIPModel`` ``model`` computes, and the ``model_cfg`` it was built from
    (what ``open_clip_config.json`` stores; see :func:`save_open_clip`).

    Raises:
        ValueError: ``model`` is not a ``CLIPModel`` or its config has no open_clip equivalent (names the field).
    """
    if not isinstance(model, CLIPModel):
        raise ValueError(f"model: expected transformers.CLIPModel, got {type(model).__name__}")
    model_cfg = open_clip_model_cfg(model.config)
    state = transformers_state_dict_to_open_clip(model)
    dtype = state["visual.proj"].dtype
    oc_model = open_clip.CLIP(**model_cfg).eval()
    oc_model.load_state_dict(state, strict=True)
    return oc_model.to(dtype), model_cfg


# --------------------------------------------------------------------------------------------------------------
# tokenizer and image processor
# --------------------------------------------------------------------------------------------------------------


def open_clip_bpe_vocab(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` built from open_clip's BPE file exactly as ``SimpleTokenizer.__init__`` builds its
    encoder (256 byte symbols, their ``</w>`` variants, one symbol per merge, then the two special tokens), with
    the special tokens under ``CLIPTokenizer``'s names (``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407)."""
    lines = gzip.open(bpe_path or default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    symbols += [SPECIAL_TOKENS["<start_of_text>"], SPECIAL_TOKENS["<end_of_text>"]]
    return {s: i for i, s in enumerate(symbols)}, merges


def clip_tokenizer_from_open_clip(context_length: int = 77, bpe_path: str | Path | None = None) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` giving open_clip's ``SimpleTokenizer`` ids (before padding, see the module docstring),
    truncating to ``context_length`` tokens with ``<|endoftext|>`` kept last, as open_clip does."""
    vocab, merges = open_clip_bpe_vocab(bpe_path)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def clip_image_processor(preprocess_cfg: dict[str, Any] | None = None) -> CLIPImageProcessor:
    """A ``CLIPImageProcessor`` doing open_clip's evaluation preprocess for ``preprocess_cfg`` (open_clip's
    ``PreprocessCfg`` fields: ``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``; defaults filled in):
    resize the shortest edge to ``size``, center crop, scale to [0, 1], normalize (``resize_mode="squash"``:
    resize to ``size`` x ``size``, no crop).

    Raises:
        ValueError: ``resize_mode="longest"`` (resize and pad, no CLIPImageProcessor equivalent), a non-square
            ``size`` with ``resize_mode="shortest"``, or an ``interpolation`` without a PIL code.
    """
    cfg = {**asdict(PreprocessCfg()), **{k: v for k, v in (preprocess_cfg or {}).items() if v is not None}}
    height, width = (cfg["size"], cfg["size"]) if isinstance(cfg["size"], int) else tuple(cfg["size"])
    if cfg["interpolation"] not in RESAMPLE:
        raise ValueError(f"preprocess_cfg.interpolation={cfg['interpolation']!r}: expected one of {list(RESAMPLE)}")
    common = {"resample": RESAMPLE[cfg["interpolation"]], "image_mean": list(cfg["mean"]),
              "image_std": list(cfg["std"]), "do_convert_rgb": True}
    if cfg["resize_mode"] == "squash":
        return CLIPImageProcessor(size={"height": height, "width": width}, do_center_crop=False, **common)
    if cfg["resize_mode"] != "shortest":
        raise ValueError(f"preprocess_cfg.resize_mode={cfg['resize_mode']!r}: CLIPImageProcessor resizes "
                         "('shortest' or 'squash'), it does not pad")
    if height != width:
        raise ValueError(f"preprocess_cfg.size={cfg['size']}: resize_mode='shortest' maps for square sizes only")
    return CLIPImageProcessor(size={"shortest_edge": height}, crop_size={"height": height, "width": width}, **common)


def clip_processor_from_open_clip(model: nn.Module | None = None, preprocess_cfg: dict[str, Any] | None = None,
                                  context_length: int | None = None) -> CLIPProcessor:
    """The ``CLIPProcessor`` (tokenizer + image processor) for open_clip ``model``: its preprocess config
    (``model.visual.preprocess_cfg`` as ``create_model`` sets it, else its image size and OpenAI mean/std) unless
    ``preprocess_cfg`` is given, and its context length unless ``context_length`` is given."""
    if preprocess_cfg is None:
        preprocess_cfg = open_clip_preprocess_cfg(model) if model is not None else {}
    if context_length is None:
        context_length = getattr(model, "context_length", None) or 77
    return CLIPProcessor(image_processor=clip_image_processor(preprocess_cfg),
                         tokenizer=clip_tokenizer_from_open_clip(context_length))


def open_clip_preprocess_cfg(model: nn.Module) -> dict[str, Any]:
    """open_clip ``model``'s preprocess config with every ``PreprocessCfg`` field (its image size, the OpenAI
    mean/std and bicubic/shortest defaults where the model has none)."""
    cfg = asdict(PreprocessCfg())
    cfg.update(open_clip.get_model_preprocess_cfg(model))
    size = cfg["size"]
    cfg["size"] = size[0] if isinstance(size, (tuple, list)) and size[0] == size[1] else size
    cfg["mean"], cfg["std"] = list(cfg["mean"]), list(cfg["std"])
    return cfg


def preprocess_cfg_from_image_processor(processor: CLIPImageProcessor) -> dict[str, Any]:
    """open_clip's ``preprocess_cfg`` for a ``CLIPImageProcessor`` (the inverse of :func:`clip_image_processor`).

    Raises:
        ValueError: the processor does something open_clip's preprocess does not (names the setting).
    """
    resample = {code: name for name, code in RESAMPLE.items()}
    code = int(processor.resample)
    if code not in resample:
        raise ValueError(f"image_processor.resample={processor.resample}: open_clip has {list(RESAMPLE)}")
    if not (processor.do_resize and processor.do_rescale and processor.do_normalize):
        raise ValueError("image_processor: do_resize, do_rescale and do_normalize must all be on for open_clip")
    if not math.isclose(processor.rescale_factor, 1 / 255):
        raise ValueError(f"image_processor.rescale_factor={processor.rescale_factor}: open_clip scales by 1/255")
    size = dict(processor.size)
    cfg = {"mean": list(processor.image_mean), "std": list(processor.image_std),
           "interpolation": resample[code]}
    if "shortest_edge" in size:
        crop = dict(processor.crop_size)
        if not processor.do_center_crop or crop != {"height": size["shortest_edge"], "width": size["shortest_edge"]}:
            raise ValueError(f"image_processor.crop_size={crop}: open_clip crops to the resized shortest edge")
        cfg.update(size=size["shortest_edge"], resize_mode="shortest")
    else:
        if processor.do_center_crop:
            raise ValueError("image_processor.do_center_crop with a fixed size has no open_clip equivalent")
        cfg.update(size=size["height"] if size["height"] == size["width"] else [size["height"], size["width"]],
                   resize_mode="squash")
    return cfg


# --------------------------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------------------------


def save_open_clip(model: open_clip.CLIP, model_cfg: dict[str, Any], folder: str | Path,
                   preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """Write open_clip's Hub layout to ``folder``: ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``,
    by default :func:`open_clip_preprocess_cfg` of ``model``) and ``open_clip_model.safetensors``, which
    ``open_clip.create_model_and_transforms("local-dir:" + folder)`` loads. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = preprocess_cfg if preprocess_cfg is not None else open_clip_preprocess_cfg(model)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / OPEN_CLIP_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(folder / OPEN_CLIP_WEIGHTS_NAME))
    return folder


def convert_open_clip_folder(src: str | Path, dst: str | Path) -> Path:
    """Convert an open_clip folder (``open_clip_config.json`` + weights, the ``local-dir:`` layout) into a
    ``CLIPModel`` folder with its ``CLIPProcessor`` (``config.json``, ``model.safetensors``, ``tokenizer.json`` +
    ``vocab.json`` + ``merges.txt``, ``processor_config.json`` + ``preprocessor_config.json``), loadable by ``transformers.pipeline("zero-shot-image-classification", dst)``.

    Raises:
        FileNotFoundError: ``src`` has no ``open_clip_config.json``.
        ValueError: the model has no ``CLIPModel`` equivalent (see :func:`open_clip_to_transformers`).
    """
    src, dst = Path(src), Path(dst)
    if not (src / OPEN_CLIP_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"src={src}: no {OPEN_CLIP_CONFIG_NAME} (open_clip's folder layout)")
    text_cfg = json.loads((src / OPEN_CLIP_CONFIG_NAME).read_text()).get("model_cfg", {}).get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("tokenizer_kwargs"):
        raise ValueError(f"text_cfg.hf_tokenizer_name / tokenizer_kwargs in {src}: only open_clip's own BPE "
                         "tokenizer (SimpleTokenizer) is converted")
    model = open_clip.create_model(f"local-dir:{src}", require_pretrained=True).eval()
    hf_model = open_clip_to_transformers(model)
    dst.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(dst)
    processor = clip_processor_from_open_clip(model)
    processor.save_pretrained(dst)
    processor.image_processor.save_pretrained(dst)  # preprocessor_config.json too, for transformers 4 readers
    save_vocab_files(dst)
    return dst


def save_vocab_files(folder: str | Path, bpe_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (the slow-tokenizer files, next to ``tokenizer.json``) of
    open_clip's BPE into ``folder``; returns their paths."""
    folder = Path(folder)
    vocab, merges = open_clip_bpe_vocab(bpe_path)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path


def convert_clip_model_folder(src: str | Path, dst: str | Path) -> Path:
    """Convert a ``CLIPModel`` folder (``save_pretrained`` layout) into open_clip's ``local-dir:`` layout; its
    ``preprocessor_config.json`` (when present) becomes the ``preprocess_cfg``.

    Raises:
        ValueError: the model or its preprocessing has no open_clip equivalent, or its tokenizer is not open_clip's
            BPE vocabulary (open_clip would tokenize differently); the message names what.
    """
    src = Path(src)
    hf_model = CLIPModel.from_pretrained(src).eval()
    model, model_cfg = transformers_to_open_clip(hf_model)
    try:  # processor_config.json (transformers 5) or preprocessor_config.json (older)
        preprocess_cfg = preprocess_cfg_from_image_processor(CLIPImageProcessor.from_pretrained(src))
    except OSError:
        preprocess_cfg = None
    if any((src / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        vocab = CLIPTokenizer.from_pretrained(src).get_vocab()
        if vocab != open_clip_bpe_vocab()[0]:
            raise ValueError(f"tokenizer in {src}: its vocabulary is not open_clip's BPE vocabulary")
    if preprocess_cfg is None:
        preprocess_cfg = open_clip_preprocess_cfg(model)
    return save_open_clip(model, model_cfg, dst, preprocess_cfg)


__all__ = [
    "clip_config_from_open_clip",
    "clip_image_processor",
    "clip_processor_from_open_clip",
    "clip_tokenizer_from_open_clip",
    "convert_clip_model_folder",
    "convert_open_clip_folder",
    "open_clip_bpe_vocab",
    "open_clip_model_cfg",
    "open_clip_preprocess_cfg",
    "open_clip_state_dict_to_transformers",
    "open_clip_to_transformers",
    "preprocess_cfg_from_image_processor",
    "save_open_clip",
    "save_vocab_files",
    "transformers_state_dict_to_open_clip",
    "transformers_to_open_clip",
]
