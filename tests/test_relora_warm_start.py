"""ReLoRA's full-rank warm start in the engine (``peft: {method: relora, full_rank_warmup_steps: N}``): the base
trains full-rank for N steps with the adapter idle, then ReLoRA takes over (LR 0 at the switch, restarts at
N + k * relora_steps); a run killed before or after the switch resumes to bit-identical weights, and ``final/``
reloads onto ``final/base`` (the warm-started base) in a fresh process to the trained model's logits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_trainer_peft import IDS, fresh_process_logits, records, tiny_lm

from hfx.trainers import Callback, ConfigError, Trainer

WARM = ("peft={method: relora, r: 4, lora_alpha: 8, relora_steps: 10, restart_warmup_steps: 3, warmup_steps: 2, "
        "min_lr_ratio: 0.1, prune_method: magnitude, prune_ratio: 0.9, full_rank_warmup_steps: 10}")
RUN = (WARM, "scheduler.name=relora_jagged", "train.max_steps=30", "checkpoint.every_steps=5", "checkpoint.total_limit=null")


class Watch(Callback):
    """Which parameters train (require a gradient) after each step, and the LoRA B factors after it."""

    def __init__(self):
        self.trainable: dict[int, set[str]] = {}
        self.b_norm: dict[int, float] = {}

    def on_step_end(self, state, control):
        model = state.models["model"]
        self.trainable[state.global_step] = {n for n, p in model.named_parameters() if p.requires_grad}
        self.b_norm[state.global_step] = sum(float(p.detach().norm()) for n, p in model.named_parameters() if "lora_B" in n)


def resume_from(full_dir: Path, out: Path, checkpoint: str, *extra: str) -> Trainer:
    """A run killed right after ``checkpoint``: its output folder as it was then, resumed with the same recipe."""
    out.mkdir()
    step = int(checkpoint.split("-")[1])
    names = [checkpoint, "tokenizer", "metrics.jsonl", "base"] + (["warm_base"] if step >= 10 else [])
    for name in names:
        (shutil.copytree if (full_dir / name).is_dir() else shutil.copy)(full_dir / name, out / name)
    trainer = Trainer(tiny_lm(out, *RUN, "resume_from_checkpoint=latest", *extra))
    trainer.fit()
    return trainer


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_full_rank_warm_start_switches_resumes_exactly_on_both_sides_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    full_dir = tmp_path / "full"
    watch = Watch()
    full = Trainer(tiny_lm(full_dir, *RUN), callbacks=[watch])
    full.fit()
    assert full.schedulers["main"].lr_lambdas[0].first_restart_offset == 10
    model = full.unwrapped("model")

    # warm-up: every base parameter trains and no LoRA factor; after the switch the reverse
    lora = {n for n, _ in model.named_parameters() if ".lora_" in n}
    base = {n for n, _ in model.named_parameters() if ".lora_" not in n and "original_module" not in n}
    assert watch.trainable[5] == base and watch.trainable[10] == base  # callbacks before the switch see the warm phase
    assert watch.trainable[11] == lora and watch.trainable[30] == lora
    assert watch.b_norm[11] == 0.0 and watch.b_norm[12] > 0.0  # step 11 runs at LR 0, B moves from step 12
    optimizer = full.optimizers["main"].optimizer
    held = {id(p) for p in optimizer.state}
    assert not any(id(p) in held for n, p in model.named_parameters() if n in base)  # full-rank moments freed

    # the LR is 0 right after the switch and ramps back; the restart comes 10 steps after the switch
    lrs = {r["step"]: r["lr"] for r in records(full_dir, "lr")}
    assert lrs[10] == 0.0 and 0 < lrs[11] < lrs[12] < lrs[13] and lrs[9] > 0
    assert [r["step"] for r in records(full_dir, "relora/restart")] == [20]
    assert [r["step"] for r in records(full_dir, "relora/switch_to_low_rank")] == [10]
    layers = [m for m in model.modules() if hasattr(m, "relora_history_A")]
    assert layers and all(m.num_restarts("default") == 1 for m in layers)

    # final/base is the warm-started base: it differs from the untrained one, and the base weights outside the
    # wrapped linears (embeddings, norms: they stopped training at the switch) are still its weights
    warm = AutoModelForCausalLM.from_pretrained(full_dir / "final" / "base").state_dict()
    untrained = AutoModelForCausalLM.from_pretrained(full_dir / "base").state_dict()
    assert not torch.equal(warm["model.norm.weight"], untrained["model.norm.weight"])
    trained = model.get_base_model().state_dict()
    torch.testing.assert_close(trained["model.norm.weight"], warm["model.norm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(trained["model.embed_tokens.weight"], warm["model.embed_tokens.weight"], rtol=0, atol=0)
    proj = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(trained[f"{proj}.base_layer.weight"], warm[f"{proj}.weight"])  # the restart merged into it

    # killed before the switch (checkpoint-5) and after it (checkpoint-15): both resume to the same weights
    for checkpoint in ("checkpoint-5", "checkpoint-15"):
        resumed = resume_from(full_dir, tmp_path / checkpoint, checkpoint)
        assert_same_weights(model, resumed.unwrapped("model"))
        assert records(tmp_path / checkpoint, "relora/restart") == records(full_dir, "relora/restart")
        final = resumed.output_dir / "final" / "base" / "model.safetensors"
        assert final.read_bytes() == (full_dir / "final" / "base" / "model.safetensors").read_bytes()

    # fresh process: only hfx, peft, transformers; the base from final/base
    expected = model.eval()(input_ids=IDS).logits
    logits = fresh_process_logits(full_dir / "final", tmp_path / "logits.pt", base_dir=full_dir / "final" / "base")
    torch.testing.assert_close(logits["adapter"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits["merged"], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("overrides", "message"), [
    ((WARM, "train.max_steps=10"), "peft.full_rank_warmup_steps=10 leaves no ReLoRA step (train.max_steps=10)"),
    ((WARM.replace("}", ", save_base: false}"),),
     "peft.full_rank_warmup_steps trains the base model itself, which final/base must then hold: peft.save_base "
     "must be true"),
    ((WARM, "freeze={train_only: [lora_]}"),
     "peft.full_rank_warmup_steps cannot be combined with freeze.train_only (both decide which parameters train "
     "when)"),
])
def test_warm_start_config_errors_name_the_problem(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        tiny_lm(tmp_path, *overrides)
    assert str(err.value) == message


def test_the_trainer_callback_still_refuses_a_warm_start():
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hfx.peft import ReLoraCallback, ReLoraConfig

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), ReLoraConfig(r=2, relora_steps=10, restart_warmup_steps=2,
                                                                  full_rank_warmup_steps=5))
    with pytest.raises(ValueError, match="full_rank_warmup_steps=5 is not supported by ReLoraCallback"):
        ReLoraCallback().on_train_begin(None, None, None, model=model)


def test_warm_start_trains_every_base_parameter_but_not_the_adapter_or_the_kept_originals():
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hfx.peft import ReLoraConfig
    from hfx.trainers.integrations.relora import FullRankWarmStart

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = get_peft_model(LlamaForCausalLM(config), ReLoraConfig(
        r=2, relora_steps=10, restart_warmup_steps=2, full_rank_warmup_steps=5,
        modules_to_save=["embed_tokens", "lm_head"]))
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = {names[id(p)] for p in FullRankWarmStart.base_parameters(model)}
    # the wrapped linears' own weights and the norms (not in modules_to_save); the trainable copies of
    # modules_to_save train in both phases and are not switched, their originals never train
    assert chosen == {n for n in names.values() if n.endswith(("base_layer.weight", "norm.weight"))}
    assert len(chosen) == 7 + 3
    assert not any("lora_" in n or "modules_to_save" in n or "original_module" in n for n in chosen)
