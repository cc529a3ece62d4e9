"""DeiT distillation and the ViT training tricks of ``image-classification``: the losses against hand
computations, a distilled DeiT that trains and reloads without hfx, MixUp/CutMix, RandAugment, stochastic
depth, an exact resume with all of them on, and one-line errors for bad options."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from kill_resume import full_killed_resumed
from safetensors.torch import load_file

from hfx.cli import main
from hfx.trainers import ConfigError, load_config, train
from hfx.trainers.tasks.image_classification import ImageClassificationTask, deit_loss, teacher_inputs

DEIT = {"model": "timm:deit_tiny_distilled_patch16_224",
        "model_options": {"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}


def recipe(output_dir: Path, **task_options) -> dict:
    """A tiny DeiT on 8x8 digits: a few seconds per run on one thread."""
    return {
        "task": "image-classification", "output_dir": str(output_dir), "seed": 0,
        "data": {"dataset": "digits", "options": {"image_size": 8}, "max_eval_samples": 64},
        "task_options": {**DEIT, "gradcam_grid": 0, **task_options},
        "train": {"max_steps": 30, "batch_size": 32},
        "optimizer": {"lr": 2e-3},
        "log": {"every_steps": 1, "report_to": []},
    }


def records(run_dir: Path, key: str) -> list[dict]:
    import json

    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny timm ResNet trained by ``image-classification`` at another size and normalisation (12x12,
    mean 0 / std 1) than the students (8x8, mean 0.5 / std 0.5)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train({
        "task": "image-classification", "output_dir": str(out), "seed": 0,
        "data": {"dataset": "digits", "options": {"image_size": 8}},
        "task_options": {"model": "timm:resnet10t", "model_options": {"channels": [8, 16, 16, 16], "stem_width": 8},
                         "image_size": 12, "mean": 0.0, "std": 1.0, "gradcam_grid": 0},
        "train": {"max_steps": 40, "batch_size": 64}, "optimizer": {"lr": 3e-3},
        "log": {"report_to": []}, "eval": {"at_end": False},
    })
    return out / "final"


def build_task(config_dict: dict) -> ImageClassificationTask:
    """The task of a recipe with its data and models built, on the CPU (no Trainer)."""
    import accelerate

    config = load_config(config_dict)
    task = ImageClassificationTask(config, accelerate.Accelerator(cpu=True))
    task.data = task.build_data()
    task.models = task.build_models()
    return task


def first_batch(task: ImageClassificationTask, n: int = 32) -> dict[str, torch.Tensor]:
    items = [task.data.train[i] for i in range(n)]
    return {"pixel_values": torch.stack([x["pixel_values"] for x in items]),
            "labels": torch.stack([x["labels"] for x in items])}


# ---------------------------------------------------------------------------------------------- the losses
@pytest.mark.parametrize("soft_targets", [False, True])
def test_deit_loss_equals_hand_computation(soft_targets):
    g = torch.Generator().manual_seed(0)
    cls, dist, teach = (torch.randn(6, 5, generator=g) for _ in range(3))
    labels = torch.randint(0, 5, (6,), generator=g)
    targets = torch.softmax(torch.randn(6, 5, generator=g), -1) if soft_targets else labels
    alpha, T, eps = 0.3, 2.5, 0.1
    if soft_targets:  # the targets carry the smoothing
        ce = -(targets * torch.log_softmax(cls, -1)).sum(-1).mean()
    else:
        one_hot = F.one_hot(labels, 5).float() * (1 - eps) + eps / 5
        ce = -(one_hot * torch.log_softmax(cls, -1)).sum(-1).mean()
    p_t = torch.softmax(teach / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(dist / T, -1))).sum(-1).mean()
    soft, base, kd = deit_loss(cls, dist, teach, targets, "soft", alpha, T, eps)
    assert base.item() == pytest.approx(ce.item(), rel=1e-5)
    assert kd.item() == pytest.approx((T**2 * kl).item(), rel=1e-5)
    assert soft.item() == pytest.approx(((1 - alpha) * ce + alpha * T**2 * kl).item(), rel=1e-5)
    hard, _, kd = deit_loss(cls, dist, teach, targets, "hard", alpha, T, eps)
    hard_ce = -torch.log_softmax(dist, -1)[torch.arange(6), teach.argmax(-1)].mean()
    assert kd.item() == pytest.approx(hard_ce.item(), rel=1e-5)
    assert hard.item() == pytest.approx(((1 - alpha) * ce + alpha * hard_ce).item(), rel=1e-5)


def test_teacher_sees_its_own_preprocessing(teacher, tmp_path):
    """The student's 8x8 (x - 0.5) / 0.5 batch becomes the teacher's 12x12 (x - 0) / 1 input."""
    task = build_task(recipe(tmp_path, teacher=str(teacher), distillation="hard"))
    pixels = first_batch(task, 4)["pixel_values"]
    got = teacher_inputs(pixels, 0.5, 0.5, task.teacher)
    unit = pixels * 0.5 + 0.5
    expected = F.interpolate(unit, size=(12, 12), mode="bilinear", antialias=True)
    assert got.shape == (4, 1, 12, 12) and torch.allclose(got, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------- distillation runs
def test_distilled_deit_trains_and_reloads_without_hfx(teacher, tmp_path):
    out = tmp_path / "deit"
    result = train(recipe(out, teacher=str(teacher), distillation="hard", distill_alpha=0.5))
    logged = records(out, "loss_distill")
    assert len(logged) == 30 and all(np.isfinite(r["loss_distill"]) for r in logged)
    first, last = np.mean([r["loss_distill"] for r in logged[:5]]), np.mean([r["loss_distill"] for r in logged[-5:]])
    assert last < first  # the distillation head learns the teacher
    assert "Distilled (hard" in (result.final_dir / "README.md").read_text()
    # The saved artifact is plain timm: it loads in a process that cannot import hfx, and predicts the mean of
    # the class and distillation heads.
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    script = """
import importlib.abc, sys
class BlockHfx(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hfx" or name.startswith("hfx."):
            raise ImportError(name)
sys.meta_path.insert(0, BlockHfx())
import timm, torch
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
assert type(model).__name__ == "VisionTransformerDistilled"
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2], weights_only=True)), sys.argv[3])
"""
    run = subprocess.run([sys.executable, "-c", script, str(result.final_dir), str(tmp_path / "x.pt"),
                          str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    reloaded = torch.load(tmp_path / "logits.pt", weights_only=True)
    import timm

    model = timm.create_model("deit_tiny_distilled_patch16_224", in_chans=1, num_classes=10, **DEIT["model_options"])
    model.load_state_dict(load_file(result.final_dir / "model.safetensors"))
    tokens = model.eval().forward_features(x)
    mean_of_heads = (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2
    assert torch.allclose(reloaded, mean_of_heads, atol=1e-5)


def test_plain_vit_student_distils_on_its_class_head(teacher, tmp_path):
    out = tmp_path / "vit"
    train(recipe(out, model="timm:vit_tiny_patch16_224", teacher=str(teacher), distillation="soft",
                 distill_temperature=2.0), ["train.max_steps=5"])
    logged = records(out, "loss_distill")
    assert len(logged) == 5 and all(np.isfinite(r["loss_distill"]) and r["loss_distill"] > 0 for r in logged)


# ---------------------------------------------------------------------------------------------- the tricks
def test_mixup_cutmix_make_soft_targets_and_train(tmp_path):
    task = build_task(recipe(tmp_path, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1))
    batch = first_batch(task)
    original = batch["pixel_values"].clone()
    np.random.seed(0)
    pixels, targets = task._augment(batch["pixel_values"], batch["labels"])
    assert torch.equal(batch["pixel_values"], original)  # timm mixes in place: the batch itself is left alone
    assert targets.shape == (32, 10) and torch.allclose(targets.sum(-1), torch.ones(32))
    assert not torch.equal(pixels, original)
    assert (targets.max(-1).values < 0.9 + 0.01 + 1e-6).all()  # smoothed, and mixed for lam < 1
    assert (targets > 0.01 + 1e-6).sum(-1).ge(1).all()
    result = train(recipe(tmp_path / "run", mixup_alpha=0.8, cutmix_alpha=1.0, mixup_switch_prob=0.5),
                   ["train.max_steps=8"])
    assert result.global_step == 8 and all(np.isfinite(r["loss"]) for r in records(tmp_path / "run", "loss"))


def test_rand_augment_runs_from_the_global_rngs(tmp_path):
    task = build_task(recipe(tmp_path, rand_augment="rand-m9-n3-mstd0.5-p1.0"))
    batch = first_batch(task)

    def draw():
        random.seed(3)
        np.random.seed(3)
        return task._augment(batch["pixel_values"], batch["labels"])[0]

    a, b = draw(), draw()
    assert a.shape == batch["pixel_values"].shape and a.dtype == batch["pixel_values"].dtype
    assert torch.equal(a, b) and not torch.equal(a, batch["pixel_values"])
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6


def test_drop_path_rate_reaches_the_timm_blocks(tmp_path):
    task = build_task(recipe(tmp_path, model_options={**DEIT["model_options"], "depth": 3, "drop_path_rate": 0.2}))
    blocks = task.models["model"].blocks
    assert isinstance(blocks[0].drop_path1, torch.nn.Identity)  # timm's linear rule: 0 in the first block
    assert [b.drop_path1.drop_prob for b in blocks[1:]] == pytest.approx([0.1, 0.2])


def test_resume_with_mixup_rand_augment_drop_path_and_teacher_is_exact(teacher, tmp_path):
    config = recipe(tmp_path, model_options={**DEIT["model_options"], "drop_path_rate": 0.1}, teacher=str(teacher),
                    distillation="soft", rand_augment="rand-m9-mstd0.5", mixup_alpha=0.8, cutmix_alpha=1.0)
    config["train"]["max_steps"] = 8
    config["checkpoint"] = {"every_steps": 4}
    config["eval"] = {"at_end": False}
    full, killed, _ = full_killed_resumed(config, tmp_path, kill_at=4)
    a, b = (load_file(run / "final" / "model.safetensors") for run in (full, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("options, message", [
    ({"distill_alpha": 1.5}, "'task_options.distill_alpha' must be in [0, 1], got 1.5"),
    ({"distill_temperature": 0}, "'task_options.distill_temperature' must be > 0"),
    ({"distillation": "medium"}, "'task_options.distillation' must be one of 'none', 'soft', 'hard', got 'medium'"),
    ({"rand_augment": "bogus"}, "task_options.rand_augment 'bogus': it must start with 'rand'"),
    ({"rand_augment": "rand-m9-q5"}, "task_options.rand_augment 'rand-m9-q5': unknown section 'q5'"),
    ({"rand_augment": "rand-n100000"}, "n (ops per image) must be <= 16"),
    ({"mixup_alpha": -1}, "'task_options.mixup_alpha' must be >= 0, got -1"),
    ({"cutmix_alpha": float("nan")}, "'task_options.cutmix_alpha' must be a finite number"),
    ({"mixup_prob": 2}, "'task_options.mixup_prob' must be in [0, 1]"),
    ({"distillation": "hard"}, "task_options.distillation='hard' needs task_options.teacher"),
    ({"teacher": "/no/such/folder", "distillation": "hard"}, "task_options.teacher '/no/such/folder' is not a folder"),
])
def test_bad_options_are_one_line_errors_naming_the_key(tmp_path, options, message):
    with pytest.raises(ConfigError) as err:
        load_config(recipe(tmp_path, **options))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_teacher_that_is_not_an_artifact_or_without_distillation_is_refused(teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"task_options.teacher .* is not an image-classification artifact"):
        load_config(recipe(tmp_path / "run", teacher=str(tmp_path), distillation="soft"))
    with pytest.raises(ConfigError, match="task_options.teacher is set but task_options.distillation is 'none'"):
        load_config(recipe(tmp_path / "run", teacher=str(teacher)))


@pytest.mark.parametrize("override", ["task_options.distill_alpha=1.5", "task_options.rand_augment=bogus",
                                      "task_options.mixup_alpha=.nan", "task_options.distillation=medium"])
def test_cli_bad_option_exits_with_one_line(tmp_path, capsys, override):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path / "run")))
    assert main(["train", str(path), override]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hfx train: error: ") and "\n" not in err and "Traceback" not in err
    assert override.split("=")[0] in err
    assert not (tmp_path / "run").exists()


def test_odd_batch_with_mixup_is_refused(tmp_path):
    config = recipe(tmp_path, mixup_alpha=0.8)
    config["train"]["batch_size"] = 31
    with pytest.raises(ConfigError, match="need an even train.batch_size"):
        train(config)
