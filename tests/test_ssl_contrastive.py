"""SimCLR and MoCo v2: training lowers the loss, the frozen-feature metrics and the collapse monitor, the saved
backbone (a plain timm model, loaded where hfx cannot be imported, gives the features the run evaluated), MoCo's
queue and momentum encoder, a SIGKILLed MoCo run resumed bit-identically, and one-line errors for bad options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from kill_resume import BLOCK_HFX, full_killed_resumed
from safetensors.torch import load_file

import hfx.data
from hfx.cli import main
from hfx.metrics.representation import COLLAPSE_THRESHOLD, knn_accuracy
from hfx.trainers import ConfigError, load_config, train
from hfx.trainers.errors import ResumeError
from hfx.trainers.tasks._ssl import ProjectionHead, momentum_update, representation_metrics
from hfx.trainers.tasks.moco import MoCoTask

VIT = {"backbone": "timm:vit_tiny_patch16_224",
       "backbone_options": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
                            "global_pool": "avg"}}
RESNET = {"backbone": "timm:resnet10t", "backbone_options": {"channels": [8, 16, 32, 64], "stem_width": 8}}
TINY = {
    "seed": 0,
    "data": {"dataset": "digits", "options": {"image_size": 16}, "max_train_samples": 200, "max_eval_samples": 60},
    "task_options": {**VIT, "projection_hidden_dim": 64, "projection_dim": 32, "eval_batch_size": 100},
    "train": {"max_steps": 30, "batch_size": 32},
    "optimizer": {"name": "adamw", "lr": 2e-3},
    "eval": {"every_steps": None},
    "checkpoint": {"every_steps": None},
    "log": {"every_steps": 5, "report_to": []},
}


def recipe(task: str, out: Path, options: dict | None = None, **sections) -> dict:
    config = {**TINY, "task": task, **sections, "output_dir": str(out)}
    config["task_options"] = {**TINY["task_options"], **(options or {})}
    if task == "moco":
        config["task_options"].setdefault("queue_size", 96)
    return config


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def digits_pixels(split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's preprocessing, written out: 16x16 greyscale, pixels / 255, then (x - 0.5) / 0.5."""
    data = hfx.data.load("digits", seed=0, image_size=16)[split].select(range(limit))
    pixels = np.stack([np.asarray(im.convert("L"), dtype=np.float32) for im in data["image"]]) / 255.0
    return torch.from_numpy((pixels - 0.5) / 0.5)[:, None], torch.tensor(data["label"])


#: Run where importing hfx fails: the backbone in argv[1] through plain timm, features of argv[2] saved to argv[3].
PLAIN_TIMM = BLOCK_HFX + """import timm, torch
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
config = timm.data.resolve_data_config({}, model=model)
with torch.no_grad():
    features = model(torch.load(sys.argv[2], weights_only=True))
torch.save({"features": features, "input_size": config["input_size"], "mean": config["mean"], "std": config["std"]},
           sys.argv[3])
"""


# ---------------------------------------------------------------------------------------------- training, artifact
@pytest.mark.parametrize("task, options", [("simclr", VIT), ("simclr", RESNET), ("moco", RESNET)])
def test_training_lowers_the_loss_and_the_backbone_loads_with_plain_timm(task, options, tmp_path):
    out = tmp_path / "run"
    steps = 40
    config = recipe(task, out, options, train={**TINY["train"], "max_steps": steps},
                    eval={"every_steps": steps, "at_start": True})
    result = train(load_config(config))
    logged = [r["loss"] for r in records(out) if "loss" in r]
    evals = [r for r in records(out) if "eval/knn_accuracy" in r]
    assert [r["step"] for r in evals] == [0, steps]
    assert {f"eval/{key}" for key in ("knn_accuracy", "linear_probe_accuracy", "knn_accuracy_10_per_class",
                                      "linear_probe_accuracy_10_per_class", "feature_std", "collapsed", "loss")
            } <= set(evals[-1])
    if task == "simclr":  # NT-Xent falls from the start; MoCo's first steps compare against a random queue
        assert max(logged[-3:]) < logged[0] and evals[-1]["eval/loss"] < 0.97 * evals[0]["eval/loss"], (logged, evals)
    assert evals[-1]["eval/knn_accuracy"] > evals[0]["eval/knn_accuracy"], evals
    assert evals[-1]["eval/collapsed"] in (0.0, 1.0)

    # final/ is the backbone alone, a plain timm model: no projection head
    final = result.final_dir
    saved = load_file(final / "model.safetensors")
    assert not any(k.startswith(("projection_head", "0.", "key_")) for k in saved)
    config_json = json.loads((final / "config.json").read_text())
    assert config_json["num_classes"] == 0 and config_json["architecture"] == options["backbone"][len("timm:"):]
    assert "pipeline_tag: image-feature-extraction" in (final / "README.md").read_text()

    # loaded where hfx cannot be imported, it gives the features the run's last evaluation measured
    train_x, train_y = digits_pixels("train", TINY["data"]["max_train_samples"])
    test_x, test_y = digits_pixels("test", TINY["data"]["max_eval_samples"])
    torch.save(torch.cat([train_x, test_x]), tmp_path / "pixels.pt")
    run = subprocess.run([sys.executable, "-c", PLAIN_TIMM, str(final), str(tmp_path / "pixels.pt"),
                          str(tmp_path / "features.pt")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    got = torch.load(tmp_path / "features.pt", weights_only=True)
    assert tuple(got["input_size"]) == (1, 16, 16) and tuple(got["mean"]) == (0.5,) and tuple(got["std"]) == (0.5,)
    features = got["features"].double()
    knn = knn_accuracy(features[:len(train_x)], train_y, features[len(train_x):], test_y, 20, 0.07)
    assert knn == pytest.approx(evals[-1]["eval/knn_accuracy"], abs=1e-12)


def test_a_constant_backbone_is_reported_as_collapsed():
    task = SimpleNamespace(options=SimpleNamespace(eval_batch_size=64, few_labels=2, knn_k=5, knn_temperature=0.07),
                           accelerator=SimpleNamespace(device="cpu"), config=SimpleNamespace(seed=0))
    items = [{"pixel_values": torch.randn(1, 4, 4), "labels": torch.tensor(i % 3)} for i in range(30)]
    collapsed = representation_metrics(task, lambda x: torch.ones(len(x), 8), items, items)
    assert collapsed["collapsed"] == 1.0 and collapsed["feature_std"] < COLLAPSE_THRESHOLD
    healthy = representation_metrics(task, lambda x: x.flatten(1), items, items)
    assert healthy["collapsed"] == 0.0 and healthy["feature_std"] > 0.5


# ---------------------------------------------------------------------------------------------- MoCo's parts
def test_the_momentum_update_moves_the_key_encoder_towards_the_query_encoder():
    torch.manual_seed(0)
    query, key = ProjectionHead(4, 8, 3, batch_norm=True), ProjectionHead(4, 8, 3, batch_norm=True)
    before = {k: v.clone() for k, v in key.state_dict().items()}
    key[1].running_mean.fill_(7.0)  # BatchNorm statistics are the key encoder's own
    momentum_update(key, query, 0.9)
    for name, p in key.named_parameters():
        assert torch.allclose(p, 0.9 * before[name] + 0.1 * dict(query.named_parameters())[name], atol=1e-7)
    assert torch.equal(key[1].running_mean, torch.full((8,), 7.0))
    momentum_update(key, query, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(key.parameters(), query.parameters()))


def test_the_queue_is_a_ring_buffer_and_round_trips():
    task = MoCoTask.__new__(MoCoTask)
    task.queue, task.queue_ptr, task.keys_seen = torch.zeros(5, 2), 0, 0
    task.enqueue(torch.ones(3, 2))
    task.enqueue(torch.full((3, 2), 2.0))  # wraps: slots 3, 4, then 0
    assert task.queue[:, 0].tolist() == [2, 1, 1, 2, 2] and task.queue_ptr == 1 and task.keys_seen == 6
    state = task.state_dict()
    task.enqueue(torch.full((1, 2), 3.0))
    task.load_state_dict(state)
    assert task.queue[:, 0].tolist() == [2, 1, 1, 2, 2] and task.queue_ptr == 1
    other = MoCoTask.__new__(MoCoTask)
    other.queue = torch.zeros(4, 2)
    with pytest.raises(ResumeError, match=r"the checkpoint's MoCo queue holds 5 keys of 2 dimensions"):
        other.load_state_dict(state)


def test_a_sigkilled_moco_run_resumes_bit_identically_with_its_queue_and_key_encoder(tmp_path):
    config = recipe("moco", tmp_path / "run", train={**TINY["train"], "max_steps": 20, "batch_size": 16},
                    scheduler={"name": "cosine", "warmup_steps": 3}, eval={"every_steps": 10},
                    checkpoint={"every_steps": 5}, log={"every_steps": 3, "report_to": []})
    config["task_options"]["queue_size"] = 40  # not a multiple of the batch: the ring buffer wraps mid-batch
    full, killed, _ = full_killed_resumed(config, tmp_path, kill_at=10)
    a, b = load_file(full / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the key encoder (models 2 and 3 of the checkpoint) and the queue, pointer and count of the last checkpoint
    for part in ("model_2.safetensors", "model_3.safetensors", "model.safetensors"):
        x, y = load_file(full / "checkpoint-20" / part), load_file(killed / "checkpoint-20" / part)
        assert all(torch.equal(x[k], y[k]) for k in x), part
    key = load_file(full / "checkpoint-20" / "model_2.safetensors")
    assert any(not torch.equal(key[k], a[k]) for k in a)  # it trails the query backbone
    s_full = torch.load(full / "checkpoint-20" / "task_state_0.pt", weights_only=True)
    s_killed = torch.load(killed / "checkpoint-20" / "task_state_0.pt", weights_only=True)
    assert torch.equal(s_full["queue"], s_killed["queue"])
    assert s_full["keys_seen"] == s_killed["keys_seen"] == 20 * 16
    assert s_full["queue_ptr"] == s_killed["queue_ptr"] == (20 * 16) % 40
    assert [r for r in records(full) if "eval/loss" in r] == [r for r in records(killed) if "eval/loss" in r]
    train_full = [(r["step"], r["loss"]) for r in records(full) if "loss" in r]
    assert len(train_full) == 7 and train_full == [(r["step"], r["loss"]) for r in records(killed) if "loss" in r]


# ---------------------------------------------------------------------------------------------- bad options
BAD = [
    ("simclr", {"temperature": float("nan")}, "config key 'task_options.temperature' must be a finite number, got nan"),
    ("simclr", {"temperature": 0.0}, "config key 'task_options.temperature' must be > 0, got 0.0"),
    ("moco", {"queue_size": -4}, "config key 'task_options.queue_size' must be >= 1, got -4"),
    ("moco", {"momentum": 1.0}, "config key 'task_options.momentum' must be in [0, 1), got 1.0"),
    ("moco", {"momentum": -0.1}, "config key 'task_options.momentum' must be in [0, 1), got -0.1"),
    ("moco", {"momentum": "fast"}, "config key 'task_options.momentum' must be a number"),
    ("simclr", {"crop_scale": [0.9, 0.3]}, "task_options.crop_scale must be (low, high) with low <= high"),
    ("simclr", {"crop_scale": [0.0, 1.0]}, "config key 'task_options.crop_scale' must be in (0, 1]"),
    ("simclr", {"jitter": 1.0}, "config key 'task_options.jitter' must be in [0, 1), got 1.0"),
    ("simclr", {"projection_layers": 0}, "config key 'task_options.projection_layers' must be >= 1, got 0"),
    ("moco", {"queu_size": 8}, "unknown config key 'task_options.queu_size'; did you mean 'task_options.queue_size'?"),
]
BAD_AT_BUILD = [
    ("simclr", {"backbone": "timm:vit_tinny_patch16_224"}, "task_options.backbone 'timm:vit_tinny_patch16_224': timm "
                                                          "has no model 'vit_tinny_patch16_224'; did you mean"),
    ("moco", {"backbone": "resnet18"}, "task_options.backbone 'resnet18' must be 'timm:<name>'"),
    ("simclr", {"backbone_options": {"in_chans": 3}}, "task_options.backbone_options.in_chans cannot be set: it comes "
                                                      "from the data"),
    ("simclr", {"backbone_options": {"embed_dim": "wide"}}, "task_options.backbone_options {'embed_dim': 'wide'} do not "
                                                            "make a 'timm:vit_tiny_patch16_224'"),
    ("moco", {"backbone_options": {"patch_size": 4}}, "task_options.backbone 'timm:vit_tiny_patch16_224' cannot take "
                                                      "16x16 images with 1 channel(s) (a ViT needs"),
    ("moco", {"queue_size": 8}, "task_options.queue_size 8 is smaller than the keys one step enqueues "
                                "(train.batch_size 32 x 1 process(es) = 32)"),
]


@pytest.mark.parametrize("task, options, message", BAD)
def test_bad_options_are_one_line_config_errors_naming_the_key(task, options, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(recipe(task, tmp_path, options))
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("task, options, message", BAD_AT_BUILD)
def test_bad_backbones_and_queues_fail_before_training_in_one_line(task, options, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        train(load_config(recipe(task, tmp_path / "run", options)))
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "run" / "final").exists()


def test_hfx_train_exits_1_with_one_line_naming_the_key(tmp_path, capsys):
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe("moco", tmp_path / "run")))
    assert main(["train", str(path), "task_options.temperature=nan"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hfx train: error: config key 'task_options.temperature' must be a finite number") \
        and "\n" not in err, err


def test_the_shipped_recipes_load_and_validate(tmp_path):
    for name, task in (("simclr-digits", "simclr"), ("moco-digits", "moco")):
        config = load_config(name, [f"output_dir={tmp_path / name}"])
        assert config.task == task and config.data.dataset == "digits" and config.data.options == {"image_size": 16}
    moco = load_config("moco-digits", [f"output_dir={tmp_path / 'm'}"]).task_options
    assert moco.temperature == 0.2 and 0.9 <= moco.momentum < 1
