"""Scale-out and precision on the CPU, as users launch them (issue 21).

- FSDP2 over 2 CPU processes (``training/accelerate/fsdp-cpu.yaml``), for a transformers model (lm-stdlib's
  Llama, each decoder layer one shard unit) and one that is not (a timm ViT, size-based wrapping): the final
  weights equal a 1-process run with the same global batch; a run killed with SIGKILL (launcher and workers)
  resumes from its sharded checkpoint to the uninterrupted run's weights, bit for bit, and its curve;
  ``final/`` is one ordinary folder that loads in a fresh process. A diffusers UNet trains under FSDP with
  its blocks as shard units and its pipeline loads and samples in a fresh process.
- bf16 autocast in one process: the loss falls, a checkpoint resumes exactly, weights are saved in float32;
  the NaN policy (stop / skip) with a forced non-finite loss under bf16.
- 2 machines on loopback (``accelerate launch --num_machines 2 --machine_rank R``): one run, checkpoints and
  ``final/`` written once, by machine 0.

fp16 with loss scaling, DDP/FSDP on GPUs and DeepSpeed need a GPU: ``bench/gpu_check.sh``.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from test_resume_and_safety import killed_after
from test_trainer_engine import Regression
from test_trainer_peft import tiny_lm
from test_trainer_processes import curve, environment, free_port, max_difference, recipe

from hfx.resources import resource_path
from hfx.trainers import NonFiniteLossError, load_config, train
from hfx.trainers.tasks import register_task

pytestmark = pytest.mark.slow

FSDP_CPU = str(resource_path("training", "accelerate", "fsdp-cpu.yaml"))

# lm-stdlib with a 2-layer Llama of width 32 (two shard units) on 20 files, 32-token blocks
LM = ["data.options={max_files: 20}", "task_options.vocab_size=400", "task_options.block_size=32",
      "task_options.model_options={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
      "num_attention_heads: 2, num_key_value_heads: 2}",
      "train.max_steps=30", "scheduler.name=constant", "scheduler.warmup_steps=0", "scheduler.min_lr_ratio=0",
      "eval.every_steps=null", "eval.at_end=false", "checkpoint.every_steps=10", "log.report_to=[]",
      "log.every_steps=1", "data.max_eval_samples=32", "optimizer.lr=3e-3", "optimizer.weight_decay=0"]

# A 2-block ViT on digits, without dropout or random shifts (every process's gradient is a function of its
# batch alone), with EMA (the saved weights) and accumulation: its state is sharded like the model's.
VIT = {
    "task": "image-classification",
    "data": {"dataset": "digits", "options": {"image_size": 16}, "max_eval_samples": 64},
    "task_options": {"model": "timm:vit_tiny_patch16_224",
                     "model_options": {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}},
    "train": {"max_steps": 30, "batch_size": 32},
    "optimizer": {"lr": 1e-3},
    "ema": {"enabled": True, "decay": 0.9},
    "eval": {"at_end": True},
    "checkpoint": {"every_steps": 10},
    "log": {"every_steps": 1, "report_to": []},
}
# timm models have no _no_split_modules: FSDP wraps by size (each ViT block is about 50 k parameters)
VIT_WRAP = ["--fsdp_auto_wrap_policy", "SIZE_BASED_WRAP", "--fsdp_min_num_params", "20000"]


def fsdp_launch(path: str, out: Path, *overrides: str, wrap: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CPU,
            "--main_process_port", str(free_port()), *wrap, "-m", "hfx", "train", path, f"output_dir={out}", *overrides]


def in_process(config) -> None:
    """A 1-process run in this process, on one thread (as the launched processes), with a fresh accelerator
    state (it is a process-wide singleton: a second run would inherit the first one's mixed precision)."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        train(config)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch.set_num_threads(threads)


def sigkill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker (torch's launcher starts each worker in its own session, so a
    process-group kill would miss them): what an out-of-memory kill or a lost node does to a job."""
    try:
        tree = psutil.Process(proc.pid)
        members = [*tree.children(recursive=True), tree]
    except psutil.NoSuchProcess:
        members = []
    for member in members:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def full_and_killed(full_cmd: list[str], killed_cmd: list[str], killed_dir: Path, step: int, env: dict,
                    batch: str) -> None:
    """Run ``full_cmd`` to its end and, beside it, ``killed_cmd`` until ``checkpoint-<step>`` exists, then SIGKILL it."""
    full = subprocess.Popen(full_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(killed_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (killed_dir / f"checkpoint-{step}").is_dir():
            assert killed.poll() is None, "the run ended before its checkpoint"
            assert time.monotonic() < deadline, f"no checkpoint-{step} within 240 s"
            time.sleep(0.005)
        sigkill_all(killed)
        _, full_stderr = full.communicate(timeout=300)
    finally:
        for proc in (killed, full):
            if proc.poll() is None:
                sigkill_all(proc)
    assert full.returncode == 0, full_stderr[-3000:]
    assert f"global batch {batch} accumulation)" in full_stderr
    assert not (killed_dir / "final").exists(), "the run finished before it could be killed"


def resume(cmd: list[str], env: dict) -> None:
    done = subprocess.run([*cmd, "resume_from_checkpoint=latest"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr


def assert_sharded(checkpoint: Path) -> None:
    """The checkpoint is FSDP's (a distributed-checkpoint folder with one file per process), not a DDP copy."""
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def fresh_process(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], env=environment(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- FSDP
LOAD_LM = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
fsdp, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
single = AutoModelForCausalLM.from_pretrained(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = torch.tensor([tokenizer("def f(x):\\n    return x ** 2\\n")["input_ids"]])
with torch.no_grad():
    diff = (fsdp.eval()(ids).logits - single.eval()(ids).logits).abs().max().item()
print(json.dumps({"diff": diff, "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                  "architectures": fsdp.config.architectures, "dtypes": sorted({str(p.dtype) for p in fsdp.parameters()})}))
"""


def test_fsdp_lm_equals_one_process_resumes_after_sigkill_and_loads_in_a_fresh_process(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # no ACCELERATE_USE_CPU: on a machine without GPUs hfx joins the launched processes by itself
    env = {k: v for k, v in environment().items() if k != "ACCELERATE_USE_CPU"}
    cmd = lambda out: fsdp_launch("lm-stdlib", out, *LM, "train.batch_size=8")  # noqa: E731
    full_and_killed(cmd(full), cmd(killed), killed, 10, env, batch="16 (2 process(es) x 8 x 1")
    assert_sharded(full / "checkpoint-30")  # (lm-stdlib keeps the last 2 checkpoints)
    resume(cmd(killed), env)
    assert max_difference(killed, full) == 0.0
    assert curve(killed) == curve(full)

    in_process(load_config("lm-stdlib", [*LM, f"output_dir={tmp_path / 'single'}", "train.batch_size=16"]))
    assert max_difference(full, tmp_path / "single") < 1e-5
    weights = load_file(full / "final" / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float32}
    loaded = fresh_process(LOAD_LM, str(full / "final"), str(tmp_path / "single" / "final"))
    assert loaded["missing"] == [] and loaded["unexpected"] == [] and loaded["architectures"] == ["LlamaForCausalLM"]
    assert loaded["diff"] < 1e-4 and loaded["dtypes"] == ["torch.float32"]


LOAD_TIMM = """
import json, sys, timm, torch
fsdp = timm.create_model(f"local-dir:{sys.argv[1]}", pretrained=True).eval()
single = timm.create_model(f"local-dir:{sys.argv[2]}", pretrained=True).eval()
x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    diff = (fsdp(x) - single(x)).abs().max().item()
print(json.dumps({"diff": diff, "classes": fsdp.num_classes, "dtypes": sorted({str(p.dtype) for p in fsdp.parameters()})}))
"""


@pytest.fixture(scope="module")
def single_vit(tmp_path_factory) -> Path:
    """The ViT trained by one process with the global batch (32) of the 2-process runs."""
    out = tmp_path_factory.mktemp("single-vit")
    in_process(load_config(recipe(out, VIT), [f"output_dir={out / 'run'}"]))
    return out / "run"


def test_fsdp_timm_vit_equals_one_process_resumes_after_sigkill_and_loads_in_a_fresh_process(tmp_path, single_vit):
    path = recipe(tmp_path, VIT)
    full, killed = tmp_path / "full", tmp_path / "killed"
    env = environment(ACCELERATE_USE_CPU="1")  # as where GPUs exist: the documented way to stay on the CPU
    cmd = lambda out: fsdp_launch(path, out, "train.batch_size=8", "train.gradient_accumulation_steps=2",  # noqa: E731
                                  wrap=VIT_WRAP)
    full_and_killed(cmd(full), cmd(killed), killed, 10, env, batch="32 (2 process(es) x 8 x 2")
    assert_sharded(full / "checkpoint-10")
    assert (full / "checkpoint-10" / "ema.safetensors").is_file()  # gathered from the shards
    resume(cmd(killed), env)
    assert max_difference(killed, full) == 0.0  # the EMA weights, bit for bit
    assert curve(killed) == curve(full)
    ema = load_file(full / "checkpoint-10" / "ema.safetensors")
    ema_single = load_file(single_vit / "checkpoint-10" / "ema.safetensors")
    assert ema.keys() == ema_single.keys() and all(torch.allclose(ema[k].float(), ema_single[k].float(), atol=1e-4)
                                                   for k in ema)

    # 30 Adam steps: the order of the float sums differs (as with DDP: the 2-machine test below)
    assert max_difference(full, single_vit) < 1e-4
    loaded = fresh_process(LOAD_TIMM, str(full / "final"), str(single_vit / "final"))
    assert loaded["diff"] < 1e-4 and loaded["classes"] == 10 and loaded["dtypes"] == ["torch.float32"]


UNET = {
    "task": "diffusion",
    "data": {"dataset": "digits", "options": {"image_size": 8}, "max_eval_samples": 32},
    "task_options": {"unet": {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                              "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4,
                              "attention_head_dim": 4}, "grid_per_class": 0},
    "train": {"max_steps": 4, "batch_size": 8},
    "optimizer": {"lr": 3e-3},
    "ema": {"enabled": True, "decay": 0.9},
    "eval": {"every_steps": None, "at_end": False},
    "log": {"every_steps": 1, "report_to": []},
}
# Size-based wrapping picks a UNet's ModuleLists, which FSDP2 cannot shard (they have no forward): name the
# blocks instead.
UNET_WRAP = ["--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
             "ResnetBlock2D,Attention"]

SAMPLE_PIPELINE = """
import json, sys, torch
import hfx
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
images = pipe([0, 7], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
print(json.dumps({"pipeline": type(pipe).__name__, "unet": type(pipe.unet).__name__, "shape": list(images.shape),
                  "finite": bool(torch.isfinite(images).all()), "dtype": str(pipe.unet.dtype)}))
"""


def test_fsdp_diffusers_unet_trains_with_block_wrapping_and_its_pipeline_samples_in_a_fresh_process(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(fsdp_launch(recipe(tmp_path, UNET), out, wrap=UNET_WRAP), env=environment(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 16 (2 process(es) x 8" in done.stderr
    sampled = fresh_process(SAMPLE_PIPELINE, str(out / "final"))
    assert sampled == {"pipeline": "ClassConditionalPipeline", "unet": "UNet2DModel", "shape": [2, 1, 8, 8],
                       "finite": True, "dtype": "torch.float32"}
    config = json.loads((out / "final" / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel"


# ---------------------------------------------------------------------------------------------- bf16
def test_bf16_autocast_on_cpu_loss_falls_resumes_exactly_and_saves_float32(tmp_path):
    from test_resume_and_safety import records, same_weights

    overrides = ["train.mixed_precision=bf16", "train.max_steps=24", "checkpoint.every_steps=8"]
    full = tmp_path / "full"
    in_process(tiny_lm(full, *overrides, "optimizer.lr=3e-3"))
    losses = [r["loss"] for r in records(full)]
    assert losses[-1] < losses[0] - 0.5
    in_process(tiny_lm(tmp_path / "fp32", "train.max_steps=1", "optimizer.lr=3e-3"))
    assert records(tmp_path / "fp32")[0]["loss"] != losses[0]  # autocast was on (same weights, same batch)
    for weights in (full / "final" / "model.safetensors", full / "checkpoint-16" / "model.safetensors"):
        assert {v.dtype for v in load_file(weights).values()} == {torch.float32}

    out = killed_after(full, tmp_path / "resumed", 16)  # (lm-stdlib keeps the last 2 checkpoints)
    in_process(tiny_lm(out, *overrides, "optimizer.lr=3e-3", "resume_from_checkpoint=latest"))
    assert same_weights(out, full) and records(out) == records(full)


@register_task("test-overflow")
class Overflow(Regression):
    """The regression toy whose ``nan_at_step``-th loss overflows in the autocast dtype: the prediction is scaled
    past the largest bf16 / fp16 number in that dtype (inf), as a diverging low-precision run does."""

    def loss(self, models, batch, state):
        self.calls += 1
        prediction = models["model"](batch[0]).squeeze(-1)  # bf16 / fp16 under autocast
        if self.calls == self.options.nan_at_step:
            prediction = prediction * torch.finfo(prediction.dtype).max * 4
        return torch.nn.functional.mse_loss(prediction.float(), batch[1])


@pytest.mark.parametrize("precision", [
    "bf16", pytest.param("fp16", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=(
        "fp16 needs accelerate's gradient scaler, which exists only on a GPU (on the CPU fp16 runs in float32)")))])
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_policy_with_a_forced_overflow_in_low_precision(tmp_path, precision, policy):
    config = load_config({"task": "test-overflow", "output_dir": str(tmp_path), "train": {"max_steps": 12, "batch_size": 32},
                          "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0}, "log": {"every_steps": 1, "report_to": []}},
                         ["task_options.nan_at_step=5", f"train.mixed_precision={precision}", f"train.nan_policy={policy}"])
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match=r"loss of 'main' is (inf|nan) at step 5"):
            train(config)
        return
    result = train(config)
    assert result.global_step == 12
    assert json.loads((tmp_path / "results.json").read_text())["skipped_steps"] == 1
    assert all(torch.isfinite(w).all() for w in load_file(tmp_path / "final" / "model.safetensors").values())
    logged = [r for r in curve(tmp_path) if "loss" in r]  # the skipped step logs no loss
    assert [r["step"] for r in logged] == [1, 2, 3, 4, *range(6, 13)] and all(math.isfinite(r["loss"]) for r in logged)


# ---------------------------------------------------------------------------------------------- DeepSpeed
def test_deepspeed_on_cpu_processes_is_refused_not_run_as_ddp(tmp_path):
    """With deepspeed installed, accelerate 1.15 sets up no DeepSpeed on CPU processes and would train plain DDP
    instead: hfx refuses. (Without deepspeed, accelerate itself stops with an ImportError.)"""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (optional; not in the lock)")
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(resource_path("training", "accelerate", "deepspeed-zero2.yaml")), "--mixed_precision", "no",
         "--main_process_port", str(free_port()), "-m", "hfx", "train", recipe(tmp_path, VIT),
         f"output_dir={tmp_path / 'run'}", "train.batch_size=8"],
        env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "asks for DeepSpeed but accelerate set up" in done.stderr
    assert not (tmp_path / "run" / "checkpoint-10").exists()


# ---------------------------------------------------------------------------------------------- 2 machines
def test_two_machines_on_loopback_train_one_run_written_once_by_machine_0(tmp_path, single_vit):
    path = recipe(tmp_path, VIT)
    out, port = tmp_path / "run", free_port()
    env = {k: v for k, v in environment().items() if k != "ACCELERATE_USE_CPU"}
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(resource_path("training", "accelerate", "cpu-ddp.yaml")), "--num_machines", "2", "--num_processes", "2",
         "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         "-m", "hfx", "train", path, f"output_dir={out}", "train.batch_size=16"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        logs = [machine.communicate(timeout=300) for machine in machines]
    finally:
        for machine in machines:
            if machine.poll() is None:
                sigkill_all(machine)
    for machine, (_, stderr) in zip(machines, logs):
        assert machine.returncode == 0, stderr[-3000:]
    (_, main_err), (_, other_err) = logs
    assert "global batch 32 (2 process(es) x 16 x 1 accumulation)" in main_err
    assert max_difference(out, single_vit) < 1e-4
    # machine 0 wrote every checkpoint, final/ and the card once; machine 1 only its own random state
    assert [line.split("saved ")[-1] for line in main_err.splitlines() if " saved " in line] == \
        [str(out / f"checkpoint-{s}") for s in (10, 20, 30)]
    assert " saved " not in other_err and "wrote the model card" not in other_err
    assert sorted(p.name for p in (out / "checkpoint-30").glob("random_states_*.pkl")) == \
        ["random_states_0.pkl", "random_states_1.pkl"]
    assert [r["step"] for r in curve(out) if "loss" in r] == list(range(1, 31))
    assert json.loads((out / "results.json").read_text())["processes"] == 2
