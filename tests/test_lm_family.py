"""hfx_lm: parity with transformers' Llama and Mixtral, cached decoding for every option, Transformer-XL
memory, the MoE losses and the config's errors."""

from __future__ import annotations

import pytest
import torch
import transformers
from huggingface_hub.errors import StrictDataclassError

import hfx  # noqa: F401  (registers hfx_lm with the Auto classes)
from hfx.models.lm import HfxLMConfig, HfxLMForCausalLM, XLMemoryCache, from_llama, from_mixtral
from hfx.models.lm.modeling_lm import alibi_slopes, relative_position_bucket

VOCAB = 61
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def tiny(**overrides) -> HfxLMForCausalLM:
    torch.manual_seed(0)
    model = HfxLMForCausalLM(HfxLMConfig(**{**SIZES, **overrides})).eval()
    with torch.no_grad():  # away from the near-uniform initial outputs, so greedy choices are not ties
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    return model


def ids(batch=2, length=20, seed=1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy_without_cache(model, prompt, new_tokens):
    for _ in range(new_tokens):
        nxt = model(prompt, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        prompt = torch.cat([prompt, nxt], dim=1)
    return prompt


def left_padded(batch):
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    labels = batch.masked_fill(mask == 0, -100)
    return mask, labels


# ------------------------------------------------------------------------------------------------ parity
def test_configured_as_llama_it_computes_what_llama_computes():
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, rms_norm_eps=1e-5)).eval()
    ours = from_llama(llama)
    assert isinstance(ours, HfxLMForCausalLM) and ours.config.position == "rope"
    x = ids()
    mask, labels = left_padded(x)
    for kwargs in ({}, {"attention_mask": mask}):
        a, b = llama(x, labels=labels, **kwargs), ours(x, labels=labels, **kwargs)
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-6)
    prompt = x[:, :6]
    greedy = dict(max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **greedy), llama.generate(prompt, **greedy))
    # the eager path (attention maps) computes the same
    eager = ours(x, output_attentions=True)
    torch.testing.assert_close(eager.logits, llama(x).logits, rtol=0, atol=1e-5)
    assert len(eager.attentions) == 2 and eager.attentions[0].shape == (2, 4, 20, 20)


def test_a_llama_converts_with_another_position_encoding_and_keeps_every_other_weight():
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)).eval()
    for position in ("alibi", "relative", "learned"):
        converted = from_llama(llama, position=position, mem_len=0)
        assert converted.config.position == position
        torch.testing.assert_close(converted.model.layers[1].mlp.up_proj.weight, llama.model.layers[1].mlp.up_proj.weight)
        assert torch.isfinite(converted(ids()).logits).all()
    with pytest.raises(ValueError, match="expected a LlamaForCausalLM"):
        from_llama(transformers.MixtralForCausalLM(transformers.MixtralConfig(**SIZES, num_local_experts=2)))
    scaled = transformers.LlamaConfig(**SIZES, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type='linear'"):
        from_llama(transformers.LlamaForCausalLM(scaled))


def test_configured_as_mixtral_it_gives_mixtrals_logits_router_logits_and_aux_loss():
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**SIZES, num_local_experts=8, num_experts_per_tok=2, output_router_logits=True,
                                        router_aux_loss_coef=0.02)
    mixtral = transformers.MixtralForCausalLM(config).eval()
    ours = from_mixtral(mixtral)
    assert ours.config.num_experts == 8 and ours.config.router_aux_loss_coef == 0.02
    x = ids()
    mask, labels = left_padded(x)
    for kwargs in ({}, {"attention_mask": mask}):
        a, b = mixtral(x, labels=labels, **kwargs), ours(x, labels=labels, **kwargs)
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-5)
        for ra, rb in zip(a.router_logits, b.router_logits, strict=True):
            torch.testing.assert_close(rb, ra, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.aux_loss, a.aux_loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-6)
    greedy = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(x[:, :5]), pad_token_id=0)
    assert torch.equal(ours.generate(x[:, :5], **greedy), mixtral.generate(x[:, :5], **greedy))


# ------------------------------------------------------------------------------------------------ decoding
OPTIONS = [
    {"position": "rope"}, {"position": "alibi"}, {"position": "relative"}, {"position": "sinusoidal"},
    {"position": "learned"}, {"position": "none"},
    {"norm": "layernorm", "norm_position": "post", "mlp": "gelu", "attention_bias": True, "mlp_bias": True},
    {"num_key_value_heads": 1}, {"num_experts": 4, "num_experts_per_tok": 2},
    {"position": "alibi", "num_attention_heads": 3, "num_key_value_heads": 3, "hidden_size": 30},
    {"mem_len": 8, "segment_len": 6}, {"mem_len": 8, "segment_len": 6, "position": "alibi"},
    {"mem_len": 5, "segment_len": 4, "position": "relative", "num_experts": 4},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_cached_greedy_generate_equals_greedy_decoding_without_a_cache(options):
    model = tiny(**options)
    prompt = ids(length=7)
    cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                            pad_token_id=0)
    assert torch.equal(cached, greedy_without_cache(model, prompt, 16))
    # and the eager attention path agrees with SDPA
    x = ids()
    sdpa = model(x).logits
    model.config._attn_implementation = "eager"
    torch.testing.assert_close(model(x).logits, sdpa, rtol=0, atol=1e-5)


def test_attention_maps_are_causal_distributions():
    attentions = tiny(position="alibi")(ids(), output_attentions=True).attentions
    for weights in attentions:
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert weights.triu(diagonal=1).abs().max() == 0


# ------------------------------------------------------------------------------------------------ XL memory
def test_xl_memory_carries_context_across_segments_without_gradient():
    model = tiny(mem_len=6, segment_len=6)
    a, b = ids(length=12), ids(length=12, seed=2)
    b[:, 6:] = a[:, 6:]  # same second segment, different first
    la, lb = model(a).logits, model(b).logits
    assert (la[:, 6:] - lb[:, 6:]).abs().max() > 1e-3, "the second segment does not see the first through memory"
    # a memory that holds the whole previous segment gives exactly full attention over both segments (same
    # weights, relative positions); a shorter one does not
    torch.testing.assert_close(tiny(mem_len=0)(a).logits, la, rtol=0, atol=1e-5)
    assert not torch.allclose(tiny(mem_len=3, segment_len=6)(a).logits[:, 6:], la[:, 6:], atol=1e-3)

    # segment by segment with the returned cache equals one pass over the stream
    first = model(a[:, :6], use_cache=True)
    assert isinstance(first.past_key_values, XLMemoryCache) and first.past_key_values.get_seq_length() == 6
    second = model(a[:, 6:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(second.logits, la[:, 6:], rtol=0, atol=1e-5)

    # training: the memory's states are detached, the loss still backpropagates into this segment
    model.train()
    cache = model(a[:, :6], use_cache=True).past_key_values
    assert all(t is None or not t.requires_grad for t in cache.memory + cache.segment)
    model(a[:, 6:], labels=a[:, 6:], past_key_values=cache, use_cache=True).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_xl_memory_cache_state_round_trips_and_refuses_padding():
    model = tiny(mem_len=4, segment_len=3)
    cache = model(ids(length=8), use_cache=True).past_key_values
    restored = XLMemoryCache.from_state_dict(cache.state_dict())
    nxt = ids(length=2, seed=5)
    torch.testing.assert_close(model(nxt, past_key_values=restored).logits, model(nxt, past_key_values=cache).logits)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="unpadded streams"):
        model(ids(length=8), attention_mask=mask)


# ------------------------------------------------------------------------------------------------ MoE
def test_aux_loss_is_added_with_labels_whatever_output_router_logits_says():
    with_aux, without = tiny(num_experts=4, router_aux_loss_coef=0.5), tiny(num_experts=4, router_aux_loss_coef=0.0)
    x = ids()
    out = with_aux(x, labels=x)  # output_router_logits is False: the balancing loss still counts (transformers #44242)
    assert out.router_logits is None and out.aux_loss is not None
    torch.testing.assert_close(out.loss, without(x, labels=x).loss + 0.5 * out.aux_loss)
    z = tiny(num_experts=4, router_aux_loss_coef=0.0, router_z_loss_coef=0.1)(x, labels=x, output_router_logits=True)
    from hfx.models.lm.modeling_lm import router_z_loss
    torch.testing.assert_close(z.loss, without(x, labels=x).loss + 0.1 * router_z_loss(z.router_logits, None))


def test_balancing_loss_is_one_when_balanced_and_the_number_of_experts_when_collapsed():
    from hfx.models.lm.modeling_lm import load_balancing_loss

    balanced = torch.zeros(64, 4)  # equal probabilities; ties go to the lowest experts, so build counts by hand
    collapsed = torch.full((64, 4), -30.0)
    collapsed[:, 0] = 30.0
    assert load_balancing_loss((collapsed,), 1, None).item() == pytest.approx(4.0, rel=1e-4)
    balanced = torch.full((64, 4), -30.0)
    balanced[torch.arange(64), torch.arange(64) % 4] = 30.0
    assert load_balancing_loss((balanced,), 1, None).item() == pytest.approx(1.0, rel=1e-4)


def test_experts_dispatch_equals_a_loop_over_tokens():
    model = tiny(num_experts=4, num_experts_per_tok=2)
    moe = model.model.layers[0].mlp
    x = torch.randn(3, 5, SIZES["hidden_size"])
    out, logits = moe(x)
    flat = x.reshape(-1, x.shape[-1])
    probs = logits.softmax(-1)
    expected = []
    for token, p in zip(flat, probs, strict=True):
        weight, chosen = p.topk(2)
        weight = weight / weight.sum()
        mixed = 0
        for w, e in zip(weight, chosen, strict=True):
            gate, up = (moe.experts.gate_up_proj[e] @ token).chunk(2)
            mixed = mixed + w * (moe.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
        expected.append(mixed)
    torch.testing.assert_close(out.reshape(-1, x.shape[-1]), torch.stack(expected), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ positions
def test_alibi_slopes_and_t5_buckets_match_their_papers():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert alibi_slopes(6).shape == (6,) and alibi_slopes(6)[:4].tolist() == alibi_slopes(4).tolist()
    distance = torch.tensor([0, 1, 15, 16, 40, 127, 128, 1000])
    buckets = relative_position_bucket(distance, 32, 128)
    assert buckets[:3].tolist() == [0, 1, 15] and buckets[3] == 16
    assert buckets.tolist() == sorted(buckets.tolist()) and buckets[-1] == 31 and buckets[-2] == 31


def test_a_learned_table_refuses_positions_beyond_it():
    model = tiny(position="learned", max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(ids(length=17))


@pytest.mark.parametrize("options, message", [
    ({"position": "rotary"}, "position='rotary' is not one of rope, alibi"),
    ({"mem_len": 16, "position": "learned"}, "mem_len=16 needs a position encoding with a relative form"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 must divide num_attention_heads=4"),
    ({"num_experts": 4, "num_experts_per_tok": 5}, "num_experts_per_tok=5 must be in"),
    ({"router_aux_loss_coef": float("nan")}, "router_aux_loss_coef must be a finite number"),
    ({"attention_dropout": 1.0}, "attention_dropout must be in"),
    ({"mem_len": -1}, "mem_len must be >= 0"),
    ({"norm": "batchnorm"}, "norm='batchnorm' is not one of"),
])
def test_bad_options_name_the_field(options, message):
    with pytest.raises(StrictDataclassError, match=message.replace("(", r"\(").replace("[", r"\[")):
        HfxLMConfig(**{**SIZES, **options})


def test_auto_classes_load_it_and_save_load_keeps_logits(tmp_path):
    model = tiny(position="relative", num_experts=2, num_experts_per_tok=1)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is HfxLMForCausalLM
    x = ids()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert type(transformers.AutoModel.from_pretrained(tmp_path)).__name__ == "HfxLMModel"


# ------------------------------------------------------------------------------------------------ review fixes
@pytest.mark.parametrize("options", [{"position": "relative"}, {"position": "relative", "mem_len": 8, "segment_len": 8}])
def test_reentrant_gradient_checkpointing_gives_the_plain_gradients(options):
    model, plain = tiny(**options).train(), tiny(**options).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    x = ids(length=16)
    model(x, labels=x).loss.backward()
    plain(x, labels=x).loss.backward()
    for (name, a), b in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_xl_outputs_over_several_segments_keep_batch_position_order():
    model = tiny(mem_len=12, segment_len=6, num_experts=4)
    x = ids(length=12)
    whole = model(x, output_router_logits=True, output_hidden_states=True)
    first = model(x[:, :6], use_cache=True, output_router_logits=True)
    second = model(x[:, 6:], past_key_values=first.past_key_values, output_router_logits=True)
    for layer, (w, a, b) in enumerate(zip(whole.router_logits, first.router_logits, second.router_logits, strict=True)):
        expected = torch.cat([a.view(2, 6, -1), b.view(2, 6, -1)], dim=1).flatten(0, 1)
        torch.testing.assert_close(w, expected, rtol=0, atol=1e-5, msg=f"layer {layer}")
    assert whole.hidden_states[0].shape == (2, 12, SIZES["hidden_size"])
    with pytest.raises(ValueError, match="output_attentions with mem_len > 0 returns the maps of one segment"):
        model(x, output_attentions=True)


def test_caches_it_cannot_use_are_refused_by_name_and_1d_positions_work():
    model = tiny()
    prompt = ids(length=5)
    with pytest.raises(ValueError, match="hfx_lm takes a DynamicCache"):
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, cache_implementation="static",
                       pad_token_id=0)
    x = ids(batch=1, length=10)
    torch.testing.assert_close(model(x, position_ids=torch.arange(10)).logits, model(x).logits)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_peft_ln_tuning_finds_the_norms(norm_position):
    import peft

    model = peft.get_peft_model(tiny(norm="layernorm", norm_position=norm_position), peft.LNTuningConfig(task_type="CAUSAL_LM"))
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("norm" in n for n in trained)  # only the norms train
