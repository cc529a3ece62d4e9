"""ReLoRA as a peft method: restart invariants, optimizer-state pruning, jagged schedule, exact persistence
(fresh process, export to plain LoRA), the transformers Trainer callback, and 2-process DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

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
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "RELORA"
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is ReLoraConfig
    assert (loaded.r, loaded.relora_steps, loaded.prune_method, loaded.prune_ratio) == (16, 700, "random", 0.99)


@pytest.mark.parametrize(
    ("field", "value"),
    [("relora_steps", 0), ("prune_method", "l1"), ("prune_ratio", 1.5), ("restart_warmup_steps", 1000), ("use_dora", True)],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
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
    with pytest.raises(ValueError, match="'l2'"):
        prune_optimizer_state(optimizer, [pruned], method="l2")


def test_random_restart_is_reproducible_from_the_step():
    """What makes DDP ranks agree without communication: same state + same step -> same A and same mask."""
    results = []
    for _ in range(2):
        model, optimizer, _ = _trained_for_restart("random")
        relora_restart(model, optimizer, step=4)
        layer = next(m for m in model.modules() if isinstance(m, ReLoraLinear))
        results.append((layer.lora_A["default"].weight.clone(), optimizer.state[layer.lora_A["default"].weight]["exp_avg"].clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_restart_fails_loudly_when_it_would_prune_nothing():
    model = relora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(RuntimeError, match="pruned no optimizer state"):
        relora_restart(model, optimizer, step=5)  # no step yet: Adam holds no state
    unrelated = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(RuntimeError, match="holds none of the ReLoRA parameters"):
        relora_restart(model, unrelated, step=5)
    with pytest.raises(ValueError, match="no ReLoRA adapter"):
        relora_restart(tiny_llama(), optimizer, step=5)


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


def test_fresh_process_reproduces_trained_models_and_export_loads_without_hfx(runs):
    """One subprocess (interpreter start-up is the cost): first plain peft with `import hfx` blocked loads the
    exported LoRA; then `import hfx` and PeftModel.from_pretrained of the ReLoRA adapters, and merge_and_unload."""
    root = runs["root"]
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys, torch
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

        def logits(model):
            model.eval()
            with torch.no_grad():
                return model(input_ids=batch).logits

        def base():
            return LlamaForCausalLM.from_pretrained(root + "/base")

        lora = peft.PeftModel.from_pretrained(base(), root + "/manual-lora")
        assert type(lora.peft_config["default"]) is peft.LoraConfig
        assert "hfx" not in sys.modules
        print("export", (logits(lora) - expected["manual"]).abs().max().item())

        sys.meta_path.remove(blocker)
        import hfx  # noqa: F401
        for name, folder in (("manual", "manual"), ("trainer", "trainer-final")):
            model = peft.PeftModel.from_pretrained(base(), root + "/" + folder)
            print(name, (logits(model) - expected[name]).abs().max().item())
            merged = model.merge_and_unload()
            assert type(merged) is LlamaForCausalLM, type(merged)
            print(name + "-merged", (logits(merged) - expected[name]).abs().max().item())
        """
    )
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(hfx.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo_root, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = dict(line.split() for line in result.stdout.strip().splitlines())
    assert set(diffs) == {"export", "manual", "manual-merged", "trainer", "trainer-merged"}
    for name, diff in diffs.items():
        assert float(diff) < 1e-5, f"{name}: max logit difference {diff}"


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
