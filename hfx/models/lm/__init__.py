"""hfx's decoder-only language-model family (``model_type="hfx_lm"``): every position encoding, norm, MLP,
attention sharing, Mixture-of-Experts and Transformer-XL memory option of one config; converters from
transformers' Llama and Mixtral."""

from .configuration_lm import HfxLMConfig
from .convert import config_from_llama, config_from_mixtral, from_llama, from_mixtral
from .modeling_lm import HfxLMForCausalLM, HfxLMModel, XLMemoryCache

__all__ = ["HfxLMConfig", "HfxLMForCausalLM", "HfxLMModel", "XLMemoryCache", "config_from_llama",
           "config_from_mixtral", "from_llama", "from_mixtral"]
