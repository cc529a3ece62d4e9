"""From transformers' Llama and Mixtral to :class:`HfxLMForCausalLM`, weights unchanged (the parameter names
are the same), so a user can take a Hub Llama and try another position encoding or Transformer-XL memory
on it::

    from transformers import AutoModelForCausalLM
    from hfx.models.lm import from_llama

    model = from_llama(AutoModelForCausalLM.from_pretrained("path/or/llama-repo"))        # same logits
    alibi = from_llama("path/or/llama-repo", position="alibi")                             # then fine-tune
"""

from __future__ import annotations

import torch

from .configuration_lm import HfxLMConfig
from .modeling_lm import HfxLMForCausalLM

_COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "max_position_embeddings", "attention_bias", "attention_dropout",
           "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"rope_parameters.rope_type={kind!r} (RoPE scaling) is not supported; only 'default'")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _shared_fields(config, **overrides) -> dict:
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config.hidden_act!r}: only 'silu' (SwiGLU) converts")
    fields = {name: getattr(config, name) for name in _COMMON if hasattr(config, name)}
    fields.update(position="rope", rope_theta=_rope_theta(config), norm="rmsnorm", norm_position="pre",
                  norm_eps=config.rms_norm_eps, mlp="swiglu", head_dim=getattr(config, "head_dim", None),
                  mlp_bias=getattr(config, "mlp_bias", False))
    fields.update(overrides)
    return fields


def config_from_llama(config, **overrides) -> HfxLMConfig:
    """The :class:`HfxLMConfig` that computes what a ``LlamaConfig`` describes; ``overrides`` change fields
    (``position="alibi"``, ``mem_len=256``, ...)."""
    return HfxLMConfig(**_shared_fields(config, **overrides))


def config_from_mixtral(config, **overrides) -> HfxLMConfig:
    """The :class:`HfxLMConfig` that computes what a ``MixtralConfig`` describes (no sliding window)."""
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError(f"sliding_window={config.sliding_window}: sliding-window attention is not supported; "
                         "set it to None (Mixtral's default)")
    fields = {"num_experts": config.num_local_experts, "num_experts_per_tok": config.num_experts_per_tok,
              "router_aux_loss_coef": config.router_aux_loss_coef, "router_jitter_noise": config.router_jitter_noise,
              "output_router_logits": config.output_router_logits}
    return HfxLMConfig(**_shared_fields(config, **{**fields, **overrides}))


def from_llama(model, **overrides) -> HfxLMForCausalLM:
    """An :class:`HfxLMForCausalLM` holding the weights of a ``LlamaForCausalLM`` (an instance, or a folder /
    Hub name loaded with ``LlamaForCausalLM.from_pretrained``). Parameters that ``overrides`` add (a learned
    position table, T5 buckets) start from their initialisation."""
    return _convert(model, "LlamaForCausalLM", config_from_llama, overrides)


def from_mixtral(model, **overrides) -> HfxLMForCausalLM:
    """As :func:`from_llama`, for a ``MixtralForCausalLM`` (experts, router and all)."""
    return _convert(model, "MixtralForCausalLM", config_from_mixtral, overrides)


def _convert(model, class_name: str, make_config, overrides) -> HfxLMForCausalLM:
    import transformers

    if not isinstance(model, torch.nn.Module):
        model = getattr(transformers, class_name).from_pretrained(model)
    if type(model).__name__ != class_name:
        raise ValueError(f"expected a {class_name}, got {type(model).__name__}")
    converted = HfxLMForCausalLM(make_config(model.config, **overrides)).to(model.dtype)
    missing, unexpected = converted.load_state_dict(model.state_dict(), strict=False)
    missing = [name for name in missing if not name.startswith("model.position.")
               and not (name == "lm_head.weight" and converted.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{class_name} weights do not map onto hfx_lm: missing {missing}, unexpected {unexpected}")
    if model.generation_config is not None:
        converted.generation_config = model.generation_config
    return converted.eval() if not model.training else converted
