"""The engine as users run it, in real processes: ``accelerate launch`` with 2-process CPU DDP, a run
killed with SIGKILL and resumed, a run stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hfx.resources import resource_path

pytestmark = pytest.mark.slow

# A 1-block ViT on digits: no batch norm, so the gradient of a global batch does not depend on how it is
# split over processes.
TINY_VIT = {
    "task": "image-classification",
    "data": {"dataset": "digits", "options": {"image_size": 8}, "max_eval_samples": 64},
    "task_options": {"model": "timm:vit_tiny_patch16_224",
                     "model_options": {"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}},
    "train": {"max_steps": 10, "batch_size": 32},
    "optimizer": {"lr": 1e-3},
    "log": {"every_steps": 1, "report_to": []},
    "eval": {"at_end": False},
}


def environment(**extra: str) -> dict[str, str]:
    # One thread per process: the models are tiny and the machine has 2 cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def hfx_train(*args: str) -> list[str]:
    return [sys.executable, "-m", "hfx", "train", *args]


def recipe(tmp_path: Path, config: dict, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def max_difference(a_dir: Path, b_dir: Path) -> float:
    a = load_file(a_dir / "final" / "model.safetensors")
    b = load_file(b_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_cpu_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from hfx.trainers import load_config, train

    path = recipe(tmp_path, TINY_VIT)
    launch = [sys.executable, "-m", "accelerate.commands.launch",
              "--config_file", str(resource_path("training", "accelerate", "cpu-ddp.yaml")),
              "--main_process_port", str(free_port()), "-m", "hfx", "train", path,
              f"output_dir={tmp_path / 'ddp'}", "train.batch_size=16"]
    # As training/accelerate/cpu-ddp.yaml documents it: no ACCELERATE_USE_CPU on a machine without GPUs
    env = {k: v for k, v in environment().items() if k != "ACCELERATE_USE_CPU"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 32 (2 process(es) x 16 x 1 accumulation)" in done.stderr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        train(load_config(path, [f"output_dir={tmp_path / 'single'}"]))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch.set_num_threads(threads)
    assert max_difference(tmp_path / "ddp", tmp_path / "single") < 1e-5
    # only the main process writes the log: one record per step
    assert [r["step"] for r in map(json.loads, (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines())] == \
        list(range(1, 11))


RESUMABLE = {
    **TINY_VIT,
    "data": {"dataset": "digits", "options": {"image_size": 16}, "max_eval_samples": 64},
    # dropout, random shifts, EMA, warm-up + cosine and accumulation all have state a resume must restore
    "task_options": {"model": "timm:vit_tiny_patch16_224", "random_shift": 1,
                     "model_options": {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2,
                                       "drop_rate": 0.1}},
    "train": {"max_steps": 150, "batch_size": 16, "gradient_accumulation_steps": 2},
    "scheduler": {"name": "cosine", "warmup_steps": 10},
    "ema": {"enabled": True, "decay": 0.99},
    "eval": {"every_steps": 50, "at_end": True},
    "checkpoint": {"every_steps": 20},
    "log": {"every_steps": 5, "report_to": []},
}


def curve(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in lines]


def test_sigkill_after_a_checkpoint_then_resume_equals_the_uninterrupted_run(tmp_path):
    path = recipe(tmp_path, RESUMABLE)
    # the uninterrupted run goes on beside the one that gets killed
    full = subprocess.Popen(hfx_train(path, f"output_dir={tmp_path / 'full'}"), env=environment(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(hfx_train(path, f"output_dir={killed_dir}"), env=environment(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (killed_dir / "checkpoint-20").is_dir():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint-20 within 240 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        _, full_stderr = full.communicate(timeout=300)
    finally:
        proc.kill()
        full.kill()
    assert full.returncode == 0, full_stderr[-3000:]
    assert not (killed_dir / "final").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(hfx_train(path, f"output_dir={killed_dir}", "resume_from_checkpoint=latest"),
                             env=environment(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert max_difference(killed_dir, tmp_path / "full") == 0.0  # bitwise, EMA weights included
    # the curve continues: no step logged twice, every value as in the uninterrupted run
    assert curve(killed_dir) == curve(tmp_path / "full")
    assert not list(killed_dir.glob("*.tmp"))


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    path = recipe(tmp_path, {**TINY_VIT, "train": {"max_steps": 100000, "batch_size": 32}})
    out = tmp_path / "run"
    proc = subprocess.Popen(hfx_train(path, f"output_dir={out}"), env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["counters"]["global_step"]
    assert 1 <= step < 100000 and checkpoints[0].name == f"checkpoint-{step}"
    assert f"stopped by signal 15 at step {step}" in stderr and "resume_from_checkpoint=latest" in stderr
