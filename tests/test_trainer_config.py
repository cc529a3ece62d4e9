"""The engine's configuration, schedules, EMA and checkpoint folders (fast, no training)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from hfx.cli import main
from hfx.trainers import ConfigError, load_config
from hfx.trainers.checkpoint import STATE_FILE, list_checkpoints, prune, resolve_checkpoint
from hfx.trainers.config import dump_yaml, parse_overrides
from hfx.trainers.ema import EMA
from hfx.trainers.schedules import SCHEDULES, register_schedule

RECIPE = {
    "task": "image-classification",
    "data": {"dataset": "digits"},
    "task_options": {"model": "timm:resnet10t", "label_smoothing": 0.1},
    "train": {"max_steps": 5},
}


def test_shipped_recipes_validate():
    digits = load_config("classify-digits")
    assert digits.task_options.model == "timm:resnet10t" and digits.task_options.label_smoothing == 0.1
    assert digits.optimizer.lr == pytest.approx(3e-3)
    lm = load_config("lm-stdlib")
    assert lm.task_options.model_options["num_hidden_layers"] == 4 and lm.optimizer.betas == (0.9, 0.95)


def test_overrides_are_typed_by_the_dataclass_fields():
    config = load_config(RECIPE, ["optimizer.lr=3e-4", "optimizer.betas=[0.8, 0.9]", "train.max_steps=20",
                                  "log.report_to=[]", "task_options.random_shift=2", "train.max_grad_norm=null",
                                  "output_dir=/tmp/x"])
    assert config.optimizer.lr == 3e-4 and isinstance(config.optimizer.lr, float)  # "3e-4" is a str in YAML 1.1
    assert config.optimizer.betas == (0.8, 0.9)
    assert config.train.max_steps == 20 and config.train.max_grad_norm is None
    assert config.log.report_to == [] and config.task_options.random_shift == 2
    assert parse_overrides(["a.b.c=1", "a.b.d=x"]) == [(["a", "b", "c"], 1), (["a", "b", "d"], "x")]
    # one key keeps its siblings; a whole mapping replaces them
    kept = load_config("classify-digits", ["task_options.model_options.stem_width=8"]).task_options.model_options
    assert kept == {"channels": [32, 64, 128, 256], "stem_width": 8}
    replaced = load_config("classify-digits", ["task_options.model_options={depth: 1}"]).task_options.model_options
    assert replaced == {"depth": 1}


@pytest.mark.parametrize(("overrides", "message"), [
    (["optimizer.lrr=1"], "unknown config key 'optimizer.lrr'; did you mean 'optimizer.lr'?"),
    (["trian.max_steps=1"], "unknown config key 'trian'; did you mean 'train'?"),
    (["task_options.label_smooth=0.1"],
     "unknown config key 'task_options.label_smooth'; did you mean 'task_options.label_smoothing'?"),
    (["train.max_steps=abc"], "config key 'train.max_steps' must be an integer, got 'abc' (str)"),
    (["train.batch_size=2.5"], "config key 'train.batch_size' must be an integer, got 2.5 (float)"),
    (["train.mixed_precision=fp8"], "config key 'train.mixed_precision' must be one of"),
    (["ema.enabled=maybe"], "config key 'ema.enabled' must be true or false"),
    (["task=image-clasification"], "unknown task 'image-clasification'; did you mean 'image-classification'?"),
    (["scheduler.name=cosin"], "unknown scheduler.name 'cosin'; did you mean 'cosine'?"),
    (["data.dataset=/no/such/folder"], "data.dataset '/no/such/folder' does not exist"),
    (["data.dataset=null"], "missing required config key 'data.dataset'"),
    (["train.max_steps=0"], "config key 'train.max_steps' must be >= 1, got 0"),
    (["eval.early_stopping_patience=2"], "eval.early_stopping_patience needs eval.metric"),
    (["optimizers.main.lrr=1"], "unknown config key 'optimizers.main.lrr'; did you mean 'optimizers.main.lr'?"),
    (["callbacks=[{name: nope}]"], "unknown callback 'nope'"),
    (["train.max_steps"], "override 'train.max_steps' is not of the form key.sub=value"),
    (["train.max_steps.x=1"], "override 'train.max_steps.x': 'train.max_steps' is a value, not a section"),
])
def test_bad_config_names_the_problem(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_task_key():
    with pytest.raises(ConfigError, match="missing required config key 'task'"):
        load_config({"data": {"dataset": "digits"}, "train": {"max_steps": 1}})


@pytest.mark.parametrize("override", ["optimizer.lrr=1", "train.max_steps=abc", "data.dataset=/no/such/folder"])
def test_cli_bad_config_exits_with_one_line_before_building_anything(tmp_path, capsys, override):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "run"
    assert main(["train", str(recipe), f"output_dir={out}", override]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hfx train: error: ") and "\n" not in err
    assert override.split("=")[0].split(".")[-1] in err or "/no/such/folder" in err
    assert not out.exists()  # nothing was built or written


def test_resolved_config_round_trips(tmp_path):
    config = load_config(RECIPE, ["optimizer.lr=0.01", f"output_dir={tmp_path}"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(config))
    again = load_config(str(path))
    assert again.recipe == str(path)
    again.recipe = None
    assert dump_yaml(again) == dump_yaml(config)
    assert again.task_options == config.task_options and again.optimizer.lr == 0.01


def test_a_previous_run_is_not_silently_mixed_into(tmp_path):
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / STATE_FILE).write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run .*checkpoint-10.*resume_from_checkpoint=latest"):
        load_config(RECIPE, [f"output_dir={tmp_path}"])
    load_config(RECIPE, [f"output_dir={tmp_path}", "resume_from_checkpoint=latest"])
    load_config(RECIPE, [f"output_dir={tmp_path}", "overwrite_output_dir=true"])
    with pytest.raises(FileNotFoundError, match="checkpoint-99 does not exist"):
        load_config(RECIPE, [f"output_dir={tmp_path}", f"resume_from_checkpoint={tmp_path}/checkpoint-99"])


# ---------------------------------------------------------------------------------------------- schedules
def _stepped(make_schedule, steps: int) -> list[float]:
    """The lr of each of ``steps`` optimizer steps under ``make_schedule(optimizer)`` (peak lr 2.0)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    schedule = make_schedule(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def _lrs(overrides, steps=100):
    from hfx.trainers.schedules import build_schedule

    config = load_config(RECIPE, overrides)
    return _stepped(lambda optimizer: build_schedule(config, optimizer, steps), steps)


def _transformers_lrs(name, steps=100, warmup_steps=0, **kwargs):
    """What ``TrainingArguments(lr_scheduler_type=name, warmup_steps=..., lr_scheduler_kwargs=...)`` gives."""
    from transformers import get_scheduler

    return _stepped(lambda optimizer: get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps,
                                                    scheduler_specific_kwargs=kwargs), steps)


def test_schedules_are_transformers_own_curves():
    cosine = _lrs(["scheduler={name: cosine, warmup_steps: 10, min_lr_ratio: 0.1}"])
    assert cosine == _transformers_lrs("cosine_with_min_lr", warmup_steps=10, min_lr_rate=0.1)
    assert cosine[0] == 0.0 and cosine[10] == pytest.approx(2.0)  # transformers' warm-up starts at 0
    # half-way through the decay: min + (1 - min) * 0.5
    assert cosine[55] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))))
    assert _lrs(["scheduler={name: cosine, warmup_steps: 10}"]) == _transformers_lrs("cosine", warmup_steps=10)
    assert _lrs(["scheduler.name=linear"])[50] == pytest.approx(1.0)
    assert _lrs(["scheduler={name: constant_with_warmup, warmup_steps: 4}"])[4:] == [pytest.approx(2.0)] * 96


@pytest.mark.parametrize(("overrides", "message"), [
    (["scheduler={name: constant, warmup_steps: 5}"], "'constant' has no warm-up"),
    (["scheduler={name: linear, min_lr_ratio: 0.1}"], "has no effect on 'linear'"),
    (["scheduler.name=cosine_with_min_lr"], "needs scheduler.min_lr_ratio > 0"),
    (["scheduler.name=reduce_lr_on_plateau"], "needs eval.metric"),
    (["scheduler.min_lr_ratio=5"], "config key 'scheduler.min_lr_ratio' must be in [0, 1], got 5.0"),
    (["scheduler.warmup_steps=-10"], "config key 'scheduler.warmup_steps' must be >= 0, got -10"),
    (["scheduler.name=relora_jagged"], "needs peft.method relora"),
])
def test_schedule_settings_that_would_be_ignored_or_are_out_of_range_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        _lrs(overrides)
    assert message in str(err.value)


def test_register_schedule_by_name():
    def halving(optimizer, config, total_steps):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.scheduler.options["every"], gamma=0.5)

    register_schedule("test-halving", halving)
    register_schedule("test-halving", halving)  # the same factory again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("test-halving", lambda *a, **k: None)
    with pytest.raises(ValueError, match="transformers SchedulerType"):
        register_schedule("cosine", halving)
    assert _lrs(["scheduler={name: test-halving, options: {every: 10}}"], steps=25)[::10] == [2.0, 1.0, 0.5]
    assert "test-halving" in SCHEDULES


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_matches_the_formula_and_swaps_back():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    expected = model.weight.detach().clone()
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update(model)
        expected = 0.9 * expected + 0.1 * model.weight.detach()
    trained = model.weight.detach().clone()
    with ema.swapped_into(model):
        torch.testing.assert_close(model.weight.detach(), expected)
    assert torch.equal(model.weight, trained)
    restored = EMA(model, decay=0.9, warmup=False)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 5 and torch.equal(restored.shadow["weight"], ema.shadow["weight"])
    assert EMA(model, decay=0.999).current_decay() == pytest.approx(1 / 10)  # warm-up: (1 + 0) / (10 + 0)


# ---------------------------------------------------------------------------------------------- folders
def _checkpoint(folder: Path, step: int) -> Path:
    """A complete checkpoint folder as the engine writes one (files, then the state file with their manifest)."""
    from hfx.trainers.checkpoint import commit

    tmp = folder / f"checkpoint-{step}.tmp"
    tmp.mkdir(parents=True)
    for name in ("model.safetensors", "engine_state.pt", "random_states_0.pkl"):
        (tmp / name).write_bytes(f"{name} of step {step}".encode())
    return commit(tmp, {"counters": {"global_step": step}, "num_processes": 1})


def test_checkpoint_folders_ignore_tmp_and_incomplete(tmp_path: Path, caplog):
    from hfx.trainers import ResumeError

    for step in (5, 10, 15, 30):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-20.tmp").mkdir()  # a save killed half-way
    (tmp_path / "checkpoint-25").mkdir()  # no state file: incomplete
    (tmp_path / "checkpoint-30" / "random_states_0.pkl").unlink()  # a file lost after the save
    (tmp_path / "checkpoint-15" / "model.safetensors").write_bytes(b"model.safetensors of step 99")  # changed
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-10", "checkpoint-15",
                                                           "checkpoint-30"]
    with caplog.at_level("WARNING", logger="hfx"):
        assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-10"
    assert "checkpoint-30 is incomplete (random_states_0.pkl (missing))" in caplog.text
    assert "checkpoint-15 is incomplete (model.safetensors (content changed))" in caplog.text
    assert resolve_checkpoint("latest", tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_checkpoint(str(tmp_path / "checkpoint-25"), tmp_path)
    with pytest.raises(ResumeError, match="checkpoint-30 is incomplete: random_states_0.pkl"):
        resolve_checkpoint(str(tmp_path / "checkpoint-30"), tmp_path)
    prune(tmp_path, total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-15", "checkpoint-25", "checkpoint-30"]
