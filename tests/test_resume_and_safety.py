"""Resume is exact or refuses with the reason; hfx never deletes what it did not write; metrics.jsonl after a
resume is the uninterrupted run's (no partial window, no duplicate evaluation); every bad value of the
command line ends in one line naming the key or path."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import toy_tasks  # noqa: F401  (registers the toy tasks)
import yaml
from safetensors.torch import load_file

from hfx.cli import main
from hfx.trainers import ConfigError, ResumeError, load_config, train
from hfx.trainers.checkpoint import STATE_FILE, file_manifest

TESTS = Path(__file__).parent
RECIPE = {"task": "test-toy-queue", "train": {"max_steps": 12, "batch_size": 16},
          "optimizer": {"name": "adam", "lr": 1e-2}, "checkpoint": {"every_steps": 4},
          "log": {"every_steps": 3, "report_to": []}}


def run(out: Path, *overrides: str):
    return train(load_config({**RECIPE, "output_dir": str(out)}, list(overrides)))


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def killed_after(full: Path, out: Path, step: int) -> Path:
    """``out`` as a run killed right after ``checkpoint-<step>`` left it: that checkpoint, the records logged by
    then (plus a torn half line), no final/."""
    shutil.copytree(full, out, ignore=shutil.ignore_patterns("checkpoint-*", "final", "results.json"))
    shutil.copytree(full / f"checkpoint-{step}", out / f"checkpoint-{step}")
    kept = json.loads((full / f"checkpoint-{step}" / STATE_FILE).read_text())["metrics_records"]
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:kept + 1]) + '{"step": 9, "lo')
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    run(out)
    return out


# ---------------------------------------------------------------------------------------------- resume
def test_resume_between_log_steps_with_a_torn_log_is_the_uninterrupted_run(full_run, tmp_path):
    # checkpoint-4 falls inside the log window 4-6: the resumed run's window must hold steps 4, 5 and 6
    out = killed_after(full_run, tmp_path / "run", 4)
    result = run(out, "resume_from_checkpoint=latest")
    assert result.global_step == 12 and same_weights(out, full_run)
    assert records(out) == records(full_run)


def test_a_checkpoint_with_a_missing_file_is_passed_over_loudly_or_refused(full_run, tmp_path, caplog):
    out = killed_after(full_run, tmp_path / "run", 8)
    shutil.copytree(full_run / "checkpoint-4", out / "checkpoint-4")
    (out / "checkpoint-8" / "random_states_0.pkl").unlink()
    with pytest.raises(ResumeError, match=r"checkpoint-8 is incomplete: random_states_0.pkl \(missing\)"):
        load_config({**RECIPE, "output_dir": str(out), "resume_from_checkpoint": str(out / "checkpoint-8")})
    with caplog.at_level("WARNING", logger="hfx"):
        run(out, "resume_from_checkpoint=latest")
    assert "checkpoint-8 is incomplete (random_states_0.pkl (missing)); trying the one before" in caplog.text
    assert same_weights(out, full_run) and records(out) == records(full_run)  # resumed from checkpoint-4, exactly


@pytest.mark.parametrize("damage", ["truncated model", "unreadable random state", "planted pickle"])
def test_a_damaged_checkpoint_is_refused_in_one_line(full_run, tmp_path, damage):
    out = killed_after(full_run, tmp_path / "run", 8)
    checkpoint = out / "checkpoint-8"
    model = next(checkpoint.glob("model*.safetensors"))
    if damage == "truncated model":
        model.write_bytes(model.read_bytes()[:-100])
        expected = rf"checkpoint-8 is incomplete: {model.name} \(size"
    else:
        target = checkpoint / ("random_states_0.pkl" if damage == "unreadable random state" else "optimizer.bin")
        target.write_bytes(pickle.dumps(os.system) if damage == "planted pickle" else b"\x80\x04garbage")
        # as if whoever changed the file also rewrote the manifest: the loader itself must refuse it
        state = json.loads((checkpoint / STATE_FILE).read_text())
        state["files"] = file_manifest(checkpoint)
        (checkpoint / STATE_FILE).write_text(json.dumps(state))
        expected = "random_states_0.pkl cannot be read" if damage != "planted pickle" else "cannot resume from .*checkpoint-8"
    with pytest.raises(ResumeError, match=expected) as err:
        run(out, f"resume_from_checkpoint={checkpoint}")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("override", "change"), [
    ("optimizer.lr=0.02", "optimizer.lr: 0.01 -> 0.02"),
    ("train.batch_size=8", "train.batch_size: 16 -> 8"),
    ("task_options.queue_size=8", "task_options.queue_size: 48 -> 8"),
])
def test_a_resume_that_changes_the_training_is_refused_unless_allowed(full_run, tmp_path, override, change):
    out = killed_after(full_run, tmp_path / "run", 8)
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(ResumeError, match=f"would not continue the same run \\({change}\\).*allow_config_change=true"):
        run(out, "resume_from_checkpoint=latest", override)
    assert (out / "config.yaml").read_text() == config_before  # refused before anything was written
    run(out, "resume_from_checkpoint=latest", override, "allow_config_change=true")
    assert json.loads((out / "results.json").read_text())["config_changes_on_resume"] == [change]


def test_a_resume_may_change_how_the_run_logs_and_checkpoints(full_run, tmp_path):
    out = killed_after(full_run, tmp_path / "run", 8)
    run(out, "resume_from_checkpoint=latest", "log.every_steps=5", "checkpoint.total_limit=1")
    assert same_weights(out, full_run) and "config_changes_on_resume" not in json.loads((out / "results.json").read_text())


def test_another_tasks_checkpoint_is_refused(full_run, tmp_path):
    with pytest.raises(ResumeError, match="is a checkpoint of task 'test-toy-queue', not 'test-toy-family'"):
        train(load_config({"task": "test-toy-family", "output_dir": str(tmp_path), "train": {"max_steps": 12},
                           "resume_from_checkpoint": str(full_run / "checkpoint-8")}))


def test_latest_on_a_finished_run_changes_nothing(full_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = run(out, "resume_from_checkpoint=latest")
    assert result.stop_reason == "finished" and result.global_step == 12 and "mse" in result.metrics
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_kill_after_the_last_checkpoint_logs_the_final_evaluation_once(full_run, tmp_path):
    out = tmp_path / "run"  # killed during the final save: the final evaluation was logged after checkpoint-12
    shutil.copytree(full_run, out, ignore=shutil.ignore_patterns("final", "results.json"))
    result = run(out, "resume_from_checkpoint=latest")
    assert result.stop_reason == "max_steps" and same_weights(out, full_run)
    assert records(out) == records(full_run) and sum("eval/mse" in r for r in records(out)) == 1


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_stops_cleanly_and_resumes_to_one_evaluation(full_run, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "checkpoint": {"every_steps": 5}, "task_options": {"eval_sleep": 3.0}}))
    out = tmp_path / "run"
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import toy_tasks; from hfx.cli import main; "
            "raise SystemExit(main(sys.argv[1:]))")
    command = [sys.executable, "-c", code, "train", str(recipe), f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "evaluating-12").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the final evaluation did not start"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-2000:]
    assert "stopped by signal 15 at step 12" in stderr and not (out / "final").exists()
    assert (out / "checkpoint-12").is_dir()  # the final evaluation is in it: the resumed run goes to the save
    again = subprocess.run([*command, "resume_from_checkpoint=latest"], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sum("eval/mse" in r for r in records(out)) == 1 and (out / "final").is_dir()


# ---------------------------------------------------------------------------------------------- whose files
def test_files_hfx_did_not_write_are_never_deleted(tmp_path):
    mine = {"logs/my-notes.txt": "notes", "tokenizer/vocab.json": "{}", "results.json": "{}"}
    for name, text in mine.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    for extra in ([], ["overwrite_output_dir=true"], ["resume_from_checkpoint=latest"],
                  ["resume_from_checkpoint=latest", "overwrite_output_dir=true"]):
        with pytest.raises(ConfigError, match="holds logs, results.json, tokenizer, which hfx did not write"):
            run(tmp_path, *extra)
    assert all((tmp_path / name).read_text() == text for name, text in mine.items())

    other = tmp_path / "beside"  # a folder of the user's with other files: a run goes in, and over it again
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    run(other)
    run(other, "overwrite_output_dir=true", "train.max_steps=4")
    assert (other / "notes.txt").read_text() == "mine" and records(other)[-1]["step"] == 4
    assert not (other / "checkpoint-8").exists()  # the first run's files went, and only those


def test_latest_never_starts_a_run_over_silently(full_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_run, out, ignore=shutil.ignore_patterns("checkpoint-*", "final", "results.json"))
    with pytest.raises(ResumeError, match="holds a run .* but no complete checkpoint .*overwrite_output_dir=true"):
        run(out, "resume_from_checkpoint=latest")
    assert (out / "metrics.jsonl").is_file()
    result = run(out, "resume_from_checkpoint=latest", "overwrite_output_dir=true")  # resume if you can, else again
    assert result.global_step == 12 and same_weights(out, full_run)


# ---------------------------------------------------------------------------------------------- processes
def test_a_launcher_whose_world_size_accelerate_does_not_see_is_refused(tmp_path, monkeypatch):
    """Two launched processes that would each train alone (GPUs expected, none usable) are refused."""
    import hfx.trainers.engine as engine

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(engine, "_has_accelerator_device", lambda: True)
    with pytest.raises(ConfigError, match="the launcher started 2 processes but accelerate set up 1 .*ACCELERATE_USE_CPU=1"):
        run(tmp_path)


# ---------------------------------------------------------------------------------------------- bad values
def _folder_of_images(folder: Path, corrupt: bool = False) -> Path:
    from PIL import Image

    for label in ("a", "b"):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(folder / label / f"{i}.png")
    if corrupt:
        (folder / "a" / "broken.png").write_bytes(b"not a png")
    return folder


FIXTURE_PIPE = str(TESTS / "fixtures" / "saved_by_0.1.0" / "class_conditional")
TRAIN = ["train", "classify-digits", "train.max_steps=1", "log.report_to=[]"]


@pytest.mark.parametrize(("argv", "named"), [
    (TRAIN + ["train.max_grad_norm=-1"], "'train.max_grad_norm' must be > 0, got -1.0"),
    (TRAIN + ["train.max_grad_norm=0"], "'train.max_grad_norm' must be > 0, got 0.0; null turns gradient clipping off"),
    (TRAIN + ["scheduler.min_lr_ratio=5"], "'scheduler.min_lr_ratio' must be in [0, 1], got 5.0"),
    (TRAIN + ["scheduler.warmup_steps=-10"], "'scheduler.warmup_steps' must be >= 0, got -10"),
    (TRAIN + ["optimizer.weight_decay=-1"], "'optimizer.weight_decay' must be >= 0"),
    (TRAIN + ["optimizer.lr=0"], "'optimizer.lr' must be > 0, got 0.0"),
    (TRAIN + ["optimizer.lr=.nan"], "'optimizer.lr' must be a finite number, got nan"),
    (TRAIN + ["optimizer.betas=[0.9, 1.5]"], "'optimizer.betas' must be in [0, 1)"),
    (TRAIN + ["task_options.random_shift=-3"], "'task_options.random_shift' must be >= 0, got -3"),
    (TRAIN + ["train.eval_batch_size=0"], "'train.eval_batch_size' must be >= 1, got 0"),
    (TRAIN + ["train.eval_batch_size=-1"], "'train.eval_batch_size' must be >= 1, got -1"),
    (TRAIN + ["train.max_steps=null", "train.epochs=.inf"], "'train.epochs' must be a finite number, got inf"),
    (TRAIN + ["train.max_steps=null", "train.epochs=.nan"], "'train.epochs' must be a finite number, got nan"),
    (TRAIN + ["data.max_train_samples=0"], "'data.max_train_samples' must be >= 1, got 0"),
    (TRAIN + ["data.max_train_samples=-5"], "'data.max_train_samples' must be >= 1, got -5"),
    (TRAIN + ["task_options.label_smoothing=2"], "'task_options.label_smoothing' must be in [0, 1), got 2.0"),
    (TRAIN + ["task_options.model=timm:no_such_model"], "timm has no model 'no_such_model'"),
    (TRAIN + ["seed=-1"], "'seed' must be >= 0"),
    (["train", "ddpm-digits", "task_options.default_guidance_scale=.nan"],
     "'task_options.default_guidance_scale' must be a finite number, got nan"),
    (["train", "{tmp}/binary.yaml"], "recipe '{tmp}/binary.yaml' is not a text (UTF-8 YAML) file"),
    (["train", "{tmp}"], "recipe '{tmp}' is a folder"),
    (TRAIN + ["output_dir={tmp}/a-file/run"], "output_dir '{tmp}/a-file/run' is under {tmp}/a-file, which is a file"),
    (TRAIN + ["output_dir={tmp}/a-file"], "output_dir '{tmp}/a-file' is a file"),
    (TRAIN + ["data.dataset={tmp}/broken", "data.options={}", "train.batch_size=2", "train.max_steps=4",
              "output_dir={tmp}/run"],
     "cannot identify image file '{tmp}/broken/a/broken.png'"),
    (["sample", FIXTURE_PIPE, "--device", "cuda", "--out", "{tmp}/g.png"], "--device cuda: no cuda device"),
    (["sample", FIXTURE_PIPE, "--out", "{tmp}"], "--out {tmp} is a folder"),
    (["sample", FIXTURE_PIPE, "--guidance", "nan", "--steps", "2", "--out", "{tmp}/g.png"], "guidance_scale must be >= 0"),
    (["sample", FIXTURE_PIPE, "--n", "0"], "argument --n: expected a whole number >= 1, got '0'"),
    (["sample", "someone/offline-repo", "--out", "{tmp}/g.png"], "cannot load pipeline 'someone/offline-repo'"),
    (["evaluate", "--generated", "{tmp}/good", "--reference", "digits:test", "--extractor", "timm:resnet10t:random",
      "--batch-size", "0"], "argument --batch-size: expected a whole number >= 1, got '0'"),
    (["evaluate", "--generated", "{tmp}/good", "--reference", "digits:test", "--extractor", "timm:resnet10t:random",
      "--limit", "0"], "argument --limit: expected a whole number >= 1, got '0'"),
    (["evaluate", "--generated", "{tmp}/broken", "--reference", "digits:test", "--extractor", "timm:resnet10t:random"],
     "cannot identify image file '{tmp}/broken/a/broken.png'"),
    (["evaluate", "--generated", "{tmp}/good", "--reference", "{tmp}/bad.npz", "--extractor", "timm:resnet10t:random"],
     "statistics file '{tmp}/bad.npz' is not an .npz of named arrays"),
    (["evaluate", "--generated", "{tmp}/good", "--reference", "digits:test", "--extractor", "inception:{tmp}/planted.pth"],
     "weights file '{tmp}/planted.pth' cannot be read as tensors (UnpicklingError"),
    (["sample", "{tmp}/truncated", "--steps", "2", "--out", "{tmp}/g.png"],
     "{tmp}/truncated/unet/diffusion_pytorch_model.safetensors"),
])
def test_every_bad_value_ends_in_one_line_naming_it(tmp_path, capsys, argv, named):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    _folder_of_images(tmp_path / "good")
    _folder_of_images(tmp_path / "broken", corrupt=True)
    (tmp_path / "planted.pth").write_bytes(pickle.dumps(os.system))
    shutil.copytree(FIXTURE_PIPE, tmp_path / "truncated")
    weights_file = tmp_path / "truncated" / "unet" / "diffusion_pytorch_model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:3000])
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "train" and not any(a.startswith("output_dir=") for a in argv):
        argv.append(f"output_dir={tmp_path / 'run'}")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        status = exit_.code
    err = capsys.readouterr().err.strip()
    assert status in (1, 2), err
    assert "Traceback" not in err and named.replace("{tmp}", str(tmp_path)) in err.splitlines()[-1], err
    assert all((tmp_path / p).exists() for p in before)  # nothing that was there is gone
