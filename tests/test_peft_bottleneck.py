"""Bottleneck adapters (Houlsby) as a peft method: the formula, near-identity start, training, save/load,
several adapters on one base, and the merge-free semantics."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hfx  # noqa: F401  (registers the method with peft)
from hfx.peft import BottleneckAdapterConfig, BottleneckAdapterLayer

VOCAB = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        initializer_range=0.2,  # weights of a trained model's magnitude, so small adapters can steer it
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def batch(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (8, 1), generator=generator)
    return (start + torch.arange(16)) % VOCAB  # "count up": learnable


@torch.no_grad()
def logits_of(model, x) -> torch.Tensor:
    model.eval()
    return model(input_ids=x).logits


def test_adapters_follow_attention_output_and_mlp_output_and_compute_the_houlsby_formula():
    model = peft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(bottleneck_size=8, non_linearity="relu"))
    names = sorted(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, BottleneckAdapterLayer))
    assert names == ["down_proj", "down_proj", "o_proj", "o_proj"]

    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    torch.nn.init.normal_(layer.bottleneck_up["default"].weight)  # make the adapter's contribution visible
    x = torch.randn(3, 5, 32)
    h = layer.base_layer(x)
    down, up = layer.bottleneck_down["default"], layer.bottleneck_up["default"]
    expected = h + torch.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(layer(x), expected)


def test_starts_near_the_pretrained_function_and_exactly_at_it_with_zero_init():
    x = batch()
    reference = logits_of(tiny_llama(), x)
    near = peft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(bottleneck_size=8))
    assert (logits_of(near, x) - reference).abs().max() < 0.05 * reference.abs().max()
    exact = peft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(bottleneck_size=8, init_std=0.0))
    torch.testing.assert_close(logits_of(exact, x), reference)


def test_trains_only_the_adapters_and_the_loss_falls():
    model = peft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(bottleneck_size=16))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".bottleneck_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(40):
        x = batch(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_save_load_and_switch_adapters_on_one_base(tmp_path):
    x = batch(1)
    model = peft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(bottleneck_size=8, init_std=0.2), "first")
    model.add_adapter("second", BottleneckAdapterConfig(bottleneck_size=4, init_std=0.2, non_linearity="tanh"))
    first = logits_of(model, x)
    model.set_adapter("second")
    second = logits_of(model, x)
    assert (first - second).abs().max() > 1e-3
    with model.disable_adapter():
        base = logits_of(model, x)
    torch.testing.assert_close(base, logits_of(tiny_llama(), x))
    model.save_pretrained(tmp_path)  # one folder per adapter: tmp_path/first, tmp_path/second
    saved = json.loads((tmp_path / "first" / "adapter_config.json").read_text())
    assert saved["peft_type"] == ("BOTTLENECK_ADAPTER (a PEFT method of the hfx package: install hfx, then import "
                                  "hfx before loading)")

    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "first", adapter_name="first")
    assert type(loaded.peft_config["first"]) is BottleneckAdapterConfig
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    torch.testing.assert_close(logits_of(loaded, x), first)
    loaded.set_adapter("second")  # hot swap on the same base
    torch.testing.assert_close(logits_of(loaded, x), second)

    with pytest.raises(ValueError, match="nonlinear"):
        loaded.merge_and_unload()
    unloaded = loaded.unload()
    assert type(unloaded) is LlamaForCausalLM
    torch.testing.assert_close(logits_of(unloaded, x), base)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("field", "value", "error", "allowed"),
    [
        ("non_linearity", "swish2", ValueError, "must be one of 'relu', 'gelu', 'silu', 'tanh'"),
        ("non_linearity", 3, ValueError, "must be one of"),
        ("bottleneck_size", 0, ValueError, "must be >= 1"),
        ("bottleneck_size", 8.5, TypeError, "must be an integer"),
        ("bottleneck_size", NAN, TypeError, "must be an integer"),
        ("bottleneck_size", True, TypeError, "must be an integer"),
        ("bottleneck_size", "8", TypeError, "must be an integer"),
        ("init_std", NAN, ValueError, "must be a finite number >= 0"),
        ("init_std", INF, ValueError, "must be a finite number >= 0"),
        ("init_std", -0.01, ValueError, "must be a finite number >= 0"),
        ("adapter_dropout", NAN, ValueError, r"must be in \[0, 1\)"),
        ("adapter_dropout", 1.0, ValueError, r"must be in \[0, 1\)"),
        ("adapter_dropout", "0.1", TypeError, "must be a number"),
        ("target_modules", 3, TypeError, "must be None, a regex string or a list of module names"),
        ("target_modules", ["o_proj", 3], TypeError, "must be None, a regex string or a list"),
        ("modules_to_save", "lm_head", TypeError, "must be None or a list of module names"),
    ],
)
def test_bad_config_values_are_named_with_what_is_allowed(field, value, error, allowed):
    with pytest.raises(error, match=rf"BottleneckAdapterConfig\.{field}=.* {allowed}"):
        BottleneckAdapterConfig(**{field: value})


def test_bad_targets_are_named():
    with pytest.raises(ValueError, match="Embedding"):
        peft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(target_modules=["embed_tokens"]))
    # a model type without defaults: say so, and which types have them
    with pytest.raises(ValueError, match=r"target_modules is unset and model type 'custom' has no default .*bert"):
        peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), BottleneckAdapterConfig())


# ---------------------------------------------------------------- default targets, per architecture

LAYERS = 2
_TOKENS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, **_TOKENS)
_ENCODER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2)
_LLAMA_LIKE = ("layers.{i}.self_attn.o_proj", "layers.{i}.mlp.down_proj")
_BERT_LIKE = ("encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.output.dense")
# model type -> (tiny config, the attention output and feed-forward output of layer i, written out by hand)
ARCHITECTURES = {
    **{t: (_DECODER, _LLAMA_LIKE) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2",
                                            "phi3", "hfx_lm")},
    "gpt2": (dict(n_embd=16, n_layer=LAYERS, n_head=2, **_TOKENS), ("h.{i}.attn.c_proj", "h.{i}.mlp.c_proj")),
    "gpt_neox": (dict(_ENCODER, **_TOKENS), ("layers.{i}.attention.dense", "layers.{i}.mlp.dense_4h_to_h")),
    "opt": (dict(hidden_size=16, ffn_dim=32, num_hidden_layers=LAYERS, num_attention_heads=2, word_embed_proj_dim=16,
                 **_TOKENS), ("decoder.layers.{i}.self_attn.out_proj", "decoder.layers.{i}.fc2")),
    "bert": (dict(_ENCODER, vocab_size=VOCAB), _BERT_LIKE),
    "roberta": (dict(_ENCODER, vocab_size=VOCAB, pad_token_id=1), _BERT_LIKE),
    "vit": (dict(_ENCODER, image_size=8, patch_size=4), ("layers.{i}.attention.o_proj", "layers.{i}.mlp.fc2")),
}


def test_every_model_type_with_defaults_is_tested_here():
    from hfx.peft.bottleneck.model import DEFAULT_TARGET_MODULES

    assert set(ARCHITECTURES) == set(DEFAULT_TARGET_MODULES)


def _adapted(model) -> set[str]:
    return {name for name, m in model.base_model.model.named_modules() if isinstance(m, BottleneckAdapterLayer)}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_default_targets_are_the_attention_and_feed_forward_outputs_of_every_layer(model_type):
    from transformers import AutoConfig, AutoModel

    kwargs, templates = ARCHITECTURES[model_type]
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs)),
                                BottleneckAdapterConfig(bottleneck_size=4))
    assert _adapted(model) == {t.format(i=i) for i in range(LAYERS) for t in templates}


def test_bert_defaults_also_hold_under_a_task_head():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = peft.get_peft_model(BertForSequenceClassification(BertConfig(**ARCHITECTURES["bert"][0])),
                                BottleneckAdapterConfig(bottleneck_size=4))
    assert _adapted(model) == {"bert." + t.format(i=i) for i in range(LAYERS) for t in _BERT_LIKE}
