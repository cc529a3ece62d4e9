"""The task API as a new method uses it (tests/toy_tasks.py): a task with state of its own killed with SIGKILL
resumes bit-identically, state included; a family's card facts come from its own class; the house has no
import circle and no task or callback reaches the Trainer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

TESTS = Path(__file__).parent
ROOT = TESTS.parent

QUEUE_RECIPE = {
    "task": "test-toy-queue", "task_options": {"queue_size": 48, "sleep": 0.05},
    "train": {"max_steps": 60, "batch_size": 16},
    "optimizer": {"name": "adam", "lr": 1e-2},
    "checkpoint": {"every_steps": 20},
    "log": {"every_steps": 7, "report_to": []},
}


def hfx_train(*args: str) -> list[str]:
    """``hfx train`` in a fresh process that has imported the toy tasks."""
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import toy_tasks; from hfx.cli import main; "
            "raise SystemExit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code, "train", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def curve(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_task_with_state_killed_and_resumed_ends_bit_identical_state_included(tmp_path):
    recipe = tmp_path / "queue.yaml"
    recipe.write_text(yaml.safe_dump(QUEUE_RECIPE))
    full = subprocess.run(hfx_train(str(recipe), f"output_dir={tmp_path / 'full'}"), env=environment(),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(hfx_train(str(recipe), f"output_dir={killed}"), env=environment(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoint-20").is_dir():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint-20 within 240 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    assert (killed / "checkpoint-20" / "task_state_0.pt").is_file()

    resumed = subprocess.run(hfx_train(str(recipe), f"output_dir={killed}", "resume_from_checkpoint=latest"),
                             env=environment(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = load_file(tmp_path / "full" / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and {"queue", "pushed"} <= a.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # weights, queue and counter, bitwise
    assert int(a["pushed"]) == 60 * 16
    # the log window was cut at step 20 (not a log step): the resumed curve equals the uninterrupted one
    assert curve(killed) == curve(tmp_path / "full")


def test_a_resume_without_the_task_state_is_refused(tmp_path):
    import toy_tasks  # noqa: F401

    from hfx.trainers import ResumeError, Trainer, load_config

    Trainer(load_config({**QUEUE_RECIPE, "output_dir": str(tmp_path), "train": {"max_steps": 20, "batch_size": 16}})).fit()
    (tmp_path / "checkpoint-20" / "task_state_0.pt").unlink()
    with pytest.raises(ResumeError, match=r"checkpoint-20 is incomplete: task_state_0.pt \(missing\)"):
        load_config({**QUEUE_RECIPE, "output_dir": str(tmp_path), "resume_from_checkpoint": str(tmp_path / "checkpoint-20")})


def test_a_family_says_its_own_card_facts(tmp_path):
    """A new family's card: the summary from its task, the usage line and samples from its class; hub/cards.py
    knows nothing of it."""
    import toy_tasks  # noqa: F401
    from huggingface_hub import ModelCard

    from hfx.hub import HubCallback
    from hfx.trainers import load_config, train

    train(load_config({"task": "test-toy-family", "output_dir": str(tmp_path), "train": {"max_steps": 3},
                       "log": {"report_to": []}}), callbacks=[HubCallback()])
    card = (tmp_path / "final" / "README.md").read_text()
    assert "A toy family that learns to reverse four numbers." in card
    assert "y = model(torch.randn(2, 4))  # the toy family's own usage line" in card
    assert "AutoModel.from_pretrained" in card and (tmp_path / "final" / "images" / "samples.png").is_file()
    assert ModelCard.load(tmp_path / "final" / "README.md").data.eval_results is None
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["card_facts"] == {"method": "test-toy-family", "task_type": "feature-extraction",
                                     "summary": "A toy family that learns to reverse four numbers."}
    cards = (ROOT / "hfx" / "hub" / "cards.py").read_text()
    for family in ("hfx_vae", "HfxVAEModel", "ClassConditionalPipeline", "NoisyClassifier", "num_class_embeds"):
        assert family not in cards, f"hub/cards.py still has a branch for {family}"


def test_no_task_or_callback_receives_or_imports_the_trainer():
    """Tasks, callbacks and integrations live below the engine: none of their files imports it, and the hooks
    a task or callback implements take a RunState (no parameter is named trainer)."""
    import inspect

    from hfx.trainers import Callback, Task

    below = [*(ROOT / "hfx" / "trainers" / "tasks").glob("*.py"), *(ROOT / "hfx" / "trainers" / "integrations").glob("*.py"),
             *[ROOT / "hfx" / "trainers" / f"{name}.py" for name in
               ("callbacks", "state", "config", "errors", "freeze", "peft", "schedules", "checkpoint", "ema")],
             ROOT / "hfx" / "hub" / "callback.py"]
    for path in below:
        text = path.read_text()
        assert "hfx.trainers.engine" not in text and "import Trainer" not in text, path
    for cls in (Task, Callback):
        for name, member in inspect.getmembers(cls, inspect.isfunction):
            assert "trainer" not in inspect.signature(member).parameters, f"{cls.__name__}.{name}"
