"""What hfx relies on from the libraries below it, checked on them directly (no hfx code in the path), so an
upstream release that breaks a promise fails here with the cause in its name (run against the newest
releases with ``make test-latest``)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_peft_prompt_learning_generates_with_a_cache_as_without(method):
    """peft's prefix / prompt tuning on a transformers Llama: greedy ``generate`` with the KV cache gives the
    tokens that full forward passes give. transformers 5.24.0 with peft 0.21.2 breaks this for both (prefix
    tuning: the model ignores the deprecated ``past_key_values`` that peft passes, so the prefix is dropped
    while decoding; prompt tuning diverges after two tokens): pyproject.toml excludes that release."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    peft_config = {"prefix_tuning": PrefixTuningConfig, "prompt_tuning": PromptTuningConfig}[method](
        task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = get_peft_model(LlamaForCausalLM(config), peft_config).eval()
    with torch.no_grad():  # a strong prompt, so that dropping it changes the continuation
        for p in model.prompt_encoder.parameters():
            p.normal_(0.0, 1.0)
    prompt = torch.tensor([[5, 17, 42, 99]])
    cached = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    greedy = prompt
    with torch.no_grad():
        for _ in range(8):
            greedy = torch.cat([greedy, model(input_ids=greedy).logits[:, -1:].argmax(-1)], dim=1)
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=prompt).logits
    assert not torch.allclose(plain[:, -1], model(input_ids=prompt).logits[:, -1])  # the prompt matters
    assert cached.tolist() == greedy.tolist()
