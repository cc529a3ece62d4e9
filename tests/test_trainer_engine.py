"""The engine's loop in this process: accumulation, bf16, several models and optimizers (a toy GAN with
n_critic), callbacks and exact resume, the NaN guard, early stopping, and the two built-in tasks' artifacts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hfx.trainers import (
    Callback,
    NonFiniteLossError,
    Task,
    TaskData,
    Trainer,
    load_config,
    register_task,
    train,
)


def tiny_vit(tmp_path: Path, *overrides: str, **sections) -> dict:
    """image-classification on 8x8 digits with a 1-block ViT: no batch norm, so a batch's gradient does
    not depend on how the batch is split (accumulation, processes). ``sections`` add top-level recipe keys."""
    return load_config({
        "task": "image-classification", "output_dir": str(tmp_path),
        "data": {"dataset": "digits", "options": {"image_size": 8}, "max_eval_samples": 64},
        "task_options": {"model": "timm:vit_tiny_patch16_224",
                         "model_options": {"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}},
        "train": {"max_steps": 10, "batch_size": 32},
        "optimizer": {"lr": 1e-3},
        "log": {"every_steps": 1, "report_to": []},
        "eval": {"at_end": False},
        **sections,
    }, list(overrides))


def records(run_dir: Path, key: str = "loss") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


# ---------------------------------------------------------------------------------------------- the loop
def test_accumulation_4x8_equals_1x32(tmp_path):
    full = train(tiny_vit(tmp_path / "full"))
    accumulated = train(tiny_vit(tmp_path / "acc", "train.batch_size=8", "train.gradient_accumulation_steps=4"))
    assert full.global_step == accumulated.global_step == 10
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "acc" / "final" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # the logged loss is the mean over the accumulation window, so the two curves agree too
    for x, y in zip(records(tmp_path / "full"), records(tmp_path / "acc")):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    train(tiny_vit(tmp_path, "train.mixed_precision=bf16", "train.max_steps=30", "optimizer.lr=3e-3"))
    losses = [r["loss"] for r in records(tmp_path)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


# ---------------------------------------------------------------------------------------------- a toy GAN
@dataclass
class ToyGANOptions:
    n_critic: int = 2
    noise_dim: int = 4


TARGET = torch.tensor([2.0, -1.0])


@register_task("test-toy-gan")
class ToyGAN(Task):
    """A generator learns to place 2-D points where the data (a Gaussian at TARGET) is (LSGAN losses)."""

    Options = ToyGANOptions
    needs_dataset = False

    def build_data(self):
        points = torch.randn(1024, 2, generator=torch.Generator().manual_seed(0)) * 0.3 + TARGET
        return TaskData(train=torch.utils.data.TensorDataset(points), eval=torch.utils.data.TensorDataset(points[:256]))

    def build_models(self):
        generator = torch.nn.Sequential(torch.nn.Linear(self.options.noise_dim, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
        critic = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.LeakyReLU(0.2), torch.nn.Linear(32, 1))
        return {"generator": generator, "discriminator": critic}

    def optimizer_groups(self, models):
        return {"discriminator": ["discriminator"], "generator": ["generator"]}

    def phases(self, state):
        n = self.options.n_critic
        return ["discriminator"] + (["generator"] if state.global_step % n == n - 1 else [])

    def ema_models(self, models):
        return ["generator"]

    def loss(self, models, batch, state):
        real = batch[0]
        fake = models["generator"](torch.randn(real.shape[0], self.options.noise_dim))
        critic = models["discriminator"]
        if state.phase == "discriminator":
            return 0.5 * ((critic(real) - 1) ** 2).mean() + 0.5 * (critic(fake.detach()) ** 2).mean()
        return 0.5 * ((critic(fake) - 1) ** 2).mean()

    @torch.no_grad()
    def evaluate(self, models, loader, state):
        fake = models["generator"](torch.randn(512, self.options.noise_dim, generator=torch.Generator().manual_seed(1)))
        return {"mean_error": float((fake.mean(0) - TARGET).norm())}

    def save(self, models, state_dicts, output_dir):
        for name, state in state_dicts.items():
            save_file({k: v.contiguous() for k, v in state.items()}, output_dir / f"{name}.safetensors")


class Recorder(Callback):
    """Checks, after every step, that the discriminator holds no gradient left over from a generator
    phase, and keeps checkpointed state (a counter and a tensor)."""

    def __init__(self):
        self.steps, self.history = 0, torch.zeros(0)

    def on_step_end(self, state, control):
        critic = state.models["discriminator"]
        assert all(p.grad is None for p in critic.parameters())
        self.steps += 1
        self.history = torch.cat([self.history, torch.tensor([float(state.global_step)])])

    def state_dict(self):
        return {"steps": self.steps, "history": self.history}

    def load_state_dict(self, state):
        self.steps, self.history = state["steps"], state["history"]


def gan_config(out: Path, *overrides: str):
    return load_config({
        "task": "test-toy-gan", "output_dir": str(out), "task_options": {"n_critic": 3},
        "train": {"max_steps": 120, "batch_size": 64},
        "optimizer": {"name": "adam", "lr": 2e-3, "betas": [0.5, 0.999]},
        "optimizers": {"generator": {"lr": 4e-3}},
        "ema": {"enabled": True, "decay": 0.9},
        "checkpoint": {"every_steps": 60},
        "log": {"every_steps": 10, "report_to": []},
    }, list(overrides))


def test_gan_alternates_two_optimizers_with_n_critic_and_resumes_exactly(tmp_path):
    recorder = Recorder()
    trainer = Trainer(gan_config(tmp_path / "a"), [recorder])
    result = trainer.fit()
    untrained = float(TARGET.norm())  # an untrained generator's outputs sit near 0
    assert result.metrics["mean_error"] < 0.25 * untrained
    # n_critic = 3: the critic stepped on every batch, the generator on every third
    d_state = trainer.optimizers["discriminator"].optimizer.state
    g_state = trainer.optimizers["generator"].optimizer.state
    assert {int(s["step"]) for s in d_state.values()} == {120}
    assert {int(s["step"]) for s in g_state.values()} == {40}
    assert trainer.optimizers["generator"].optimizer.param_groups[0]["lr"] == 4e-3  # per-optimizer override
    logged = records(tmp_path / "a", "loss/discriminator")
    assert logged and "loss/generator" in logged[-1] and "lr/generator" in logged[-1]

    resumed_recorder = Recorder()
    resumed = Trainer(gan_config(tmp_path / "b", f"resume_from_checkpoint={tmp_path / 'a' / 'checkpoint-60'}"),
                      [resumed_recorder]).fit()
    assert resumed.global_step == 120
    for name in ("generator", "discriminator"):
        a = load_file(tmp_path / "a" / "final" / f"{name}.safetensors")
        b = load_file(tmp_path / "b" / "final" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name  # EMA generator and critic, bitwise
    assert resumed_recorder.steps == 120 and torch.equal(resumed_recorder.history, recorder.history)


# ---------------------------------------------------------------------------------------------- guards
@dataclass
class RegressionOptions:
    nan_at_step: int | None = None


@register_task("test-regression")
class Regression(Task):
    """Least squares y = x @ w; the loss of one chosen step can be made NaN."""

    Options = RegressionOptions
    needs_dataset = False

    def build_data(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 4, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        return TaskData(train=torch.utils.data.TensorDataset(x, y), eval=torch.utils.data.TensorDataset(x, y))

    def build_models(self):
        self.calls = 0
        return {"model": torch.nn.Linear(4, 1)}

    def loss(self, models, batch, state):
        self.calls += 1
        loss = F.mse_loss(models["model"](batch[0]).squeeze(-1), batch[1])
        return loss * float("nan") if self.calls == self.options.nan_at_step else loss

    @torch.no_grad()
    def evaluate(self, models, loader, state):
        errors = [F.mse_loss(models["model"](x).squeeze(-1), y, reduction="sum") for x, y in loader]
        return {"mse": float(sum(errors)) / 256}

    def save(self, models, state_dicts, output_dir):
        save_file(state_dicts["model"], output_dir / "model.safetensors")


def regression(out: Path, *overrides: str):
    return load_config({"task": "test-regression", "output_dir": str(out), "train": {"max_steps": 12, "batch_size": 32},
                        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0},
                        "log": {"every_steps": 1, "report_to": []}}, list(overrides))


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss of 'main' is nan at step 5; .*nan_policy=skip"):
        train(regression(tmp_path, "task_options.nan_at_step=5"))


def test_nan_loss_skip_leaves_the_weights_untouched(tmp_path):
    seen = {}

    class Snapshot(Callback):
        def on_step_end(self, state, control):
            seen[state.global_step] = state.models["model"].weight.detach().clone()

    result = train(regression(tmp_path, "task_options.nan_at_step=5", "train.nan_policy=skip"), callbacks=[Snapshot()])
    assert result.global_step == 12
    assert json.loads((tmp_path / "results.json").read_text())["skipped_steps"] == 1
    assert sorted(seen) == list(range(1, 13)), sorted(seen)
    assert torch.equal(seen[5], seen[4]) and not torch.equal(seen[6], seen[5])
    assert all(torch.isfinite(w).all() for w in seen.values())


def test_early_stopping_and_plateau_schedule(tmp_path):
    # mse falls every evaluation; watching it with mode=max makes every evaluation "no improvement"
    result = train(regression(tmp_path, "train.max_steps=100", "eval.every_steps=2", "eval.metric=mse", "eval.mode=max",
                              "eval.early_stopping_patience=2", "scheduler.name=reduce_lr_on_plateau",
                              "scheduler.options={patience: 0, factor: 0.5}"))
    assert result.stop_reason == "early_stopping" and result.global_step == 6
    # evaluations at steps 2, 4, 6; each one after the first halves the lr (patience 0), for later steps
    assert [r["lr"] for r in records(tmp_path, "lr")] == pytest.approx([0.05] * 4 + [0.025] * 2)


def test_epochs_set_the_length_and_fp16_on_cpu_says_it_runs_in_float32(tmp_path, caplog):
    # 256 examples / batch 32 = 8 batches per epoch; 2.5 epochs with accumulation 2 -> 10 optimizer steps
    with caplog.at_level("WARNING", logger="hfx"):
        result = train(regression(tmp_path, "train.max_steps=null", "train.epochs=2.5",
                                  "train.gradient_accumulation_steps=2", "train.mixed_precision=fp16"))
    assert result.global_step == 10
    assert [r["epoch"] for r in records(tmp_path)] == [0] * 4 + [1] * 4 + [2] * 2
    assert any("fp16 mixed precision on cpu runs in float32" in r.message for r in caplog.records)


# ---------------------------------------------------------------------------------------------- tasks
def test_image_classification_timm_artifact_reloads(tmp_path):
    import timm

    trainer = Trainer(tiny_vit(tmp_path, "train.max_steps=3", "task_options.random_shift=1", "eval.at_end=true"))
    result = trainer.fit()
    assert set(result.metrics) == {"accuracy", "loss"}
    reloaded = timm.create_model(f"local-dir:{tmp_path / 'final'}", pretrained=True).eval()
    x = torch.randn(5, 1, 8, 8)
    model = trainer.unwrapped("model").eval()
    torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
    card = (tmp_path / "final" / "README.md").read_text()
    assert "image-classification" in card and "accuracy" in card and "local-dir:" in card
    # the card is hfx.hub's (every run gets its callback, once; a caller's own HubCallback replaces it)
    from hfx.hub import HubCallback
    from hfx.hub.cards import MARKER

    assert MARKER in card and [type(c) for c in trainer.callbacks].count(HubCallback) == 1
    again = Trainer(tiny_vit(tmp_path / "again", "train.max_steps=1"), callbacks=[HubCallback(eval_num_samples=7)])
    again.fit()
    assert [type(c) for c in again.callbacks].count(HubCallback) == 1


def test_image_classification_transformers_model_type_reloads(tmp_path):
    from transformers import AutoModelForImageClassification

    trainer = Trainer(tiny_vit(tmp_path, "train.max_steps=2", "task_options.model=vit",
                               "task_options.model_options={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
                               "intermediate_size: 64, patch_size: 4}"))
    trainer.fit()
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "final").eval()
    assert reloaded.config.id2label[3] == "3" and reloaded.config.num_channels == 1
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(reloaded(x).logits, trainer.unwrapped("model").eval()(x).logits, rtol=0, atol=0)


def test_causal_lm_trains_a_tokenizer_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config("lm-stdlib", [
        f"output_dir={tmp_path}", "data.options={max_files: 20}", "task_options.vocab_size=400",
        "task_options.block_size=32", "task_options.model_options={hidden_size: 32, intermediate_size: 64, "
        "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}",
        "train.max_steps=30", "train.batch_size=8", "scheduler.warmup_steps=3", "eval.every_steps=null",
        "checkpoint.every_steps=null", "log.report_to=[]", "log.every_steps=5", "data.max_eval_samples=64",
        "optimizer.lr=3e-3"])
    trainer = Trainer(config)
    result = trainer.fit()
    losses = [r["loss"] for r in records(tmp_path)]
    assert losses[-1] < losses[0] - 0.5
    assert 1 < result.metrics["perplexity"] < 400 and result.metrics["perplexity"] == pytest.approx(
        torch.tensor(result.metrics["loss"]).exp().item(), rel=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    text = "def f(x):\n    return x ** 2  # ünïcode\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text and len(tokenizer) == 400
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    torch.testing.assert_close(model(ids).logits, trainer.unwrapped("model").eval()(ids).logits, rtol=0, atol=0)
