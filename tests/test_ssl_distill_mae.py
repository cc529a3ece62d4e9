"""The ``dino`` and ``mae`` tasks: tiny runs that learn, a SIGKILLed DINO run that resumes bit-identically (student,
teacher and center), the teacher's momentum schedule, the [CLS]-attention figure, the saved backbones loading in a
process where hfx cannot be imported (plain timm / transformers) with the same features, and bad options as
one-line errors naming the key."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from kill_resume import BLOCK_HFX, full_killed_resumed
from safetensors.torch import load_file

from hfx.trainers import ConfigError, load_config, train
from hfx.trainers.tasks.dino import TeacherUpdate, teacher_momentum_at, teacher_temperature_at

DATA = {"dataset": "digits", "options": {"image_size": 16}, "max_train_samples": 96, "max_eval_samples": 40}
DINO = {
    "task": "dino", "seed": 0, "data": DATA,
    "task_options": {"backbone": "timm:vit_tiny_patch16_224",
                     "backbone_options": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2},
                     "out_dim": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "local_crops": 2,
                     "warmup_teacher_temperature": 0.02, "warmup_teacher_temperature_steps": 4,
                     "freeze_last_layer_steps": 2, "attention_grid": 2, "eval_batch_size": 64},
    "train": {"max_steps": 12, "batch_size": 16, "max_grad_norm": 3.0},
    "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.04},
    "eval": {"every_steps": None},
    "checkpoint": {"every_steps": None},
    "log": {"every_steps": 1, "report_to": []},
}
MAE = {
    "task": "mae", "seed": 0, "data": DATA,
    "task_options": {"model": {"patch_size": 4, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 64, "decoder_hidden_size": 32, "decoder_num_hidden_layers": 1,
                               "decoder_num_attention_heads": 2, "decoder_intermediate_size": 64},
                     "reconstruction_grid": 3, "eval_batch_size": 64},
    "train": {"max_steps": 40, "batch_size": 16},
    "optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.05},
    "eval": {"every_steps": None},
    "checkpoint": {"every_steps": None},
    "log": {"every_steps": 1, "report_to": []},
}

#: argv: timm|transformers, the artifact, an input tensor file, the output file. Loads the artifact where importing
#: hfx fails, as a user without hfx would, and saves its features on the input.
NO_HFX_FEATURES = BLOCK_HFX + """import torch
kind, folder, inputs, output = sys.argv[1:]
x = torch.load(inputs, weights_only=True)
with torch.no_grad():
    if kind == "timm":
        import timm
        model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
        features = model(x)
    else:
        from transformers import AutoModel
        model = AutoModel.from_pretrained(folder).eval()
        features = model(pixel_values=x).last_hidden_state
torch.save({"type": type(model).__name__, "features": features}, output)
"""


def recipe(base: dict, out: Path, options: dict | None = None, **sections) -> dict:
    config = {**base, **sections, "output_dir": str(out)}
    config["task_options"] = {**base["task_options"], **(options or {})}
    return config


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def features_without_hfx(kind: str, folder: Path, x: torch.Tensor, tmp_path: Path) -> dict:
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-c", NO_HFX_FEATURES, kind, str(folder), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "y.pt", weights_only=True)


def tiny_images() -> torch.Tensor:
    return torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ---------------------------------------------------------------------------------------------- schedules
def test_the_teacher_momentum_follows_dinos_cosine_schedule_and_the_update_uses_it():
    assert teacher_momentum_at(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert teacher_momentum_at(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    for step in (0, 7, 33, 99):  # facebookresearch/dino's cosine_scheduler(0.996, 1, ...)[step]
        assert teacher_momentum_at(step, 100, 0.996, 1.0) == pytest.approx(
            1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * step / 100)), abs=1e-15)
    # np.linspace(0.02, 0.04, 4) during the warm-up, then the final temperature
    assert [teacher_temperature_at(s, 0.02, 0.04, 4) for s in range(6)] == pytest.approx(
        [0.02, 0.02 + 0.02 / 3, 0.02 + 0.04 / 3, 0.04, 0.04, 0.04])

    class Task:
        def momentum(self, step, max_steps):
            return teacher_momentum_at(step, max_steps, 0.9, 1.0)

    class State:
        global_step, max_steps = 3, 10  # the update after the third step (0-based 2)

    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    State.models = {"student": student, "teacher": teacher}
    before = [p.detach().clone() for p in teacher.parameters()]
    TeacherUpdate(Task()).on_step_end(State, None)
    m = teacher_momentum_at(2, 10, 0.9, 1.0)
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(new, m * old + (1 - m) * s, atol=1e-7)


# ---------------------------------------------------------------------------------------------- dino
def test_dino_learns_logs_its_schedules_writes_the_attention_figure_and_saves_a_plain_timm_backbone(tmp_path):
    out = tmp_path / "run"
    result = train(recipe(DINO, out, eval={"every_steps": None, "at_end": True}))
    logged = [r for r in records(out) if "loss" in r]
    assert len(logged) == 12
    # the loss is the targets' entropy plus KL(target || student): the student's part falls
    assert logged[-1]["kl_divergence"] < logged[0]["kl_divergence"]
    for r in logged:
        step = r["step"] - 1  # the record of step n is the loss of the n-th batch (0-based n - 1)
        assert r["teacher_momentum"] == pytest.approx(teacher_momentum_at(step, 12), rel=1e-6)
        assert r["teacher_temperature"] == pytest.approx(teacher_temperature_at(step, 0.02, 0.04, 4), rel=1e-6)
    for key in ("knn_accuracy", "linear_probe_accuracy", "knn_accuracy_10_per_class", "feature_std", "collapsed"):
        assert key in result.metrics
    figure = PIL.Image.open(out / "samples" / "attention-step-0000012.png")
    assert figure.size == ((1 + 2) * 64, 2 * 64)  # one row per image: the image, then each of the 2 heads
    assert "images/attention-step" in (out / "final" / "README.md").read_text() or any(
        "attention" in p.name for p in (out / "final" / "images").iterdir())

    # the artifact is the TEACHER's backbone (the checkpointed teacher = the final one), loadable without hfx
    import timm

    teacher = load_file(out / "final" / "model.safetensors")
    args = json.loads((out / "final" / "config.json").read_text())
    assert args["num_features"] == 32 and "head.mlp.0.weight" not in teacher
    x = tiny_images()
    plain = features_without_hfx("timm", out / "final", x, tmp_path)
    reference = timm.create_model("vit_tiny_patch16_224", in_chans=1, num_classes=0, img_size=16, dynamic_img_size=True,
                                  patch_size=4, embed_dim=32, depth=1, num_heads=2)
    reference.load_state_dict(teacher)
    with torch.no_grad():
        assert torch.equal(plain["features"], reference.eval()(x))
    assert plain["type"] == "VisionTransformer" and plain["features"].shape == (3, 32)


def test_dino_trains_a_resnet_backbone_with_multi_crop_and_skips_the_attention_figure(tmp_path, caplog):
    out = tmp_path / "run"
    options = {"backbone": "timm:resnet10t", "backbone_options": {"channels": [8, 16, 32, 64], "stem_width": 8},
               "local_crop_size": 8}
    with caplog.at_level("INFO", logger="hfx.trainers.tasks.dino"):
        result = train(recipe(DINO, out, options, train={**DINO["train"], "max_steps": 4},
                              eval={"every_steps": 2, "at_end": True}))
    assert math.isfinite(result.metrics["knn_accuracy"]) and "feature_std" in result.metrics
    assert not list(out.glob("samples/attention-*"))
    said = [r for r in caplog.records if "no attention figure" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "INFO"  # said once, not an error or a warning per evaluation
    assert json.loads((out / "final" / "config.json").read_text())["architecture"] == "resnet10t"


def test_a_sigkilled_dino_run_resumes_bit_identically_with_its_teacher_and_center(tmp_path):
    config = recipe(DINO, tmp_path / "run", {"attention_grid": 0}, train={**DINO["train"], "max_steps": 10},
                    checkpoint={"every_steps": 5})
    full, killed, _ = full_killed_resumed(config, tmp_path, kill_at=5)
    for name in ("model.safetensors", "model_1.safetensors"):  # the student and the teacher (in no optimizer)
        a, b = load_file(full / "checkpoint-10" / name), load_file(killed / "checkpoint-10" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    teacher = load_file(full / "checkpoint-10" / "model_1.safetensors")
    student = load_file(full / "checkpoint-10" / "model.safetensors")
    assert "head.last_layer" in teacher and not torch.equal(teacher["head.last_layer"], student["head.last_layer"])
    a, b = (torch.load(run / "checkpoint-10" / "task_state_0.pt", weights_only=True)["center"] for run in (full, killed))
    assert a.shape == (1, 64) and a.abs().sum() > 0 and torch.equal(a, b)
    a, b = load_file(full / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in records(run) if "loss" in r] for run in (full, killed)]
    assert losses[0] == losses[1] and len(losses[0]) == 10


# ---------------------------------------------------------------------------------------------- mae
def test_mae_learns_writes_reconstructions_and_saves_a_plain_vit_model_with_the_unmasked_features(tmp_path):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    out = tmp_path / "run"
    result = train(recipe(MAE, out, eval={"every_steps": None, "at_end": True},
                          checkpoint={"every_steps": 40}))
    losses = [r["loss"] for r in records(out) if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    for key in ("knn_accuracy", "linear_probe_accuracy_10_per_class", "feature_std", "reconstruction_loss"):
        assert key in result.metrics
    grid = PIL.Image.open(out / "samples" / "reconstructions-step-0000040.png")
    assert grid.size == (3 * 16 * 4, 3 * 16 * 4)  # 3 images x (image, masked, reconstruction), upscaled 4x

    # the saved ViTModel gives, without hfx, the MAE encoder's features on every patch in order
    x = tiny_images()
    plain = features_without_hfx("transformers", out / "final", x, tmp_path)
    assert plain["type"] == "ViTModel" and plain["features"].shape == (3, 17, 32)
    mae = ViTMAEForPreTraining(ViTMAEConfig(**MAE["task_options"]["model"], image_size=16, num_channels=1,
                                            mask_ratio=0.0)).eval()
    mae.load_state_dict(load_file(out / "checkpoint-40" / "model.safetensors"))
    with torch.no_grad():
        encoder = mae.vit(pixel_values=x, noise=torch.arange(16.0).expand(3, -1)).last_hidden_state
    assert torch.equal(plain["features"], encoder)
    processor = json.loads((out / "final" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5] and processor["size"] == {"height": 16, "width": 16}


def test_mae_has_its_fixed_sin_cos_position_embeddings_in_the_encoder_and_the_decoder():
    """transformers 5 leaves both tables at zero; without them the decoder cannot tell the masked patches apart."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from hfx.trainers.tasks.mae import restore_position_embeddings, sincos_position_embeddings

    model = ViTMAEForPreTraining(ViTMAEConfig(**MAE["task_options"]["model"], image_size=16, num_channels=1))
    restore_position_embeddings(model)
    encoder, decoder = model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed
    assert encoder.shape == decoder.shape == (1, 17, 32) and not encoder.requires_grad
    assert torch.equal(encoder, sincos_position_embeddings(4, 32)) and torch.equal(decoder, encoder)
    assert torch.equal(encoder[0, 0], torch.zeros(32)) and len({tuple(row.tolist()) for row in encoder[0, 1:]}) == 16
    try:  # transformers' own table (5.x), in its checkpoints' layout
        from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding
    except ImportError:
        return
    table = build_2d_sinusoidal_position_embedding(height=4, width=4, embed_dim=32, cls_token=True)
    assert torch.allclose(encoder[0], torch.cat([table[..., 16:], table[..., :16]], -1), atol=1e-6)


def test_mae_masks_from_the_global_rng_so_a_resumed_run_masks_the_same_patches():
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    model = ViTMAEForPreTraining(ViTMAEConfig(**MAE["task_options"]["model"], image_size=16, num_channels=1))
    x = tiny_images()
    masks = []
    for _ in range(2):
        torch.manual_seed(3)
        masks.append(model(pixel_values=x).mask)
    assert torch.equal(*masks) and masks[0].sum(1).tolist() == [12.0] * 3  # 75 % of 16 patches


# ---------------------------------------------------------------------------------------------- bad options
BAD = [
    (DINO, ["task_options.teacher_temperature=.nan"], "config key 'task_options.teacher_temperature' must be a finite"),
    (DINO, ["task_options.student_temperature=-0.1"], "config key 'task_options.student_temperature' must be > 0"),
    (DINO, ["task_options.local_crops=-2"], "config key 'task_options.local_crops' must be >= 0, got -2"),
    (DINO, ["task_options.teacher_momentum=1.5"], "config key 'task_options.teacher_momentum' must be in [0, 1]"),
    (DINO, ["task_options.teacher_momentum=-0.1"], "config key 'task_options.teacher_momentum' must be in [0, 1]"),
    (DINO, ["task_options.center_momentum=.nan"], "config key 'task_options.center_momentum' must be a finite"),
    (DINO, ["task_options.local_crop_scale=[0.5,0.1]"], "config key 'task_options.local_crop_scale' must be (low, high)"),
    (DINO, ["task_options.global_crop_scale=[0,1]"], "config key 'task_options.global_crop_scale' must be in (0, 1]"),
    (MAE, ["task_options.mask_ratio=1.5"], "config key 'task_options.mask_ratio' must be in [0, 1)"),
    (MAE, ["task_options.mask_ratio=1.0"], "config key 'task_options.mask_ratio' must be in [0, 1)"),
    (MAE, ["task_options.model.image_size=32"], "task_options.model.image_size cannot be set: it comes from"),
    (MAE, ["task_options.model.hiden_size=8"], "unknown key 'task_options.model.hiden_size' (a ViTMAEConfig field); "
                                               "did you mean 'hidden_size'?"),
    (MAE, ["task_options.pooling=max"], "task_options.pooling"),
]


@pytest.mark.parametrize("base, overrides, message", BAD)
def test_bad_options_are_one_line_config_errors_naming_the_key(base, overrides, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(recipe(base, tmp_path), overrides)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


BAD_AT_BUILD = [
    (MAE, {"model": {**MAE["task_options"]["model"], "patch_size": 3}}, "task_options.model.patch_size 3 must be"),
    (MAE, {"model": {**MAE["task_options"]["model"], "patch_size": 8}, "mask_ratio": 0.9},
     "task_options.mask_ratio 0.9 leaves the encoder no patch"),
    (DINO, {"backbone": "timm:vit_tiny_patch16_22"}, "task_options.backbone 'timm:vit_tiny_patch16_22': timm has no"),
]


@pytest.mark.parametrize("base, options, message", BAD_AT_BUILD)
def test_bad_models_fail_before_training_in_one_line(base, options, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        train(load_config(recipe(base, tmp_path, options)))
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("name", ["dino-digits", "dino-vit-digits", "mae-digits"])
def test_the_shipped_recipes_load_and_validate(name, tmp_path):
    config = load_config(name, [f"output_dir={tmp_path}"])
    assert config.data.dataset == "digits" and config.data.options == {"image_size": 16}
