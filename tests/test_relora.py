"""ReLoRA as a peft method: restart invariants, optimizer-state pruning, jagged schedule, exact persistence
(fresh process, export to plain LoRA), the transformers Trainer callback, and 2-process DDP."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import hfx
from hfx.peft import (
    ReLoraCallback,
    ReLoraConfig,
    ReLoraLinear,
    get_jagged_cosine_schedule,
    get_relora_schedule,
    is_restart_step,
    jagged_cosine_multiplier,
    prune_optimizer_state,
    relora_restart,
)

VOCAB = 64



def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def token_batches(n: int, batch: int = 8, length: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Learnable synthetic sequences: x_{i+1} = (5 x_i + 3) mod VOCAB from random starts."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (batch, 1), generator=generator)
        cols = [x]
        for _ in range(length - 1):
            cols.append((5 * cols[-1] + 3) % VOCAB)
        batches.append(torch.cat(cols, dim=1))
    return batches


def relora_model(seed: int = 0, **overrides):
    defaults = dict(r=4, lora_alpha=8, relora_steps=5, restart_warmup_steps=2, warmup_steps=2, prune_ratio=0.9)
    defaults.update(overrides)
    return peft.get_peft_model(tiny_llama(seed), ReLoraConfig(**defaults))


def train(model, optimizer, scheduler, batches, *, restart_every: int | None):
    """The plain loop any engine runs: step, schedule, and a restart after each multiple of restart_every."""
    stats, losses = [], []
    for step, batch in enumerate(batches, start=1):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if restart_every and is_restart_step(step, relora_steps=restart_every) and step < len(batches):
            stats.append(relora_restart(model, optimizer, step=step))
    return stats, losses


@torch.no_grad()
def logits_of(model, batch) -> torch.Tensor:
    model.eval()
    out = model(input_ids=batch).logits
    model.train()
    return out


# ---------------------------------------------------------------- registration and config


def test_registration_is_idempotent_and_config_round_trips(tmp_path):
    hfx.register_all()
    import hfx.peft._registration as registration

    registration.register_peft_method(
        hfx.peft.HfxPeftType.RELORA, ReLoraConfig, hfx.peft.ReLoraModel, prefix="lora_"
    )
    with pytest.raises(ValueError, match="already registered"):
        registration.register_peft_method(hfx.peft.HfxPeftType.RELORA, peft.LoraConfig, hfx.peft.ReLoraModel, "lora_")

    config = ReLoraConfig(r=16, relora_steps=700, prune_method="random", prune_ratio=0.99, target_modules=["q_proj"])
    config.save_pretrained(tmp_path)
    # saved as a sentence: a process without hfx shows it in peft's KeyError (see the fresh-process test)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "RELORA (a PEFT method of the hfx package: install hfx, then import hfx before loading)"
    assert config.peft_type is hfx.peft.HfxPeftType.RELORA  # in memory the type keeps its name
    # hfx 0.1 saved the bare name: such folders still load
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text(json.dumps({**saved, "peft_type": "RELORA"}))
    for folder in (tmp_path, legacy):
        loaded = peft.PeftConfig.from_pretrained(folder)
        assert type(loaded) is ReLoraConfig and loaded.peft_type is hfx.peft.HfxPeftType.RELORA
        assert (loaded.r, loaded.relora_steps, loaded.prune_method, loaded.prune_ratio) == (16, 700, "random", 0.99)
    # code that lists peft's methods by their names sees ReLoRA once
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    names = [str(getattr(key, "value", key)) for key, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items() if cls is ReLoraConfig]
    assert set(names) == {"RELORA"}


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("relora_steps", 0, ValueError), ("relora_steps", -5, ValueError), ("relora_steps", 2.5, TypeError),
        ("relora_steps", "1000", TypeError), ("relora_steps", True, TypeError), ("relora_steps", None, TypeError),
        ("restart_warmup_steps", 1000, ValueError), ("restart_warmup_steps", -1, ValueError),
        ("restart_warmup_steps", NAN, TypeError), ("warmup_steps", -1, ValueError),
        ("full_rank_warmup_steps", -1, ValueError), ("full_rank_warmup_steps", 1.5, TypeError),
        ("restart_seed", 0.5, TypeError),
        ("min_lr_ratio", NAN, ValueError), ("min_lr_ratio", -0.1, ValueError), ("min_lr_ratio", 1.5, ValueError),
        ("min_lr_ratio", "0.1", TypeError),
        ("prune_method", "l1", ValueError), ("prune_method", None, ValueError),
        ("prune_ratio", 1.5, ValueError), ("prune_ratio", 0.0, ValueError), ("prune_ratio", NAN, ValueError),
        ("prune_ratio", INF, ValueError), ("prune_ratio", "0.9", TypeError),
        ("r", 0, ValueError), ("r", 4.0, TypeError), ("lora_alpha", NAN, ValueError), ("lora_alpha", INF, ValueError),
        ("lora_alpha", 0, ValueError), ("lora_alpha", -8, ValueError), ("lora_dropout", 1.0, ValueError),
        ("lora_dropout", NAN, ValueError),
        ("rank_pattern", {"q_proj": 0}, ValueError), ("alpha_pattern", {"q_proj": NAN}, ValueError),
        ("alpha_pattern", [8], TypeError),
        ("use_dora", True, ValueError),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, error):
    with pytest.raises(error, match=rf"ReLoraConfig\.{field}\b"):
        ReLoraConfig(**{"relora_steps": 1000, field: value})


def test_default_targets_every_attention_and_mlp_linear_but_not_the_head():
    model = relora_model()
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, ReLoraLinear)}
    count = sum(isinstance(m, ReLoraLinear) for m in model.modules())
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert count == 7 * 2
    assert not isinstance(model.base_model.model.lm_head, ReLoraLinear)


def test_second_relora_adapter_is_refused():
    model = relora_model()
    with pytest.raises(ValueError, match="one ReLoRA adapter"):
        model.add_adapter("other", ReLoraConfig(r=4, relora_steps=5, restart_warmup_steps=2))


# ---------------------------------------------------------------- schedule


def test_jagged_schedule_matches_the_reference_values():
    kwargs = dict(num_training_steps=20_000, warmup_steps=500, relora_steps=5000, restart_warmup_steps=100, min_lr_ratio=0.1)
    assert jagged_cosine_multiplier(250, **kwargs) == pytest.approx(0.5)
    assert jagged_cosine_multiplier(5000, **kwargs) == 0.0
    assert jagged_cosine_multiplier(5050, **kwargs) == pytest.approx(0.441, abs=5e-4)
    assert jagged_cosine_multiplier(5100, **kwargs) == pytest.approx(0.882, abs=5e-4)
    assert jagged_cosine_multiplier(19_999, **kwargs) == pytest.approx(0.1, abs=1e-6)
    # between restarts it is the cosine envelope itself, continuous at the end of each ramp
    progress = (4000 - 500) / 19_500
    assert jagged_cosine_multiplier(4000, **kwargs) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    assert jagged_cosine_multiplier(10_099, **kwargs) == pytest.approx(jagged_cosine_multiplier(10_100, **kwargs), abs=0.01)
    # with a full-rank warm start of 1,000 steps: a ramp at the switch, then restarts every 5,000 steps after it
    warm = dict(kwargs, first_restart_offset=1000)
    assert jagged_cosine_multiplier(1000, **warm) == 0.0 and jagged_cosine_multiplier(6000, **warm) == 0.0
    assert jagged_cosine_multiplier(5000, **warm) > 0.5
    assert [s for s in range(20_000) if is_restart_step(s, relora_steps=5000, first_restart_offset=1000)] == [6000, 11_000, 16_000]


def test_lambda_lr_factory_puts_the_lr_at_zero_on_restart_steps():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    scheduler = get_jagged_cosine_schedule(
        optimizer, num_training_steps=40, relora_steps=10, restart_warmup_steps=4, warmup_steps=3
    )
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [step for step, lr in enumerate(lrs) if lr == 0.0] == [0, 10, 20, 30]
    assert lrs[12] == pytest.approx(0.5 * 0.5 * jagged_cosine_multiplier(
        14, num_training_steps=40, warmup_steps=3, relora_steps=10, restart_warmup_steps=4))
    # its multiplier is saved with the scheduler state, so a resumed scheduler keeps the schedule
    assert scheduler.state_dict()["lr_lambdas"][0]["relora_steps"] == 10


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_training_steps": 0}, ValueError, "num_training_steps=0 must be >= 1"),
        ({"num_training_steps": NAN}, TypeError, "num_training_steps=nan must be an integer"),
        ({"relora_steps": 2.5}, TypeError, "relora_steps=2.5 must be an integer"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps=-1 must be >= 0"),
        ({"restart_warmup_steps": 10}, ValueError, r"restart_warmup_steps \(10\) must be >= 0 and < relora_steps \(10\)"),
        ({"min_lr_ratio": NAN}, ValueError, r"min_lr_ratio=nan must be in \[0, 1\]"),
        ({"min_lr_ratio": 2}, ValueError, r"min_lr_ratio=2.0 must be in \[0, 1\]"),
        ({"first_restart_offset": -3}, ValueError, "first_restart_offset=-3 must be >= 0"),
        ({"last_epoch": "0"}, TypeError, "last_epoch='0' must be an integer"),
    ],
)
def test_schedule_refuses_bad_arguments_naming_them(kwargs, error, message):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    arguments = dict(num_training_steps=40, relora_steps=10, restart_warmup_steps=4) | kwargs
    with pytest.raises(error, match=message):
        get_jagged_cosine_schedule(optimizer, **arguments)
    if "last_epoch" not in kwargs:  # the pure function checks the same arguments
        with pytest.raises(error, match=message):
            jagged_cosine_multiplier(5, **{"warmup_steps": 0, **arguments})
    with pytest.raises(ValueError, match="relora_steps=0 must be >= 1"):
        is_restart_step(10, relora_steps=0)
    with pytest.raises(TypeError, match="config must be a ReLoraConfig, got LoraConfig"):
        get_relora_schedule(optimizer, num_training_steps=40, config=peft.LoraConfig())


# ---------------------------------------------------------------- the restart


def _trained_for_restart(prune_method: str):
    model = relora_model(prune_method=prune_method)
    norm = model.base_model.model.model.norm.weight
    norm.requires_grad_(True)  # a trainable non-LoRA parameter whose optimizer state must stay untouched
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_relora_schedule(optimizer, num_training_steps=50, config=model.peft_config["default"])
    train(model, optimizer, scheduler, token_batches(4), restart_every=None)
    return model, optimizer, norm


@pytest.mark.parametrize(("prune_method", "ratio"), [("reset", 1.0), ("random", 0.9), ("magnitude", 0.9)])
def test_restart_keeps_the_function_merges_and_prunes_lora_state_only(prune_method, ratio):
    model, optimizer, norm = _trained_for_restart(prune_method)
    batch = token_batches(1, seed=1)[0]
    layers = [m for m in model.modules() if isinstance(m, ReLoraLinear)]
    base_before = [m.base_layer.weight.detach().clone() for m in layers]
    A_before = [m.lora_A["default"].weight.detach().clone() for m in layers]
    norm_state = {k: v.clone() for k, v in optimizer.state[norm].items()}
    lora_params = [p for m in layers for p in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    param_ids = [id(p) for p in lora_params]
    logits_before = logits_of(model, batch)

    stats = relora_restart(model, optimizer, step=4)

    assert (logits_of(model, batch) - logits_before).abs().max() < 1e-5
    for m, base, A in zip(layers, base_before, A_before):
        assert torch.count_nonzero(m.lora_B["default"].weight) == 0
        assert (m.base_layer.weight - base).abs().max() > 0  # the update moved into the base weight
        assert not torch.equal(m.lora_A["default"].weight, A) and m.lora_A["default"].weight.abs().max() > 0
        assert m.num_restarts("default") == 1
    # the optimizer still holds the very same parameter objects
    assert [id(p) for p in lora_params] == param_ids
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} >= set(param_ids)

    assert stats.layers == len(layers)
    assert stats.pruned_fraction == pytest.approx(ratio, abs=0.02)
    for p in lora_params:
        m, v = optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]
        assert ((v == 0).float().mean().item()) == pytest.approx(ratio, abs=0.02)
        # one mask per tensor: never a kept first moment with a zeroed second moment
        assert torch.count_nonzero((m != 0) & (v == 0)) == 0
    for key, value in norm_state.items():
        assert torch.equal(optimizer.state[norm][key], value)


def test_prune_optimizer_state_works_on_any_optimizer_and_only_on_the_given_params():
    pruned, kept = torch.nn.Parameter(torch.ones(40, 10)), torch.nn.Parameter(torch.ones(40, 10))
    optimizer = torch.optim.SGD([pruned, kept], lr=0.1, momentum=0.9)
    (pruned.sum() + kept.sum()).backward()
    optimizer.step()
    zeroed, total = prune_optimizer_state(
        optimizer, [pruned], method="random", ratio=0.25, generator=torch.Generator().manual_seed(0)
    )
    assert (zeroed, total) == (100, 400)
    assert torch.count_nonzero(optimizer.state[pruned]["momentum_buffer"]) == 300
    assert torch.count_nonzero(optimizer.state[kept]["momentum_buffer"]) == 400


def test_random_restart_is_reproducible_from_the_step():
    """What makes DDP ranks agree without communication: same state + same step -> same A and same mask."""
    results = []
    for _ in range(2):
        model, optimizer, _ = _trained_for_restart("random")
        relora_restart(model, optimizer, step=4)
        layer = next(m for m in model.modules() if isinstance(m, ReLoraLinear))
        results.append((layer.lora_A["default"].weight.clone(), optimizer.state[layer.lora_A["default"].weight]["exp_avg"].clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def _snapshot(model, optimizer) -> dict[str, torch.Tensor]:
    """Every model tensor and every optimizer-state tensor, cloned."""
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, state in enumerate(optimizer.state.values()):
        tensors |= {f"optim.{i}.{k}": v.clone() for k, v in state.items() if torch.is_tensor(v)}
    return tensors


def _assert_unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if before[k].shape != after[k].shape
               or not torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True)]
    assert not changed, f"changed: {changed[:5]}"


@pytest.mark.parametrize("optimizer_kind", ["sgd", "adamw before its first step"])
def test_restart_with_a_stateless_optimizer_merges_and_leaves_the_optimizer_untouched(optimizer_kind):
    """SGD without momentum (also what Trainer(optim="sgd") builds) keeps no per-entry state: the restart merges
    and re-initialises, pruning has nothing to do, the model computes the same, the optimizer is untouched."""
    model = relora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer_kind == "sgd":
        optimizer = torch.optim.SGD(params, lr=0.5)
        for batch in token_batches(3):
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-2)
    assert not optimizer.state  # the premise: no per-entry state at all
    batch = token_batches(1, seed=1)[0]
    before = logits_of(model, batch)
    optimizer_before = copy.deepcopy(optimizer.state_dict())
    layers = [m for m in model.modules() if isinstance(m, ReLoraLinear)]

    stats = relora_restart(model, optimizer, step=3)

    assert (stats.layers, stats.pruned_entries, stats.state_entries) == (len(layers), 0, 0)
    assert (logits_of(model, batch) - before).abs().max() < 1e-5
    assert all(m.num_restarts("default") == 1 and not m.lora_B["default"].weight.any() for m in layers)
    assert optimizer.state_dict() == optimizer_before
    if optimizer_kind == "sgd":  # the merged update is really in the history (B was trained)
        assert all(m.relora_history_B["default"].abs().max() > 0 for m in layers)


def _break_nothing_cases():
    def merged(model, optimizer):
        layer = [m for m in model.modules() if isinstance(m, ReLoraLinear)][-1]  # the last one: the others first
        layer.merge(adapter_names=["default"])
        return {}, RuntimeError, "merged"

    def diverged(model, optimizer):
        layer = [m for m in model.modules() if isinstance(m, ReLoraLinear)][-1]
        layer.lora_B["default"].weight.data[0, 0] = float("nan")
        return {}, RuntimeError, r"layers\.1\.mlp\.down_proj.*NaN"

    def ratio_rounds_to_zero(model, optimizer):
        return {"prune_ratio": 1e-6}, ValueError, "prune_ratio=1e-06 rounds to zero entries"

    def bad_ratio(model, optimizer):
        return {"prune_ratio": float("nan")}, ValueError, r"prune_ratio=nan must be in \[0, 1\]"

    def bad_method(model, optimizer):
        return {"prune_method": "l2"}, ValueError, "prune_method='l2' must be one of 'reset', 'random', 'magnitude'"

    def bad_step(model, optimizer):
        return {"step": -1}, ValueError, "step=-1 must be >= 0"

    def float_step(model, optimizer):
        return {"step": 4.0}, TypeError, "step=4.0 must be an integer"

    return [merged, diverged, ratio_rounds_to_zero, bad_ratio, bad_method, bad_step, float_step]


@pytest.mark.parametrize("case", _break_nothing_cases(), ids=lambda f: f.__name__)
def test_a_refused_restart_changes_nothing_and_names_the_problem(case):
    model, optimizer, _ = _trained_for_restart("random")
    overrides, error, message = case(model, optimizer)
    before = _snapshot(model, optimizer)
    with pytest.raises(error, match=message):
        relora_restart(model, optimizer, **{"step": 4, **overrides})
    _assert_unchanged(before, _snapshot(model, optimizer))


def test_callback_and_export_name_a_bad_adapter(tmp_path):
    with pytest.raises(TypeError, match=r"ReLoraCallback\(adapter_name=3\) must be an adapter name"):
        ReLoraCallback(adapter_name=3)
    with pytest.raises(ValueError, match=r"no ReLoRA adapter 'other' \(it has \['default'\]\)"):
        relora_model().base_model.export_as_lora(tmp_path, adapter_name="other")
    assert not any(tmp_path.iterdir())


def test_restart_refuses_an_unrelated_optimizer_or_model():
    model = relora_model()
    unrelated = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(RuntimeError, match="holds none of the ReLoRA parameters"):
        relora_restart(model, unrelated, step=5)
    with pytest.raises(ValueError, match="no ReLoRA adapter"):
        relora_restart(tiny_llama(), unrelated, step=5)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"ratio": float("nan")}, ValueError, r"prune_ratio=nan must be in \[0, 1\]"),
        ({"ratio": -0.1}, ValueError, r"prune_ratio=-0.1 must be in \[0, 1\]"),
        ({"ratio": 1.5}, ValueError, r"prune_ratio=1.5 must be in \[0, 1\]"),
        ({"ratio": "0.5"}, TypeError, "prune_ratio='0.5' must be a number"),
        ({"generator": 0}, TypeError, "generator=0 must be a torch.Generator"),
        ({"method": "l2"}, ValueError, "prune_method='l2' must be one of"),
    ],
)
def test_prune_optimizer_state_refuses_bad_arguments_and_changes_nothing(kwargs, error, message):
    param = torch.nn.Parameter(torch.ones(40, 10))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.sum().backward()
    optimizer.step()
    before = optimizer.state[param]["momentum_buffer"].clone()
    with pytest.raises(error, match=message):
        prune_optimizer_state(optimizer, [param], **{"method": "random", **kwargs})
    assert torch.equal(optimizer.state[param]["momentum_buffer"], before)


def test_one_mask_per_tensor_keeps_the_first_step_after_a_restart_bounded():
    """Independent masks (the axolotl/reference pattern) leave entries with m != 0 and v = 0; right after a
    restart A's gradient is 0 (B = 0), so Adam moves those entries by lr * m / eps. One mask cannot."""
    steps = {}
    for variant in ("one mask", "independent masks"):
        model, optimizer, _ = _trained_for_restart("magnitude")
        layers = [m for m in model.modules() if isinstance(m, ReLoraLinear)]
        if variant == "one mask":
            relora_restart(model, optimizer, step=4)
        else:
            for m in layers:
                for p in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                    for key in ("exp_avg", "exp_avg_sq"):
                        t = optimizer.state[p][key]
                        k = round(0.9 * t.numel())
                        t.view(-1)[torch.topk(t.abs().flatten(), k, largest=False).indices] = 0
                m.merge_and_reinit("default")
        A_before = [m.lora_A["default"].weight.detach().clone() for m in layers]
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = 1e-3, 0.0
        batch = token_batches(1, seed=2)[0]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        steps[variant] = max((m.lora_A["default"].weight - a).abs().max().item() for m, a in zip(layers, A_before)) / 1e-3
    assert steps["one mask"] < 5.0
    assert steps["independent masks"] > 100.0


def test_restart_is_safe_with_a_grad_scaler():
    """State is pruned in place, so GradScaler keeps finding the optimizer's parameters and state
    (replacing state tensors is what broke fp16 runs elsewhere: "No inf checks were recorded")."""
    model = relora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_relora_schedule(optimizer, num_training_steps=12, config=model.peft_config["default"])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step, batch in enumerate(token_batches(12), start=1):
        scaler.scale(model(input_ids=batch, labels=batch).loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad()
        if is_restart_step(step, relora_steps=5) and step < 12:
            relora_restart(model, optimizer, step=step)
    layer = next(m for m in model.modules() if isinstance(m, ReLoraLinear))
    assert layer.num_restarts("default") == 2
    assert torch.count_nonzero(layer.lora_B["default"].weight) > 0  # trained again after the last restart
    assert math.isfinite(scaler.get_scale())


def test_training_with_restarts_keeps_improving():
    model = relora_model(relora_steps=15, restart_warmup_steps=3, warmup_steps=3, r=8, lora_alpha=32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    scheduler = get_relora_schedule(optimizer, num_training_steps=60, config=model.peft_config["default"])
    stats, losses = train(model, optimizer, scheduler, token_batches(60), restart_every=15)
    assert [s.step for s in stats] == [15, 30, 45]
    assert all(math.isfinite(x) for x in losses)
    for restart in (15, 30, 45):
        before = sum(losses[restart - 3 : restart]) / 3
        after = max(losses[restart : restart + 5])
        assert after < 1.1 * before, f"loss jumped after the restart at step {restart}: {before:.3f} -> {after:.3f}"
    # still learning after three restarts
    assert sum(losses[-5:]) / 5 < sum(losses[10:15]) / 5 - 0.1


# ---------------------------------------------------------------- persistence: runs shared by several tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A manually looped ReLoRA run and a Trainer run, both with restarts, and what a fresh process needs."""
    root = tmp_path_factory.mktemp("relora")
    batch = token_batches(1, seed=3)[0]
    tiny_llama().save_pretrained(root / "base")  # the original base, as a user would have it on disk

    model = relora_model(modules_to_save=["lm_head"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_relora_schedule(optimizer, num_training_steps=17, config=model.peft_config["default"])
    train(model, optimizer, scheduler, token_batches(17), restart_every=5)  # restarts at 5, 10, 15
    model.save_pretrained(root / "manual")
    model.export_as_lora(root / "manual-lora")
    expected = {"manual": logits_of(model, batch)}

    trainer_model = relora_model(relora_steps=4, restart_warmup_steps=1, warmup_steps=1)
    data = [{"input_ids": b[0], "labels": b[0]} for b in token_batches(48, batch=1)]
    args = TrainingArguments(
        output_dir=str(root / "trainer"), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
        save_steps=6, logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    )
    callback = ReLoraCallback()
    trainer = Trainer(model=trainer_model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    trainer.save_model(str(root / "trainer-final"))
    expected["trainer"] = logits_of(trainer_model, batch)
    save_file({k: v.contiguous() for k, v in expected.items()} | {"batch": batch}, root / "expected.safetensors")
    peft.get_peft_model(tiny_llama(), hfx.peft.BottleneckAdapterConfig(bottleneck_size=4)).save_pretrained(
        root / "bottleneck")
    return {"root": root, "model": model, "trainer": trainer, "callback": callback, "batch": batch, "data": data,
            "expected": expected, "args": args}


def test_trainer_callback_restarts_on_schedule_with_zero_lr(runs):
    callback, trainer = runs["callback"], runs["trainer"]
    assert [s.step for s in callback.restarts] == [4, 8]
    assert all(s.pruned_fraction == pytest.approx(0.9, abs=0.02) for s in callback.restarts)
    lr_by_step = {log["step"]: log["learning_rate"] for log in trainer.state.log_history if "learning_rate" in log}
    # the Trainer logs at step s the LR that step s used: the first step after each restart has LR 0
    assert lr_by_step[5] == 0.0 and lr_by_step[9] == 0.0
    assert lr_by_step[4] > 0 and lr_by_step[6] > 0 and lr_by_step[10] > 0
    layer = next(m for m in trainer.model.modules() if isinstance(m, ReLoraLinear))
    assert layer.num_restarts("default") == 2


class _LogitsProbe(TrainerCallback):
    """Records the model's logits on one batch at the end of every step (where it sits among the callbacks
    decides whether that is before or after ReLoraCallback's restart)."""

    def __init__(self, batch: torch.Tensor):
        self.batch, self.logits = batch, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.logits[state.global_step] = logits_of(model, self.batch)


def test_trainer_with_plain_sgd_restarts_and_keeps_the_model_function(tmp_path):
    """Trainer(optim="sgd") builds SGD without momentum: no optimizer state to prune, the restarts still happen
    and leave the function of the model unchanged."""
    batch = token_batches(1, seed=4)[0]
    model = relora_model(relora_steps=3, restart_warmup_steps=1, warmup_steps=1)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=7, per_device_train_batch_size=4, learning_rate=0.5, optim="sgd",
        save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    )
    data = [{"input_ids": b[0], "labels": b[0]} for b in token_batches(28, batch=1)]
    before, relora, after = _LogitsProbe(batch), ReLoraCallback(), type("AfterProbe", (_LogitsProbe,), {})(batch)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[before, relora, after])
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0 and not optimizer.state
    assert [(s.step, s.pruned_entries, s.state_entries) for s in relora.restarts] == [(3, 0, 0), (6, 0, 0)]
    layer = next(m for m in model.modules() if isinstance(m, ReLoraLinear))
    assert layer.num_restarts("default") == 2 and layer.relora_history_B["default"].abs().max() > 0
    for step in (3, 6):
        assert (after.logits[step] - before.logits[step]).abs().max() < 1e-5
    assert torch.equal(before.logits[4], after.logits[3])  # LR 0 for the step right after a restart
    assert (before.logits[5] - before.logits[4]).abs().max() > 1e-4  # and training goes on


def test_fresh_process_reproduces_trained_models_and_export_loads_without_hfx(runs):
    """One subprocess (interpreter start-up is the cost). First plain peft with `import hfx` blocked, as for a
    user without hfx: it loads the exported LoRA, and loading a ReLoRA or bottleneck adapter fails with peft's
    KeyError, whose text (the saved peft_type) says to install and import hfx. Then `import hfx` and
    PeftModel.from_pretrained of the ReLoRA adapters, and merge_and_unload."""
    root = runs["root"]
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys, torch
        torch.set_num_threads(1)

        class BlockHfx(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "hfx" or name.startswith("hfx."):
                    raise ImportError("hfx is blocked in this process")

        blocker = BlockHfx()
        sys.meta_path.insert(0, blocker)
        import peft
        from safetensors.torch import load_file
        from transformers import LlamaForCausalLM

        root = {str(root)!r}
        expected = load_file(root + "/expected.safetensors")
        batch = expected["batch"]
        out = {{}}

        def logits(model):
            model.eval()
            with torch.no_grad():
                return model(input_ids=batch).logits

        def base():
            return LlamaForCausalLM.from_pretrained(root + "/base")

        lora = peft.PeftModel.from_pretrained(base(), root + "/manual-lora")
        assert type(lora.peft_config["default"]) is peft.LoraConfig
        out["export"] = (logits(lora) - expected["manual"]).abs().max().item()
        for folder in ("manual", "bottleneck"):
            for load in (lambda: peft.PeftModel.from_pretrained(base(), root + "/" + folder),
                         lambda: peft.PeftConfig.from_pretrained(root + "/" + folder)):
                try:
                    load()
                    out["no-hfx-" + folder] = "loaded"
                except KeyError as err:  # what the user sees is the traceback's last line
                    out["no-hfx-" + folder] = "KeyError: " + str(err)
        assert "hfx" not in sys.modules

        sys.meta_path.remove(blocker)
        import hfx  # noqa: F401
        for name, folder in (("manual", "manual"), ("trainer", "trainer-final")):
            model = peft.PeftModel.from_pretrained(base(), root + "/" + folder)
            out[name] = (logits(model) - expected[name]).abs().max().item()
            merged = model.merge_and_unload()
            assert type(merged) is LlamaForCausalLM, type(merged)
            out[name + "-merged"] = (logits(merged) - expected[name]).abs().max().item()
        print(json.dumps(out))
        """
    )
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(hfx.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo_root, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    hint = "(a PEFT method of the hfx package: install hfx, then import hfx before loading)"
    assert out.pop("no-hfx-manual") == f"KeyError: 'RELORA {hint}'"
    assert out.pop("no-hfx-bottleneck") == f"KeyError: 'BOTTLENECK_ADAPTER {hint}'"
    assert set(out) == {"export", "manual", "manual-merged", "trainer", "trainer-merged"}
    for name, diff in out.items():
        assert diff < 1e-5, f"{name}: max logit difference {diff}"


def test_adapters_saved_with_the_bare_peft_type_still_load(runs, tmp_path):
    """hfx 0.1 wrote "peft_type": "RELORA"; such folders load as before."""
    legacy = tmp_path / "legacy"
    shutil.copytree(runs["root"] / "manual", legacy)
    config = json.loads((legacy / "adapter_config.json").read_text())
    (legacy / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "RELORA"}))
    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(runs["root"] / "base"), legacy)
    assert type(model.peft_config["default"]) is ReLoraConfig
    assert (logits_of(model, runs["batch"]) - runs["expected"]["manual"]).abs().max() < 1e-5


def test_saved_adapter_holds_the_history_and_export_has_rank_k_plus_one_times_r(runs):
    root = runs["root"]
    saved = load_file(root / "manual" / "adapter_model.safetensors")
    q_hist = saved["base_model.model.model.layers.0.self_attn.q_proj.relora_history_A"]
    assert q_hist.shape == (3 * 4, 32)  # 3 restarts of rank 4
    exported = load_file(root / "manual-lora" / "adapter_model.safetensors")
    assert exported["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (16, 32)
    assert "base_model.model.lm_head.weight" in exported  # modules_to_save come along
    config = json.loads((root / "manual-lora" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 16, 16)


def test_full_state_dict_checkpoint_resumes_into_a_freshly_wrapped_model(runs, tmp_path):
    """What an engine checkpoint (Accelerate's save_state: model.state_dict() as safetensors) relies on: the
    history buffers, whose size grows with each restart, load into a model that has none yet."""
    trained = runs["model"]
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / "model.safetensors")
    resumed = relora_model(modules_to_save=["lm_head"])
    resumed.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert (logits_of(resumed, runs["batch"]) - runs["expected"]["manual"]).abs().max() < 1e-6
    layer = next(m for m in resumed.modules() if isinstance(m, ReLoraLinear))
    assert layer.num_restarts("default") == 3


def test_loading_onto_a_trained_model_replaces_its_history(runs):
    """What Trainer(load_best_model_at_end) and resuming do: load a checkpoint into a model that already
    carries another history. The result must equal loading that checkpoint onto the original base."""
    root = runs["root"]
    checkpoint = root / "trainer" / "checkpoint-6"
    fresh = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base"), checkpoint)
    trained = runs["trainer"].model
    trained.load_adapter(str(checkpoint), "default", is_trainable=True)
    assert (logits_of(trained, runs["batch"]) - logits_of(fresh, runs["batch"])).abs().max() < 1e-5


def test_trainer_resume_from_checkpoint_reproduces_the_uninterrupted_run(runs):
    root = runs["root"]
    resumed_model = relora_model(relora_steps=4, restart_warmup_steps=1, warmup_steps=1)
    args = TrainingArguments(**{**runs["args"].to_dict(), "output_dir": str(root / "trainer-resumed")})
    trainer = Trainer(model=resumed_model, args=args, train_dataset=runs["data"], callbacks=[ReLoraCallback()])
    trainer.train(resume_from_checkpoint=str(root / "trainer" / "checkpoint-6"))
    diff = (logits_of(resumed_model, runs["batch"]) - runs["expected"]["trainer"]).abs().max()
    assert diff < 1e-5


# ---------------------------------------------------------------- peft's adapter calls: what the adapter is


def _trained_or_loaded(runs, how: str):
    """The manual run's model (3 restarts, lm_head in modules_to_save): as trained in this process (a copy), or
    loaded onto the original base from its saved adapter. Also the original base (W_0) for comparison."""
    original = LlamaForCausalLM.from_pretrained(runs["root"] / "base").eval()
    if how == "trained":
        return copy.deepcopy(runs["model"]), original
    base = LlamaForCausalLM.from_pretrained(runs["root"] / "base")
    return peft.PeftModel.from_pretrained(base, runs["root"] / "manual"), original


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {name: m.get_base_layer().weight for name, m in model.named_modules() if isinstance(m, ReLoraLinear)}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("how", ["trained", "loaded"])
def test_disable_adapter_computes_the_original_base_and_changes_no_weight(runs, how):
    model, original = _trained_or_loaded(runs, how)
    batch = runs["batch"]
    trained = logits_of(model, batch)
    assert (trained - runs["expected"]["manual"]).abs().max() < 1e-5
    base = logits_of(original, batch)
    assert (trained - base).abs().max() > 0.1  # the premise: the adapter (history included) matters
    weights = {k: w.detach().clone() for k, w in _base_weights(model).items()}

    with model.disable_adapter():
        disabled = logits_of(model, batch)
    assert (disabled - base).abs().max() < 1e-5
    # leaving the context gives back the very same weights and outputs, bit for bit
    assert all(torch.equal(w, weights[k]) for k, w in _base_weights(model).items())
    assert torch.equal(logits_of(model, batch), trained)

    # a mixed batch: rows asking for "__base__" get the original base, the others the adapter
    names = ["__base__", "default"] * (batch.shape[0] // 2)
    with torch.no_grad():
        mixed = model.eval()(input_ids=batch, adapter_names=names).logits
    assert (mixed[0::2] - base[0::2]).abs().max() < 1e-5
    assert (mixed[1::2] - trained[1::2]).abs().max() < 1e-5


@pytest.mark.parametrize("how", ["trained", "loaded"])
def test_merge_and_unload_returns_the_trained_model_and_unload_the_original_base(runs, how):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, original = _trained_or_loaded(runs, how)
    batch = runs["batch"]
    trained = logits_of(model, batch)
    trained_head = model.base_model.model.lm_head.modules_to_save["default"].weight.detach().clone()

    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged) is LlamaForCausalLM
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert (logits_of(merged, batch) - trained).abs().max() < 1e-5

    unloaded = model.unload()
    assert type(unloaded) is LlamaForCausalLM
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    # W_0 everywhere (up to the rounding of subtracting the history), except what modules_to_save trained: peft's
    # unload keeps those trained copies, for ReLoRA as for LoRA
    state, reference = unloaded.state_dict(), original.state_dict()
    assert torch.equal(state.pop("lm_head.weight"), trained_head)
    reference.pop("lm_head.weight")
    assert _max_difference(state, reference) < 1e-6
    original.lm_head.weight.data.copy_(trained_head)
    assert (logits_of(unloaded, batch) - logits_of(original, batch)).abs().max() < 1e-5


@pytest.mark.parametrize("how", ["trained", "loaded"])
def test_delete_adapter_takes_its_merged_history_out_of_the_base(runs, how):
    model, original = _trained_or_loaded(runs, how)
    reference = {name: original.get_submodule(name.removeprefix("base_model.model.")).weight
                 for name in _base_weights(model)}
    assert _max_difference(_base_weights(model), reference) > 1e-3  # the premise: the history is in the base
    assert model.delete_adapter("default") is None
    assert model.peft_config == {}
    inner = model.base_model.model  # peft's PeftModel cannot run without an adapter (for LoRA too)
    assert _max_difference(_base_weights(model), reference) < 1e-6
    assert (logits_of(inner, runs["batch"]) - logits_of(original, runs["batch"])).abs().max() < 1e-5


def test_loading_a_bad_history_fails_before_changing_the_base(runs, tmp_path):
    """The base weights are only changed once every saved history has been checked (the last layer is broken, so
    a loader that replays layer by layer would already have rewritten all the others)."""
    key = "base_model.model.model.layers.1.mlp.down_proj.relora_history_A"
    breaks = {
        "nan": (lambda t: t.index_fill(1, torch.tensor([0]), float("nan")), "NaN or infinite"),
        "rows": (lambda t: t[:-1], r"does not fit this layer: expected \(k\*4, 64\)"),
        "half": (None, r"lacks '[\w.]*down_proj\.relora_history_A\.default' \(it has the other history tensor\)"),
    }
    for kind, (corrupt, message) in breaks.items():
        folder = tmp_path / kind
        shutil.copytree(runs["root"] / "manual", folder)
        tensors = load_file(folder / "adapter_model.safetensors")
        if corrupt is None:
            del tensors[key]
        else:
            tensors[key] = corrupt(tensors[key]).contiguous()
        save_file(tensors, folder / "adapter_model.safetensors")
        base = LlamaForCausalLM.from_pretrained(runs["root"] / "base")
        before = {k: v.detach().clone() for k, v in base.state_dict().items()}
        parameters = dict(base.named_parameters())
        with pytest.raises(ValueError, match=rf"[\w.]*model\.layers\.1\.mlp\.down_proj.*{message}"):
            peft.PeftModel.from_pretrained(base, folder)
        assert all(torch.equal(parameters[k], v) for k, v in before.items() if k in parameters)


# ---------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    model = relora_model(prune_method="random", relora_steps=3, restart_warmup_steps=1, warmup_steps=1)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_relora_schedule(optimizer, num_training_steps=9, config=model.peft_config["default"])
    checks = []
    for step, batch in enumerate(token_batches(9, seed=10 + rank), start=1):  # each rank sees different data
        ddp(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if is_restart_step(step, relora_steps=3) and step < 9:
            relora_restart(ddp, optimizer, step=step)
            flat = torch.cat([t.detach().flatten() for t in model.state_dict().values()])
            state = torch.cat([optimizer.state[p]["exp_avg"].flatten() for p in optimizer.param_groups[0]["params"]])
            gathered = [torch.zeros_like(flat) for _ in range(world_size)]
            dist.all_gather(gathered, flat)
            gathered_state = [torch.zeros_like(state) for _ in range(world_size)]
            dist.all_gather(gathered_state, state)
            checks.append(bool(torch.equal(gathered[0], gathered[1]) and torch.equal(gathered_state[0], gathered_state[1])))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(checks, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_end_each_restart_with_identical_weights(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "checks.json"
    mp.spawn(_ddp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    assert json.loads(out.read_text()) == [True, True]
