"""Bottleneck adapters (Houlsby) as a peft method: the formula, near-identity start, training, save/load,
several adapters on one base, and the merge-free semantics."""

from __future__ import annotations

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


def test_bad_config_and_bad_targets_are_named():
    with pytest.raises(ValueError, match="non_linearity"):
        BottleneckAdapterConfig(non_linearity="swish2")
    with pytest.raises(ValueError, match="bottleneck_size"):
        BottleneckAdapterConfig(bottleneck_size=0)
    with pytest.raises(ValueError, match="Embedding"):
        peft.get_peft_model(tiny_llama(), BottleneckAdapterConfig(target_modules=["embed_tokens"]))
