"""hfx's decoder-only language model: one transformer in which each idea of the modern decoder is a config
field (see :class:`HfxLMConfig`).

Read top to bottom: the norms, the position encodings (a table: each adds to the embeddings, rotates
queries and keys, or biases the attention scores), attention (SDPA, or an eager path that returns the
attention maps), the dense MLPs and the Mixture of Experts (tokens sorted by expert, one matrix product
per expert), the decoder layer, Transformer-XL's memory (a transformers ``Cache``), the model and the
causal-LM head with the load-balancing and z-losses. Parameter names are Llama's and Mixtral's, so their
weights load unchanged. Self-contained: it imports only torch, transformers and its sibling configuration
file, so it can be exported as remote code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from .configuration_lm import HfxLMConfig


# ---------------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang and Sennrich 2019), computed in float32 as Llama does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon)).to(dtype)


NORMS = {"rmsnorm": RMSNorm, "layernorm": nn.LayerNorm}


# ---------------------------------------------------------------------------------------------- positions
class PositionEncoding(nn.Module):
    """How a model knows token order. Each encoding does one of three things; the others return None.

    - :meth:`embed`: a vector added to each token embedding (absolute: sinusoidal, learned);
    - :meth:`rotary`: cos/sin tables that rotate queries and keys (RoPE: relative by construction);
    - :meth:`bias`: an additive bias on the attention scores from the query-key distance (ALiBi, T5).
    """

    #: Multiplier of the token embeddings before :meth:`embed` is added.
    embedding_scale: float = 1.0

    def __init__(self, config: HfxLMConfig):
        super().__init__()
        self.config = config

    def embed(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        return None

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def bias(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor | None:
        """(1, heads, queries, keys) float32, from 1-D positions."""
        return None


class SinusoidalPositions(PositionEncoding):
    """sin/cos of the position at geometrically spaced frequencies, added to the embeddings, which are
    multiplied by 1 / initializer_range first: as in Vaswani et al. (section 3.4, embeddings initialised with
    standard deviation d^-1/2 and multiplied by d^1/2), token and position then start at the same scale
    (entries of order 1). Unscaled, the position drowns the token (measured on lm-stdlib at 300 steps:
    held-out perplexity 680; with the paper's sqrt(d) on this initialisation, 210; the other encodings, 80-100)."""

    def __init__(self, config):
        super().__init__(config)
        self.embedding_scale = 1.0 / config.initializer_range

    def embed(self, position_ids, dtype):
        half = self.config.hidden_size // 2
        freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=position_ids.device, dtype=torch.float32) / half)
        angles = position_ids[..., None].float() * freq
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2).to(dtype)


class LearnedPositions(PositionEncoding):
    """A learned vector per position up to ``max_position_embeddings``, added to the embeddings."""

    def __init__(self, config):
        super().__init__(config)
        self.embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def embed(self, position_ids, dtype):
        if int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"position='learned' has max_position_embeddings={self.config.max_position_embeddings} "
                             f"rows; position {int(position_ids.max())} has none (a learned table cannot extrapolate)")
        return self.embedding(position_ids).to(dtype)


class RotaryPositions(PositionEncoding):
    """RoPE (Su et al. 2021): query and key pairs of channels rotated by angle position x frequency, so their
    dot product depends only on the distance. Computed as transformers' Llama computes it."""

    def rotary(self, position_ids, dtype):
        dim = self.config.head_size
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=position_ids.device) / dim))
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes: a geometric sequence starting at 2^(-8/n); for a head count that is not a power
    of two, the power of two below plus every other slope of the one above (as in the paper and Bloom)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBiPositions(PositionEncoding):
    """ALiBi (Press et al. 2022): score - slope_h x distance; no position parameters at all."""

    def bias(self, query_positions, key_positions):
        slopes = alibi_slopes(self.config.num_attention_heads).to(query_positions.device)
        distance = (query_positions[:, None] - key_positions[None, :]).clamp(min=0).float()
        return -(slopes[:, None, None] * distance)[None]


def relative_position_bucket(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal bucketing of ``distance`` (query - key, >= 0): one bucket per distance below half the
    buckets, log-spaced buckets up to ``max_distance``, the last bucket beyond."""
    exact = num_buckets // 2
    logarithmic = exact + (torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
                           * (num_buckets - exact)).long()
    return torch.where(distance < exact, distance, logarithmic.clamp(max=num_buckets - 1))


class RelativePositions(PositionEncoding):
    """T5-style relative bias (Raffel et al. 2020): a learned scalar per head and distance bucket, shared by
    all layers."""

    def __init__(self, config):
        super().__init__(config)
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_attention_heads)

    def bias(self, query_positions, key_positions):
        distance = (query_positions[:, None] - key_positions[None, :]).clamp(min=0)
        buckets = relative_position_bucket(distance, self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None].float()


POSITION_ENCODINGS = {"none": PositionEncoding, "sinusoidal": SinusoidalPositions, "learned": LearnedPositions,
                      "rope": RotaryPositions, "alibi": ALiBiPositions, "relative": RelativePositions}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, L, d) by tables of shape (B | 1, L, d)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


# ---------------------------------------------------------------------------------------------- attention
@dataclass
class AttentionContext:
    """What every layer's attention needs for one chunk of tokens, computed once per chunk: the queries are
    the last ``num_queries`` of ``num_keys`` key positions."""

    num_queries: int
    num_keys: int
    query_rotary: tuple[torch.Tensor, torch.Tensor] | None
    key_rotary: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor | None  # boolean or additive (B | 1, 1 | heads, queries, keys); None: plain causal
    output_attentions: bool


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, kv_heads, L, d) -> (B, kv_heads * groups, L, d): each key/value head shared by ``groups`` query heads."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


class Attention(nn.Module):
    """Multi-head, grouped-query or multi-query causal self-attention."""

    def __init__(self, config: HfxLMConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_size
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor, key_source: torch.Tensor, ctx: AttentionContext,
                past_key_values: Cache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries from ``hidden_states`` (B, L, H); keys and values from ``key_source`` (B, S, H): the same
        tokens, or Transformer-XL's memory followed by them. A transformers cache appends the new keys."""
        b, n = hidden_states.shape[:2]
        q = self.q_proj(hidden_states).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(key_source).view(b, key_source.shape[1], -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(key_source).view(b, key_source.shape[1], -1, self.head_dim).transpose(1, 2)
        if ctx.query_rotary is not None:
            q, k = apply_rotary(q, *ctx.query_rotary), apply_rotary(k, *ctx.key_rotary)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        dropout = self.config.attention_dropout if self.training else 0.0
        if ctx.output_attentions or self.config._attn_implementation == "eager":
            out, weights = self._eager(q, k, v, ctx, dropout)
        else:
            out, weights = self._sdpa(q, k, v, ctx, dropout), None
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), weights

    def _sdpa(self, q, k, v, ctx, dropout):
        groups = self.num_key_value_groups
        gqa = {"enable_gqa": True} if groups > 1 and ctx.mask is None else {}
        if groups > 1 and not gqa:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        causal = ctx.mask is None and ctx.num_queries > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, dropout_p=dropout, is_causal=causal,
                                              scale=self.scaling, **gqa)

    def _eager(self, q, k, v, ctx, dropout):
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        mask = ctx.mask if ctx.mask is not None else causal_mask(ctx.num_queries, ctx.num_keys, q.dtype, q.device)
        weights = F.softmax(scores + additive(mask, q.dtype), dim=-1, dtype=torch.float32).to(q.dtype)
        weights = F.dropout(weights, p=dropout, training=self.training)
        return torch.matmul(weights, v), weights


def causal_mask(num_queries: int, num_keys: int, dtype: torch.dtype, device, bias: torch.Tensor | None = None,
                padding: torch.Tensor | None = None) -> torch.Tensor:
    """The mask of queries that are the last ``num_queries`` of ``num_keys`` positions, (B | 1, 1 | heads,
    queries, keys): without a position ``bias``, boolean (True where a query may look: not at later tokens,
    not at padding), as transformers builds it; with one, additive: the bias where a query may look, the
    dtype's minimum elsewhere."""
    rows = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    allowed = (torch.arange(num_keys, device=device)[None, :] <= rows)[None, None]
    if padding is not None:
        allowed = allowed & padding[:, None, None, -num_keys:].bool()
    if bias is None:
        return allowed
    return torch.where(allowed, bias.to(dtype), torch.finfo(dtype).min)


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as 0 / the dtype's minimum (what the eager path adds to the scores)."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------------------------- MLPs, MoE
ACTIVATIONS = {"swiglu": F.silu, "gelu": F.gelu}


class GatedMLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)), as Llama."""

    def __init__(self, config):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=bias), nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None


class PlainMLP(nn.Module):
    """down(gelu(up(x))), as GPT-2 and the 2017 transformer."""

    def __init__(self, config):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.up_proj, self.down_proj = nn.Linear(h, i, bias=bias), nn.Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x))), None


MLPS = {"swiglu": GatedMLP, "gelu": PlainMLP}


class Experts(nn.Module):
    """``num_experts`` MLPs of the configured kind, stored as 3-D tensors (Mixtral's layout: ``gate_up_proj``
    (E, 2I, H) for SwiGLU, (E, I, H) for GELU; ``down_proj`` (E, H, I))."""

    def __init__(self, config):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        self.act = ACTIVATIONS[config.mlp]
        e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, (2 if self.gated else 1) * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H); each token's ``index`` (N, k) experts mixed by ``weights`` (N, k). The N x k assignments
        are sorted by expert, so each expert multiplies one contiguous block of its tokens."""
        k = index.shape[1]
        flat = index.reshape(-1)
        order = flat.argsort(stable=True)
        tokens = order // k
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        blocks = x[tokens].split(counts)
        outputs = []
        for expert, block in enumerate(blocks):
            if block.shape[0] == 0:
                continue
            hidden = F.linear(block, self.gate_up_proj[expert])
            if self.gated:
                gate, up = hidden.chunk(2, dim=-1)
                hidden = self.act(gate) * up
            else:
                hidden = self.act(hidden)
            outputs.append(F.linear(hidden, self.down_proj[expert]))
        mixed = torch.cat(outputs) * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, mixed.to(x.dtype))


class Router(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))


class SparseMoE(nn.Module):
    """Top-k routing: the router's softmax picks ``num_experts_per_tok`` experts per token, whose
    probabilities (renormalised to sum to 1) weight their outputs. Returns the router logits for the losses."""

    def __init__(self, config):
        super().__init__()
        self.top_k, self.jitter = config.num_experts_per_tok, config.router_jitter_noise
        self.gate = Router(config)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor):
        b, n, h = x.shape
        flat = x.reshape(-1, h)
        router_input = flat
        if self.training and self.jitter > 0:  # multiplicative jitter on what the router sees (Switch; Mixtral
            # multiplies the experts' input too)
            router_input = flat * torch.empty_like(flat).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = F.linear(router_input, self.gate.weight)
        probs = F.softmax(logits.float(), dim=-1)
        top_weights, top_index = torch.topk(probs, self.top_k, dim=-1)
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return self.experts(flat, top_index, top_weights).reshape(b, n, h), logits


# ---------------------------------------------------------------------------------------------- layer
class HfxLMDecoderLayer(GradientCheckpointingLayer):
    """Attention then MLP, each a residual branch, normalised before (pre-norm) or after (post-norm)."""

    def __init__(self, config: HfxLMConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.self_attn = Attention(config, layer_idx)
        self.mlp = SparseMoE(config) if config.num_experts else MLPS[config.mlp](config)
        self.input_layernorm = NORMS[config.norm](config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = NORMS[config.norm](config.hidden_size, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor, ctx: AttentionContext, past_key_values: Cache | None = None,
                memory: torch.Tensor | None = None):
        """``memory`` (B, M, H): Transformer-XL's earlier layer inputs, attended to as extra keys/values."""
        x = self.input_layernorm(hidden_states) if self.pre_norm else hidden_states
        source = x
        if memory is not None:
            source = torch.cat((self.input_layernorm(memory) if self.pre_norm else memory, x), dim=1)
        attended, weights = self.self_attn(x, source, ctx, past_key_values)
        hidden_states = hidden_states + self.dropout(attended)
        if not self.pre_norm:
            hidden_states = self.input_layernorm(hidden_states)
        x = self.post_attention_layernorm(hidden_states) if self.pre_norm else hidden_states
        mixed, router_logits = self.mlp(x)
        hidden_states = hidden_states + self.dropout(mixed)
        if not self.pre_norm:
            hidden_states = self.post_attention_layernorm(hidden_states)
        return hidden_states, weights, router_logits


# ---------------------------------------------------------------------------------------------- XL memory
class XLMemoryCache(Cache):
    """Transformer-XL's recurrence memory as a transformers cache.

    Per layer it holds the layer inputs of up to ``mem_len`` tokens of the finished segments (``memory``) and
    of the segment now open (``segment``), gradient stopped. A segment closes after ``segment_len`` tokens and
    its states join the memory (the oldest drop out). Keys and values are recomputed from these states by the
    current weights, as in the paper. Decoding one token at a time therefore computes exactly what one
    forward pass over the whole stream computes (which walks it segment by segment), and ``generate()``
    uses it like any cache. :meth:`state_dict` / :meth:`load_state_dict` let a training run keep it exactly.
    """

    is_compileable = False

    def __init__(self, num_layers: int, mem_len: int, segment_len: int):
        super().__init__(layers=[])
        self.num_layers, self.mem_len, self.segment_len = num_layers, mem_len, segment_len
        self.memory: list[torch.Tensor | None] = [None] * num_layers
        self.segment: list[torch.Tensor | None] = [None] * num_layers
        self.seen = 0  # tokens processed
        self.open = 0  # tokens of the open segment

    def __repr__(self):
        return f"XLMemoryCache(mem_len={self.mem_len}, segment_len={self.segment_len}, seen={self.seen})"

    def __len__(self) -> int:
        return self.num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def context(self, layer: int) -> torch.Tensor | None:
        """The states a new token of ``layer`` attends to besides itself: memory, then the open segment."""
        parts = [t for t in (self.memory[layer], self.segment[layer]) if t is not None]
        return None if not parts else parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def append(self, layer: int, states: torch.Tensor) -> None:
        states = states.detach()
        old = self.segment[layer]
        self.segment[layer] = states if old is None else torch.cat((old, states), dim=1)

    def to(self, device) -> XLMemoryCache:
        """Move the kept states to ``device`` (a resumed run's memory comes back on the CPU)."""
        self._map(lambda t: t.to(device))
        return self

    def advance(self, num_tokens: int) -> None:
        """After every layer appended ``num_tokens`` states: count them and close a full segment."""
        self.seen += num_tokens
        self.open += num_tokens
        if self.open == self.segment_len:
            for layer in range(self.num_layers):
                states = self.context(layer)
                self.memory[layer] = states[:, -self.mem_len:] if self.mem_len else None
                self.segment[layer] = None
            self.open = 0

    def _map(self, fn) -> None:
        self.memory = [None if t is None else fn(t) for t in self.memory]
        self.segment = [None if t is None else fn(t) for t in self.segment]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("Transformer-XL memory cannot be cropped (it keeps hidden states, not keys)")

    def reset(self) -> None:
        self.memory, self.segment = [None] * self.num_layers, [None] * self.num_layers
        self.seen = self.open = 0

    def state_dict(self) -> dict:
        return {"mem_len": self.mem_len, "segment_len": self.segment_len, "seen": self.seen, "open": self.open,
                "memory": list(self.memory), "segment": list(self.segment)}

    @classmethod
    def from_state_dict(cls, state: dict) -> XLMemoryCache:
        cache = cls(len(state["memory"]), state["mem_len"], state["segment_len"])
        cache.memory, cache.segment = list(state["memory"]), list(state["segment"])
        cache.seen, cache.open = state["seen"], state["open"]
        return cache


# ---------------------------------------------------------------------------------------------- models
class HfxLMPreTrainedModel(PreTrainedModel):
    config_class = HfxLMConfig
    config: HfxLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HfxLMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, Router):
            init.normal_(module.weight, mean=0.0, std=std)


class HfxLMModel(HfxLMPreTrainedModel):
    """The decoder stack: token embeddings, position encoding, layers, final norm (pre-norm only)."""

    def __init__(self, config: HfxLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = POSITION_ENCODINGS[config.position](config)
        self.layers = nn.ModuleList(HfxLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        # Post-norm ends on a norm already; no module named `norm` then (peft's LN tuning targets that name).
        self.norm = NORMS[config.norm](config.hidden_size, eps=config.norm_eps) if config.norm_position == "pre" else None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                output_router_logits: bool | None = None, return_dict: bool | None = None, **kwargs):
        """As a transformers decoder. With ``mem_len > 0`` the tokens are processed segment by segment with
        the memory of ``past_key_values`` (an :class:`XLMemoryCache`; a new one when none or an empty cache
        is given), which is returned when ``use_cache``."""
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = config.use_cache if use_cache is None else use_cache
        flags = {"attentions": config.output_attentions if output_attentions is None else output_attentions,
                 "hidden_states": config.output_hidden_states if output_hidden_states is None else output_hidden_states}
        collected = {"hidden_states": [], "attentions": [], "router_logits": []}
        if config.mem_len:
            hidden, cache = self._forward_with_memory(inputs_embeds, attention_mask, past_key_values, flags, collected)
        else:
            hidden, cache = self._forward(inputs_embeds, attention_mask, position_ids, past_key_values, use_cache,
                                          flags, collected)
        hidden = hidden if self.norm is None else self.norm(hidden)
        if flags["hidden_states"]:
            collected["hidden_states"].append(hidden)
        out = MoeModelOutputWithPast(
            last_hidden_state=hidden, past_key_values=cache if use_cache else None,
            hidden_states=tuple(collected["hidden_states"]) if flags["hidden_states"] else None,
            attentions=tuple(collected["attentions"]) if flags["attentions"] else None,
            router_logits=tuple(collected["router_logits"]) if config.num_experts else None)
        return out if return_dict is not False else out.to_tuple()

    def _forward(self, embeds, attention_mask, position_ids, cache, use_cache, flags, collected):
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None and (type(cache) is not DynamicCache or cache.is_compileable):
            raise ValueError(f"hfx_lm takes a DynamicCache (or, with mem_len > 0, an XLMemoryCache), got "
                             f"{type(cache).__name__}: leave generate()'s cache_implementation unset")
        past = cache.get_seq_length() if cache is not None else 0
        n = embeds.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=embeds.device)[None]
        position_ids = position_ids.view(-1, n)  # (n,) -> (1, n)
        def ctx():
            return self._context(n, past + n, position_ids, None, attention_mask, embeds, flags["attentions"])
        hidden = self._embed(embeds, position_ids)
        for layer in self.layers:
            if flags["hidden_states"]:
                collected["hidden_states"].append(hidden)
            hidden = self._layer(layer, hidden, ctx, collected, flags, past_key_values=cache)
        return hidden, cache

    def _forward_with_memory(self, embeds, attention_mask, cache, flags, collected):
        config = self.config
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("mem_len > 0 (Transformer-XL memory) takes unpadded streams: attention_mask must be all ones")
        if not isinstance(cache, XLMemoryCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(f"mem_len > 0 keeps its memory in an XLMemoryCache, got a filled {type(cache).__name__}")
            cache = XLMemoryCache(config.num_hidden_layers, config.mem_len, config.segment_length)
        outputs, start, total = [], 0, embeds.shape[1]
        if flags["attentions"] and total > cache.segment_len - cache.open:
            raise ValueError("output_attentions with mem_len > 0 returns the maps of one segment: pass at most "
                             f"{cache.segment_len - cache.open} tokens (the rest of the open segment) per call")
        while start < total:
            n = min(total - start, cache.segment_len - cache.open)
            hidden = self.dropout(embeds[:, start:start + n])
            context = cache.context(0)
            keys = n + (0 if context is None else context.shape[1])
            positions = torch.arange(keys, device=embeds.device)
            def ctx(n=n, keys=keys, positions=positions):
                return self._context(n, keys, positions[None, -n:], positions[None], None, embeds, flags["attentions"])
            for i, layer in enumerate(self.layers):
                if flags["hidden_states"]:
                    collected["hidden_states"].append(hidden)
                memory = cache.context(i)
                cache.append(i, hidden)
                hidden = self._layer(layer, hidden, ctx, collected, flags, memory=memory)
            cache.advance(n)
            outputs.append(hidden)
            start += n
        if len(outputs) > 1:  # per-chunk outputs of a long stream: whole-sequence tensors, per layer
            b, chunks = embeds.shape[0], len(outputs)
            for key in ("hidden_states", "router_logits"):
                if collected[key]:
                    layers = len(collected[key]) // chunks
                    parts = [[collected[key][c * layers + i] for c in range(chunks)] for i in range(layers)]
                    if key == "hidden_states":
                        collected[key] = [torch.cat(p, dim=1) for p in parts]
                    else:  # (B * n, E) per chunk -> (B * total, E) in (batch, position) order
                        collected[key] = [torch.cat([t.view(b, -1, t.shape[-1]) for t in p], dim=1).flatten(0, 1)
                                          for p in parts]
        return torch.cat(outputs, dim=1), cache

    def _layer(self, layer, hidden, make_ctx, collected, flags, **kwargs):
        # One context per chunk, shared by the layers; a layer that recomputes its forward in the backward pass
        # (gradient checkpointing) gets its own, so no graph (T5's learned bias) is walked twice.
        if self.gradient_checkpointing and self.training:
            ctx = make_ctx()
        else:
            if getattr(make_ctx, "built", None) is None:
                make_ctx.built = make_ctx()
            ctx = make_ctx.built
        hidden, weights, router_logits = layer(hidden, ctx, **kwargs)
        if flags["attentions"]:
            collected["attentions"].append(weights)
        if router_logits is not None:
            collected["router_logits"].append(router_logits)
        return hidden

    def _embed(self, embeds, position_ids):
        added = self.position.embed(position_ids, embeds.dtype)
        return self.dropout(embeds if added is None else embeds * self.position.embedding_scale + added)

    def _context(self, num_queries, num_keys, query_positions, key_positions, attention_mask, embeds,
                 output_attentions) -> AttentionContext:
        """Rotary tables, position bias and mask for a chunk whose queries are the last ``num_queries`` of
        ``num_keys`` positions. ``key_positions`` None: the keys are the queries (the transformers cache holds
        the earlier keys, already rotated)."""
        dtype, device = embeds.dtype, embeds.device
        query_rotary = self.position.rotary(query_positions, dtype)
        key_rotary = query_rotary if key_positions is None or query_rotary is None else self.position.rotary(key_positions, dtype)
        bias = self.position.bias(torch.arange(num_keys - num_queries, num_keys, device=device),
                                  torch.arange(num_keys, device=device))
        padding = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        plain = bias is None and padding is None and (num_queries == num_keys or num_queries == 1)
        mask = None if plain else causal_mask(num_queries, num_keys, dtype, device, bias, padding)
        return AttentionContext(num_queries, num_keys, query_rotary, key_rotary, mask, output_attentions)


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, E x sum_e f_e x P_e over all layers' tokens: f_e the fraction of
    token-to-expert assignments that go to expert e, P_e its mean router probability; 1 when perfectly
    balanced. ``mask`` (N,) leaves padding out. Equals transformers' ``load_balancing_loss_func``."""
    num_experts = router_logits[0].shape[-1]
    weight = None if mask is None else mask.reshape(-1).float()
    counts = torch.zeros(num_experts, device=router_logits[0].device)
    probs_sum = torch.zeros(num_experts, device=router_logits[0].device)
    rows = 0.0
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, num_experts).sum(1).float()  # (N, E)
        if weight is None:
            counts, probs_sum, rows = counts + chosen.sum(0), probs_sum + probs.sum(0), rows + probs.shape[0]
        else:
            counts = counts + (chosen * weight[:, None]).sum(0)
            probs_sum, rows = probs_sum + (probs * weight[:, None]).sum(0), rows + weight.sum()
    return num_experts * torch.sum(counts / rows * probs_sum / rows)


def router_z_loss(router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> torch.Tensor:
    """ST-MoE's z-loss: the mean squared log-sum-exp of the router logits (keeps them small), over layers."""
    weight = None if mask is None else mask.reshape(-1).float()
    total = 0.0
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1).pow(2)
        total = total + (z.mean() if weight is None else (z * weight).sum() / weight.sum())
    return total / len(router_logits)


class HfxLMForCausalLM(HfxLMPreTrainedModel, GenerationMixin):
    """:class:`HfxLMModel` with a language-modelling head. Loads with ``AutoModelForCausalLM`` and serves
    ``transformers.pipeline("text-generation")`` and ``generate()`` (with the KV cache, or Transformer-XL's
    memory when ``mem_len > 0``)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    hub_pipeline_tag = "text-generation"

    def __init__(self, config: HfxLMConfig):
        super().__init__(config)
        self.model = HfxLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, output_router_logits: bool | None = None,
                return_dict: bool | None = None, logits_to_keep: int | torch.Tensor = 0, **kwargs):
        """Logits and, with ``labels``, the next-token loss (labels are shifted inside; -100 is ignored). With
        experts, ``aux_loss`` is the load-balancing loss; it (times ``router_aux_loss_coef``) and the z-loss
        (times ``router_z_loss_coef``) are added to the loss whenever labels are given and the coefficient is
        > 0, with the padding of ``attention_mask`` left out."""
        config = self.config
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        loss = None if labels is None else self.loss_function(logits, labels, vocab_size=config.vocab_size, **kwargs)
        aux_loss = None
        if config.num_experts:
            n = hidden.shape[1]
            mask = None if attention_mask is None else attention_mask[:, -n:]
            aux_loss = load_balancing_loss(out.router_logits, config.num_experts_per_tok, mask)
            if loss is not None and config.router_aux_loss_coef > 0:
                loss = loss + config.router_aux_loss_coef * aux_loss
            if loss is not None and config.router_z_loss_coef > 0:
                loss = loss + config.router_z_loss_coef * router_z_loss(out.router_logits, mask)
        show_router = config.output_router_logits if output_router_logits is None else output_router_logits
        result = MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions,
            router_logits=out.router_logits if show_router else None)
        return result if return_dict is not False else result.to_tuple()

    @classmethod
    def hub_card_usage(cls, folder) -> str:
        """The model card's line that uses a loaded ``model`` (and its tokenizer) once."""
        return ("from transformers import AutoTokenizer\n\n"
                "tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)  # saved with the model\n"
                'inputs = tokenizer("def ", return_tensors="pt")\n'
                "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40, do_sample=False)[0]))")
