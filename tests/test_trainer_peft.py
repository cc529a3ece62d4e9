"""PEFT methods in engine recipes (``peft:`` section): LoRA trains only the adapter, prefix and prompt tuning
generate with a cache after reload, ReLoRA restarts in the engine (schedule, logged stats), resumes exactly
and reloads in a fresh process; bad peft fields are one-line config errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer_engine import tiny_vit as engine_tiny_vit

from hfx.trainers import Callback, ConfigError, Trainer, load_config


def tiny_lm(out: Path, *overrides: str):
    """lm-stdlib with a 1-block Llama of width 32 on 20 files, 32-token blocks."""
    return load_config("lm-stdlib", [
        f"output_dir={out}", "data.options={max_files: 20}", "task_options.vocab_size=400",
        "task_options.block_size=32", "task_options.model_options={hidden_size: 32, intermediate_size: 64, "
        "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}",
        "train.max_steps=30", "train.batch_size=8", "scheduler.warmup_steps=0", "scheduler.min_lr_ratio=0",
        "scheduler.name=constant", "eval.every_steps=null", "eval.at_end=false", "checkpoint.every_steps=null",
        "log.report_to=[]", "log.every_steps=1", "data.max_eval_samples=32", "optimizer.lr=1e-2",
        "optimizer.weight_decay=0", *overrides])


_BASE: dict[str, Path] = {}


def pretrained_base(tmp_path_factory) -> Path:
    """A tiny Llama trained full-rank for 30 steps (``final/`` with its tokenizer), built once per session:
    the base that LoRA / prefix / prompt tuning fine-tune, as they would a Hub model."""
    from accelerate.state import AcceleratorState, GradientState

    if "base" not in _BASE:
        out = tmp_path_factory.mktemp("base")
        Trainer(tiny_lm(out, "train.max_steps=30", "optimizer.lr=3e-3")).fit()
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        _BASE["base"] = out / "final"
    return _BASE["base"]


def finetune(out: Path, base: Path, *overrides: str):
    return tiny_lm(out, f"task_options.model={base}", "task_options.pretrained=true", f"task_options.tokenizer={base}",
                   "task_options.model_options={}", *overrides, "peft.save_base=false")


def records(run_dir: Path, key: str) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]

def fresh_process_logits(final_dir: Path, out_file: Path, base_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Logits of the saved adapter on ``IDS`` in a fresh process that imports only hfx, peft and transformers:
    ``adapter`` (the PeftModel) and ``merged`` (after ``merge_and_unload``). With ``base_dir`` the base is
    loaded from there and wrapped by ``PeftModel.from_pretrained``; else ``AutoPeftModelForCausalLM`` finds
    it from the adapter config."""
    load = ("from transformers import AutoModelForCausalLM\n"
            "from peft import PeftModel\n"
            f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), sys.argv[1])\n"
            if base_dir is not None else
            "from peft import AutoPeftModelForCausalLM\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])\n")
    script = (
        "import sys, torch, hfx\n"
        "torch.set_num_threads(1)\n"
        + load +
        "model = model.eval()\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "with torch.no_grad():\n"
        "    torch.save({'adapter': model(input_ids=ids).logits,\n"
        "                'merged': model.merge_and_unload()(input_ids=ids).logits}, sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(final_dir), str(out_file)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    return torch.load(out_file, weights_only=True)



class Snapshot(Callback):
    """The wrapped model as training starts: weights, trainable names, optimizer size, and (``eval.at_start``)
    the held-out loss of the base before any step."""

    def on_train_begin(self, state, control):
        model = state.models["model"]
        self.before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.optimized = sum(p.numel() for g in state.optimizers["main"].param_groups for p in g["params"])

    def on_evaluate(self, state, control, metrics):
        if state.global_step == 0:
            self.eval_before = metrics["loss"]  # held-out loss of the base (B = 0)



IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11], [1, 2, 3, 4, 5, 6, 7, 8]])


def test_lora_trains_only_the_adapter_and_reloads(tmp_path, tmp_path_factory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    snapshot = Snapshot()
    base_dir = pretrained_base(tmp_path_factory)
    trainer = Trainer(finetune(tmp_path, base_dir, "peft={method: lora, r: 8, lora_alpha: 16, target_modules: all-linear}",
                               "train.max_steps=40", "optimizer.lr=1e-2", "eval.at_end=true", "eval.at_start=true"), [snapshot])
    result = trainer.fit()
    model, before = trainer.unwrapped("model"), snapshot.before
    assert snapshot.trainable and all("lora_" in n for n in snapshot.trainable)
    assert snapshot.optimized == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result.metrics["loss"] < snapshot.eval_before - 0.01  # held-out loss falls
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_B" in k or "lora_A" in k for k in changed)

    final = tmp_path / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists() and not (final / "base").exists()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    reloaded = PeftModel.from_pretrained(base, final).eval()
    torch.testing.assert_close(reloaded(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_prompt_learning_trains_and_generates_with_cache_after_reload(tmp_path, tmp_path_factory, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = pretrained_base(tmp_path_factory)
    snapshot = Snapshot()
    trainer = Trainer(finetune(tmp_path, base_dir, f"peft={{method: {method}, num_virtual_tokens: 4}}", "train.max_steps=20",
                               "eval.at_end=true", "eval.at_start=true"), [snapshot])
    result = trainer.fit()
    assert result.metrics["loss"] < snapshot.eval_before - 0.01  # held-out loss falls
    final = tmp_path / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper() and config["task_type"] == "CAUSAL_LM"

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    reloaded = PeftModel.from_pretrained(base, final).eval()
    trained = trainer.unwrapped("model").eval()
    torch.testing.assert_close(reloaded(input_ids=IDS).logits, trained(input_ids=IDS).logits, rtol=0, atol=1e-6)
    prompt = IDS[:1, :4]
    cached = reloaded.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    greedy = prompt  # the same greedy continuation by full forward passes, no cache
    with torch.no_grad():
        for _ in range(6):
            greedy = torch.cat([greedy, reloaded(input_ids=greedy).logits[:, -1:].argmax(-1)], dim=1)
    assert cached.shape == (1, 10) and torch.equal(cached, greedy)
    # the virtual tokens change the model: the base alone continues differently (or scores differently)
    with reloaded.disable_adapter():
        plain = reloaded(input_ids=IDS).logits
    assert (plain - trained(input_ids=IDS).logits[:, -IDS.shape[1]:]).abs().max() > 1e-3


def test_two_lora_adapters_of_one_base_hot_swap(tmp_path, tmp_path_factory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = pretrained_base(tmp_path_factory)
    for name, seed in (("a", 1), ("b", 2)):
        config = finetune(tmp_path / name, base_dir, "peft={method: lora, r: 4}", "train.max_steps=10", f"seed={seed}")
        Trainer(config).fit()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "a" / "final",
                                      adapter_name="a").eval()
    model.load_adapter(tmp_path / "b" / "final", adapter_name="b")
    outputs = {}
    for name in ("a", "b", "a"):
        model.set_adapter(name)
        logits = model(input_ids=IDS).logits
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / name / "final")
        torch.testing.assert_close(logits, alone.eval()(input_ids=IDS).logits, rtol=0, atol=1e-6)
        outputs[name] = logits
    assert (outputs["a"] - outputs["b"]).abs().max() > 1e-4


@pytest.mark.parametrize("recipe", ["classify-digits", "ddpm-digits"])
def test_lora_on_a_timm_vit_and_a_diffusers_unet_via_recipes(tmp_path, recipe):
    from peft import PeftModel

    if recipe == "classify-digits":
        overrides = ["task_options.model=timm:vit_tiny_patch16_224", "train.batch_size=32",
                     "task_options.model_options={img_size: 8, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}",
                     "peft={method: lora, r: 4, target_modules: [qkv, proj, fc1, fc2], modules_to_save: [head]}"]
    else:
        overrides = ["task_options.unet={block_out_channels: [8, 16], down_block_types: [DownBlock2D, AttnDownBlock2D], "
                     "up_block_types: [AttnUpBlock2D, UpBlock2D], norm_num_groups: 4, attention_head_dim: 4}",
                     "task_options.grid_per_class=0", "train.batch_size=16", "ema.enabled=false",
                     "peft={method: lora, r: 4, target_modules: [to_q, to_k, to_v, to_out.0]}"]
    config = load_config(recipe, [f"output_dir={tmp_path}", "data.options={image_size: 8}", "data.max_eval_samples=32",
                                  "train.max_steps=8", "eval.every_steps=null", "eval.at_end=false",
                                  "checkpoint.every_steps=null", "log.report_to=[]", "log.every_steps=1", *overrides])
    trainer = Trainer(config)
    trainer.fit()
    name = trainer.peft.model_name
    model = trainer.unwrapped(name)
    assert all("lora_" in n or "modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)
    final = tmp_path / "final"  # the adapter, and in base/ the task's artifact of the untrained base
    if recipe == "classify-digits":
        import timm

        base = timm.create_model("local-dir:" + str(final / "base"), pretrained=True)
        inputs = {"x": torch.randn(2, 1, 8, 8)}
    else:
        from diffusers import UNet2DModel

        base = UNet2DModel.from_pretrained(final / "base", subfolder="unet")
        inputs = {"sample": torch.randn(2, 1, 8, 8), "timestep": torch.tensor([3, 500]), "class_labels": torch.tensor([1, 2])}
    reloaded = PeftModel.from_pretrained(base, final).eval()
    expected, got = model.eval()(**inputs), reloaded(**inputs)
    if recipe == "ddpm-digits":
        expected, got = expected.sample, got.sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


RELORA = ("peft={method: relora, r: 4, lora_alpha: 8, relora_steps: 10, restart_warmup_steps: 3, warmup_steps: 2, "
          "min_lr_ratio: 0.1, prune_method: magnitude, prune_ratio: 0.9}")


def test_relora_in_the_engine_resumes_exactly_and_reloads_in_a_fresh_process(tmp_path):
    full_dir = tmp_path / "full"
    full = Trainer(tiny_lm(full_dir, RELORA, "checkpoint.every_steps=15", "scheduler.name=relora_jagged"))
    full.fit()
    multiplier = full.schedulers["main"].lr_lambdas[0]  # the jagged cosine of the peft fields; the recipe is unchanged
    assert multiplier.warmup_steps == 2 and multiplier.relora_steps == 10 and full.config.scheduler.options == {}
    restarts = records(full_dir, "relora/restart")
    assert [r["step"] for r in restarts] == [10, 20]  # not after the last step (30)
    assert all(r["relora/pruned_fraction"] == pytest.approx(0.9, abs=0.02) for r in restarts)
    lrs = {r["step"]: r["lr"] for r in records(full_dir, "lr")}
    # a record's lr is the one the next step uses: the step right after a restart runs at LR 0, then ramps
    assert lrs[10] == 0.0 and lrs[20] == 0.0 and 0 < lrs[11] < lrs[12] < lrs[13]
    model = full.unwrapped("model")
    layers = [m for m in model.modules() if hasattr(m, "relora_history_A")]
    assert layers and all(m.num_restarts("default") == 2 for m in layers)

    # kill after checkpoint-15 (between the two restarts), then resume: what remains of the run is equal
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    for name in ("checkpoint-15", "tokenizer", "metrics.jsonl", "base"):
        copy = shutil.copytree if (full_dir / name).is_dir() else shutil.copy
        copy(full_dir / name, resumed_dir / name)
    resumed = Trainer(tiny_lm(resumed_dir, RELORA, "checkpoint.every_steps=15", "scheduler.name=relora_jagged",
                              "resume_from_checkpoint=latest"))
    resumed.fit()
    a, b = model.state_dict(), resumed.unwrapped("model").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    assert records(resumed_dir, "relora/restart") == restarts

    expected = model.eval()(input_ids=IDS).logits
    logits = fresh_process_logits(full_dir / "final", tmp_path / "logits.pt")  # AutoPeft finds final/base
    torch.testing.assert_close(logits["adapter"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits["merged"], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("override", "message"), [
    ("peft={method: lora, rr: 4}", "unknown config key 'peft.rr' for method 'lora'; did you mean 'peft.r'?"),
    ("peft={method: lorra}", "unknown peft.method 'lorra'; did you mean 'lora'?"),
    ("peft={method: relora, relora_steps: 10, restart_warmup_steps: 2}", None),
    ("peft={method: relora, relora_steps: 10}",
     "peft (relora): ReLoraConfig.restart_warmup_steps=100 must be >= 0 and < relora_steps (10)"),
    ("peft={method: relora, relora_steps: 10, restart_warmup_steps: 2} | ema.enabled=true | scheduler.name=relora_jagged",
     "ema.enabled is not supported with peft.method relora (a restart moves the update from the adapter into the "
     "base weights, so separate averages of the two are not a model)"),
])
def test_bad_peft_fields_are_one_line_config_errors(tmp_path, override, message):
    if message is None:  # ReLoRA refuses a schedule that would not put the LR at 0 at the restarts
        with pytest.raises(ConfigError, match="jagged cosine schedule") as err:
            tiny_lm(tmp_path, override, "scheduler.name=cosine")
    else:
        with pytest.raises(ConfigError) as err:
            tiny_lm(tmp_path, *override.split(" | "))
        assert str(err.value) == message
    assert "\n" not in str(err.value)


def tiny_vit(out: Path, *overrides: str):
    """The engine tests' 1-block ViT on 8x8 digits, with a freeze schedule: the head alone for 5 steps."""
    return engine_tiny_vit(out, "optimizer.weight_decay=0.1", *overrides,
                           freeze={"train_only": [r"^model\.head\."], "unfreeze_at_step": 5},
                           checkpoint={"every_steps": 3})


def test_freeze_trains_the_head_first_then_everything_and_resumes_exactly(tmp_path):
    class AtStep5(Callback):
        def on_train_begin(self, state, control):
            self.initial = {k: v.clone() for k, v in state.models["model"].state_dict().items()}

        def on_step_end(self, state, control):
            if state.global_step == 5:
                self.weights = {k: v.clone() for k, v in state.models["model"].state_dict().items()}

    seen = AtStep5()
    full = Trainer(tiny_vit(tmp_path / "full"), [seen])
    full.fit()
    moved = {k for k in seen.initial if not torch.equal(seen.initial[k], seen.weights[k])}
    assert moved == {"head.weight", "head.bias"}  # steps 1-5: the head only (no weight decay on frozen ones)
    final = full.unwrapped("model").state_dict()
    assert all(not torch.equal(seen.weights[k], final[k]) for k in final if k != "pos_embed")

    for checkpoint in ("checkpoint-3", "checkpoint-6"):  # killed before and after the unfreeze
        out = tmp_path / checkpoint
        out.mkdir()
        shutil.copytree(tmp_path / "full" / checkpoint, out / checkpoint)
        resumed = Trainer(tiny_vit(out, "resume_from_checkpoint=latest"))
        resumed.fit()
        for key, value in resumed.unwrapped("model").state_dict().items():
            torch.testing.assert_close(value, final[key], rtol=0, atol=0, msg=f"{checkpoint}: {key}")


def test_freeze_patterns_and_peft_targets_that_do_not_fit_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"freeze.train_only \['nope'\] matches no trainable parameter"):
        Trainer(tiny_vit(tmp_path, "freeze.train_only=[nope]")).fit()
    with pytest.raises(ConfigError, match=r"freeze.train_only\[0\] '\(' is not a regular expression"):
        tiny_vit(tmp_path, "freeze.train_only=['(']")
    with pytest.raises(ConfigError, match="peft \\(lora\\) cannot wrap model 'model': Target module") as err:
        Trainer(tiny_vit(tmp_path, "peft={method: lora, target_modules: [norm]}")).fit()  # a LayerNorm
    assert "\n" not in str(err.value)


DDP_SCRIPT = '''
import sys
import torch
from safetensors.torch import save_file
from hfx.trainers import Callback, load_config, train

class SaveRankWeights(Callback):
    """After each checkpoint (written right after a restart here), every rank saves its model's weights."""
    def on_save(self, state, control, checkpoint_dir):
        weights = {k: v.contiguous() for k, v in state.models["model"].state_dict().items()}
        rank = state.accelerator.process_index
        save_file(weights, f"{sys.argv[1]}/rank{rank}-step{state.global_step}.safetensors")

train(load_config("lm-stdlib", sys.argv[2:]), callbacks=[SaveRankWeights()])
'''


@pytest.mark.slow
def test_relora_under_two_process_cpu_ddp_leaves_identical_weights_on_both_ranks(tmp_path):
    from safetensors.torch import load_file

    from hfx.resources import resource_path

    script = tmp_path / "ddp_relora.py"
    script.write_text(DDP_SCRIPT)
    overrides = [f"output_dir={tmp_path / 'run'}", "data.options={max_files: 20}", "task_options.vocab_size=400",
                 "task_options.block_size=32", "task_options.model_options={hidden_size: 32, intermediate_size: 64, "
                 "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}", "train.max_steps=25",
                 "train.batch_size=4", "eval.every_steps=null", "eval.at_end=false", "checkpoint.every_steps=10",
                 "log.report_to=[]", "log.every_steps=5", "scheduler={name: relora_jagged}",
                 RELORA.replace("prune_method: magnitude", "prune_method: random")]
    with socket_port() as port:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(resource_path("training", "accelerate", "cpu-ddp.yaml")), "--main_process_port", str(port),
                  str(script), str(tmp_path), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in records(tmp_path / "run", "relora/restart")] == [10, 20]
    for step in (10, 20):
        rank0 = load_file(tmp_path / f"rank0-step{step}.safetensors")
        rank1 = load_file(tmp_path / f"rank1-step{step}.safetensors")
        assert rank0.keys() == rank1.keys() and any("relora_history_A" in k for k in rank0)
        for key in rank0:
            assert torch.equal(rank0[key], rank1[key]), f"step {step}: {key} differs between the ranks"
        b = [v for k, v in rank0.items() if "lora_B" in k]
        assert b and all(not v.any() for v in b)  # checkpointed right after the restart: B = 0


class socket_port:
    """A free local port for the launcher's rendezvous."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        return None
