"""Configuration of hfx's decoder-only language model: every position encoding, norm, MLP, attention
sharing, Mixture-of-Experts and Transformer-XL memory option is one field."""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

#: position -> whether it has a relative form (what Transformer-XL memory needs: memory keys sit at
#: positions before the segment, so an absolute encoding would give the same position two meanings).
POSITIONS = {"rope": True, "alibi": True, "relative": True, "none": True, "sinusoidal": False, "learned": False}
NORMS = ("rmsnorm", "layernorm")
NORM_POSITIONS = ("pre", "post")
MLPS = ("swiglu", "gelu")


@strict
class HfxLMConfig(PreTrainedConfig):
    r"""Configuration of :class:`HfxLMModel` / :class:`HfxLMForCausalLM`, a decoder-only transformer.

    Configured as Llama (the defaults: ``position="rope"``, ``norm="rmsnorm"``, ``mlp="swiglu"``, no biases)
    it computes exactly what ``LlamaForCausalLM`` computes; with ``num_experts=8, num_experts_per_tok=2``
    exactly what ``MixtralForCausalLM`` computes (see :mod:`hfx.models.lm.convert`).

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: the usual sizes.
        num_key_value_heads: heads of keys and values. ``num_attention_heads`` (None) is multi-head
            attention, fewer is grouped-query attention (a divisor of ``num_attention_heads``), 1 is
            multi-query attention. It shrinks the decoding KV cache, not the training step.
        head_dim: width of one head; None is ``hidden_size // num_attention_heads``.
        max_position_embeddings: rows of the ``learned`` position table (the longest input it accepts);
            for the other encodings only a default length.
        position: ``"rope"`` (rotary, ``rope_theta``), ``"alibi"`` (linear distance penalty per head, Press
            et al. 2022), ``"relative"`` (T5's learned bias per log-spaced distance bucket, shared by all
            layers), ``"sinusoidal"`` (added to the embeddings, Vaswani et al. 2017), ``"learned"`` (a learned
            table added to the embeddings) or ``"none"`` (the causal mask alone tells order).
        relative_attention_num_buckets, relative_attention_max_distance: T5's buckets (half exact, half
            log-spaced up to the maximum distance) for ``position="relative"``.
        norm: ``"rmsnorm"`` or ``"layernorm"``; norm_position: ``"pre"`` (norm inside the residual branch
            and once at the end: Llama, GPT-2) or ``"post"`` (after each residual sum: the 2017 transformer).
        norm_eps: epsilon of the norms.
        mlp: ``"swiglu"`` (gated SiLU, three matrices: Llama) or ``"gelu"`` (two matrices: GPT-2).
        attention_bias, mlp_bias: biases on the projections.
        attention_dropout, hidden_dropout: dropout on attention weights and on each residual branch.
        num_experts: 0 is a dense MLP; >= 1 replaces every MLP by that many experts, of which each token uses
            ``num_experts_per_tok`` (Mixtral: 8 and 2), weighted by its renormalised router probabilities.
        router_aux_loss_coef: weight of the load-balancing loss (Switch Transformer), added to the loss
            whenever it is > 0 and labels are given (padding excluded), whatever ``output_router_logits`` says.
        router_z_loss_coef: weight of the router z-loss (ST-MoE: the squared log-sum-exp of the router logits).
        router_jitter_noise: in training, router inputs are multiplied by U(1 - noise, 1 + noise).
        output_router_logits: return each layer's router logits (and the aux loss) by default.
        mem_len: Transformer-XL memory: every layer keeps the last ``mem_len`` hidden states of the previous
            segments (gradient stopped) as extra keys and values. Needs a position encoding with a relative
            form. 0 disables it.
        segment_len: with memory, the segment length: a forward pass over more tokens processes them segment
            by segment, carrying the memory, which is what decoding with the cache computes too. None is
            ``max_position_embeddings``.
        initializer_range: standard deviation of the normal initialisation.
    """

    model_type = "hfx_lm"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    position: str = "rope"
    rope_theta: float = 10000.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    norm: str = "rmsnorm"
    norm_position: str = "pre"
    norm_eps: float = 1e-6
    mlp: str = "swiglu"
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    num_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0
    output_router_logits: bool = False
    mem_len: int = 0
    segment_len: int | None = None
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checked by ``@strict`` at construction: each message names the field(s) and what is allowed."""
        for name, kind in (("int", int), ("float", (int, float))):
            for field in (_INTS if name == "int" else _FLOATS):
                value = getattr(self, field)
                if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                    raise ValueError(f"{field} must be {'an integer' if name == 'int' else 'a number'}, got {value!r}")
        _choice("position", self.position, tuple(POSITIONS))
        _choice("norm", self.norm, NORMS)
        _choice("norm_position", self.norm_position, NORM_POSITIONS)
        _choice("mlp", self.mlp, MLPS)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "relative_attention_num_buckets",
                     "relative_attention_max_distance"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("head_dim", "segment_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        for name in ("num_experts", "mem_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rope_theta", "norm_eps", "initializer_range"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("attention_dropout", "hidden_dropout", "router_jitter_noise"):
            if not (math.isfinite(getattr(self, name)) and 0 <= getattr(self, name) < 1):
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                             f"{self.num_attention_heads}; set head_dim")
        if self.position == "rope" and self.head_size % 2:
            raise ValueError(f"position='rope' needs an even head width, got head_dim={self.head_size}")
        if self.position == "sinusoidal" and self.hidden_size % 2:
            raise ValueError(f"position='sinusoidal' needs an even hidden_size, got {self.hidden_size}")
        if self.position == "relative" and not (self.relative_attention_num_buckets >= 2 and
                                                self.relative_attention_max_distance > self.relative_attention_num_buckets // 2):
            raise ValueError("position='relative' needs relative_attention_num_buckets >= 2 and "
                             "relative_attention_max_distance > relative_attention_num_buckets // 2, got "
                             f"{self.relative_attention_num_buckets} and {self.relative_attention_max_distance}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts="
                             f"{self.num_experts}]")
        if self.mem_len and not POSITIONS[self.position]:
            relative = ", ".join(name for name, ok in POSITIONS.items() if ok)
            raise ValueError(f"mem_len={self.mem_len} needs a position encoding with a relative form ({relative}); "
                             f"position={self.position!r} is absolute")

    @property
    def head_size(self) -> int:
        """The width of one attention head."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def segment_length(self) -> int:
        """Tokens per segment when Transformer-XL memory is on."""
        return self.segment_len or self.max_position_embeddings


_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings", "relative_attention_num_buckets",
         "relative_attention_max_distance", "num_experts", "num_experts_per_tok", "mem_len", "segment_len")
_FLOATS = ("rope_theta", "norm_eps", "attention_dropout", "hidden_dropout", "router_aux_loss_coef",
           "router_z_loss_coef", "router_jitter_noise", "initializer_range")


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
