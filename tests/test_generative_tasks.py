"""The `diffusion`, `noisy-classifier` and `vae` tasks through the engine, and the demo end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hfx.trainers import load_config, train

TINY_UNET = {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": 4}



def records(run_dir: Path, key: str) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def diffusion_config(tmp_path: Path, *overrides: str):
    return load_config({
        "task": "diffusion", "output_dir": str(tmp_path),
        "data": {"dataset": "digits", "options": {"image_size": 8}, "max_eval_samples": 64},
        "task_options": {"unet": TINY_UNET, "grid_per_class": 1, "grid_steps": 2},
        "train": {"max_steps": 40, "batch_size": 32},
        "optimizer": {"lr": 3e-3},
        "ema": {"enabled": True, "decay": 0.9},
        "eval": {"every_steps": 20},
        "log": {"every_steps": 5, "report_to": ["tensorboard"]},
    }, list(overrides))


@pytest.mark.slow
def test_diffusion_task_trains_and_saves_a_guided_pipeline(tmp_path):
    from hfx.pipelines import ClassConditionalPipeline

    result = train(diffusion_config(tmp_path))
    losses = [r["loss"] for r in records(tmp_path, "loss")]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3  # epsilon MSE starts near 1
    evals = records(tmp_path, "eval/loss")
    assert len(evals) == 2 and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-0000020.png", "step-0000040.png"]

    pipe = ClassConditionalPipeline.from_pretrained(result.final_dir)
    assert pipe.class_names == [str(i) for i in range(10)]
    assert pipe.unet.config.num_class_embeds == 11 and pipe.unet.config.sample_size == 8
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    images = pipe(["3", 7], num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 8, 8)
    card = (Path(result.final_dir) / "README.md").read_text()
    assert "DiffusionPipeline.from_pretrained" in card and "images = pipe([0, 1, 2, 3]" in card


def test_diffusion_loss_uses_label_dropout_and_the_prediction_target(tmp_path):
    """The loss sees the null class for about `label_dropout` of the labels, and regresses on the noise
    (epsilon) or on the velocity (v_prediction) of the same draw."""
    from accelerate import Accelerator

    from hfx.trainers.tasks import get_task

    for prediction_type in ("epsilon", "v_prediction"):
        config = diffusion_config(tmp_path, f"task_options.prediction_type={prediction_type}",
                                  "task_options.label_dropout=0.25")
        task = get_task("diffusion")(config, Accelerator(cpu=True))
        task.build_data()
        task.build_models()
        class Recorder(torch.nn.Module):
            """Stands in for the UNet: records what it was called with and predicts zeros."""

            seen: dict = {}

            def forward(self, x_t, t, class_labels):
                self.seen.update(x_t=x_t, t=t, labels=class_labels)
                return type("Out", (), {"sample": torch.zeros_like(x_t)})()

        x0 = torch.rand(4000, 1, 8, 8) * 2 - 1
        batch = {"pixel_values": x0, "labels": torch.randint(0, 10, (4000,))}
        torch.manual_seed(0)
        recorder = Recorder()
        loss = task.loss({"unet": recorder}, batch, "main")
        seen = recorder.seen
        null_share = (seen["labels"] == 10).float().mean().item()
        assert 0.22 < null_share < 0.28
        # Replay the same draws: the loss against a zero prediction is the mean square of the target.
        torch.manual_seed(0)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (4000,))
        target = noise if prediction_type == "epsilon" else task.scheduler.get_velocity(x0, noise, t)
        torch.testing.assert_close(seen["t"], t)
        torch.testing.assert_close(loss, target.pow(2).mean(), rtol=1e-5, atol=1e-6)


def test_diffusion_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match=r"task_options.label_dropout. must be in \[0, 1\), got 1.0"):
        train(diffusion_config(tmp_path, "task_options.label_dropout=1.0"))
    with pytest.raises(ValueError, match="unet does not make a UNet2DModel"):
        train(diffusion_config(tmp_path, "task_options.unet={no_such_argument: 1}"))


@pytest.mark.slow
def test_noisy_classifier_learns_on_the_pipelines_schedule(tmp_path):
    from hfx.models.noisy_classifier import NoisyClassifier

    pipe_run = train(diffusion_config(tmp_path / "pipe", "train.max_steps=2", "eval.every_steps=null",
                                      "task_options.beta_schedule=linear"))
    config = load_config({
        "task": "noisy-classifier", "output_dir": str(tmp_path / "clf"),
        "data": {"dataset": "digits", "options": {"image_size": 8}, "max_eval_samples": 200},
        "task_options": {"diffusion_pipeline": str(pipe_run.final_dir),
                         "classifier": {"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D"] * 2,
                                        "norm_num_groups": 4}},
        "train": {"max_steps": 100, "batch_size": 64}, "optimizer": {"lr": 3e-3},
        "log": {"report_to": []},
    })
    result = train(config)
    assert result.metrics["accuracy_low_noise"] > 0.35  # chance is 0.1
    assert result.metrics["accuracy_low_noise"] > result.metrics["accuracy_high_noise"]
    classifier = NoisyClassifier.from_pretrained(result.final_dir)
    assert classifier.config.num_classes == 10


def vae_config(tmp_path: Path, *overrides: str):
    return load_config({
        "task": "vae", "output_dir": str(tmp_path),
        "data": {"dataset": "digits", "options": {"image_size": 8}, "max_eval_samples": 128},
        "task_options": {"model": {"block_out_channels": [16, 32], "latent_channels": 2, "norm_num_groups": 8,
                                   "gaussian_std": 0.3},
                         "kl_warmup_steps": 20, "grid_size": 4},
        "train": {"max_steps": 40, "batch_size": 64}, "optimizer": {"lr": 3e-3},
        "eval": {"every_steps": 20},
        "log": {"every_steps": 1, "report_to": []},
    }, list(overrides))


@pytest.mark.slow
def test_vae_task_warms_up_kl_and_saves_a_scaled_automodel(tmp_path):
    from transformers import AutoModel

    from hfx.models.vae import HfxVAEModel
    from hfx.trainers.tasks._image_tasks import build_image_data

    result = train(vae_config(tmp_path, "task_options.conditional=true"))
    logged = records(tmp_path, "loss")
    for r in logged:  # loss = reconstruction + beta * min(1, step_before / warmup) * KL
        weight = min(1.0, (r["step"] - 1) / 20)
        assert r["loss"] == pytest.approx(r["reconstruction"] + weight * r["kl"], rel=1e-4)
    evals = records(tmp_path, "eval/neg_elbo")
    assert evals[-1]["eval/neg_elbo"] < evals[0]["eval/neg_elbo"]
    assert {"reconstructions-step-0000040.png", "samples-step-0000040.png"} <= {p.name for p in (tmp_path / "samples").iterdir()}

    model = AutoModel.from_pretrained(result.final_dir)
    assert isinstance(model, HfxVAEModel) and model.config.num_classes == 10
    # scaling_factor is 1 / std of posterior samples of the training images (not of the narrower means)
    from hfx.trainers.tasks import get_task

    task = get_task("vae")(vae_config(tmp_path / "again"), None)
    data, _ = build_image_data(task, image_size=8)
    first = [data.train[i] for i in range(1024)]
    pixels = torch.stack([row["pixel_values"] for row in first])
    labels = torch.stack([row["labels"] for row in first])
    with torch.no_grad():
        dist = model.encode(pixels, labels).latent_dist
        samples = dist.sample(torch.Generator().manual_seed(1))
    assert model.config.scaling_factor == pytest.approx(1 / samples.std().item(), rel=0.03)
    assert model.config.scaling_factor < 0.97 / dist.mean.std().item()


def test_vae_rejects_bad_model_options(tmp_path):
    with pytest.raises(ValueError, match="reconstruction_loss"):
        train(vae_config(tmp_path, "task_options.model.reconstruction_loss=l1"))
    with pytest.raises(ValueError, match="set task_options.conditional: true"):
        train(vae_config(tmp_path, "task_options.evaluator=/nowhere"))


@pytest.mark.slow
def test_demo_end_to_end_on_tiny_settings(tmp_path):
    """The main job's plumbing: both trainings, every guidance setting scored, files written, the card
    carries the numbers, and the pipeline reloads. (Quality is measured by the real `make demo`.)"""
    from huggingface_hub import ModelCard

    from hfx.demo import GUIDANCE_SCALES, TAMED_SCALES, TAMING, run_demo
    from hfx.pipelines import ClassConditionalPipeline

    tiny = ["train.max_steps=3", "eval.every_steps=null", "checkpoint.every_steps=null", "log.report_to=[]"]
    result = run_demo(tmp_path, per_class=2, num_inference_steps=2, batch_size=8,
                      diffusion_overrides=[*tiny, "task_options.unet={block_out_channels: [8, 16, 16], norm_num_groups: 4}",
                                           "task_options.grid_per_class=0"],
                      evaluator_overrides=tiny)
    for name in ("samples.png", "guidance.png", "results.json", "pipeline/model_index.json"):
        assert (tmp_path / name).is_file(), name
    settings = {(s.guidance_scale, s.variant) for s in result.scores}
    assert {(g, "cfg") for g in GUIDANCE_SCALES} <= settings
    assert {(g, name) for g in TAMED_SCALES for name, _, _ in TAMING} <= settings
    assert all(s.n == 20 and 0 <= s.conditional_accuracy <= 1 and s.fid >= 0 for s in result.scores)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["n_generated"] == 20 and saved["extractor"]["weights"].startswith("sha256:")
    card = ModelCard.load(tmp_path / "pipeline" / "README.md")
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy", "fid"}
    assert "Measured by `hfx demo`" in card.text
    ClassConditionalPipeline.from_pretrained(tmp_path / "pipeline")


@pytest.mark.slow
def test_latent_diffusion_on_a_trained_vae(tmp_path):
    """`latent_vae` trains the UNet on the VAE's latents and saves a LatentDiffusionPipeline that decodes
    them to images; the pipeline reloads with identical samples."""
    from diffusers import DDIMScheduler

    from hfx.pipelines import LatentDiffusionPipeline

    vae_run = train(vae_config(tmp_path / "vae", "train.max_steps=5", "eval.every_steps=null"))
    evaluator = train("classify-digits", [f"output_dir={tmp_path / 'evaluator'}", "train.max_steps=150",
                                          "eval.every_steps=null", "checkpoint.every_steps=null", "log.report_to=[]"])
    run = train(diffusion_config(tmp_path / "ldm", f"task_options.latent_vae={vae_run.final_dir}", "train.max_steps=5",
                                 "eval.every_steps=5", f"task_options.evaluator={evaluator.final_dir}",
                                 "task_options.evaluator_samples_per_class=3"))
    pipe = LatentDiffusionPipeline.from_pretrained(run.final_dir)
    # sample_accuracy is the evaluator's accuracy on the saved pipeline's samples (same seed and steps)
    from hfx.metrics.classifier import TrainedImageClassifier

    labels = torch.arange(10).repeat_interleave(3)
    samples = pipe(labels.tolist(), num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images * 2 - 1  # grid_steps of diffusion_config
    logits = TrainedImageClassifier(evaluator.final_dir).features_and_logits(samples)[1]
    assert run.metrics["sample_accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))

    # the scorer itself: real test digits of the asked class score high, of the next class low
    from hfx.data import builtin_dataset
    from hfx.metrics.classifier import ClassSampleScorer

    test = builtin_dataset("digits", image_size=8)["test"]
    pixels = torch.stack([torch.tensor(list(im.getdata()), dtype=torch.float32).reshape(1, 8, 8) / 127.5 - 1
                          for im in test["image"]])
    by_class = {c: pixels[torch.tensor(list(test["label"])) == c][:3] for c in range(10)}
    scorer = ClassSampleScorer(evaluator.final_dir, num_classes=10, per_class=3)
    def digits_of(shift):
        return lambda asked: torch.cat([by_class[(int(c) + shift) % 10][k % 3:k % 3 + 1] for k, c in enumerate(asked)])

    assert scorer(digits_of(0), "cpu") >= 0.7  # the asked class
    assert scorer(digits_of(1), "cpu") <= 0.3  # the next class
    assert pipe.unet.config.in_channels == 2 and pipe.unet.config.sample_size == 4  # 8x8 images, factor 2
    assert pipe.vae.config.scaling_factor == pytest.approx(
        json.loads((Path(vae_run.final_dir) / "config.json").read_text())["scaling_factor"])
    images = pipe([0, 9], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 8, 8)
    # latents are scaled to unit variance, not to [-1, 1]: the saved scheduler must not clip x_0 to that range
    assert pipe.scheduler.config.clip_sample is False
    with pytest.raises(ValueError, match="clip_sample=True"):
        LatentDiffusionPipeline(pipe.vae, pipe.unet, DDIMScheduler())
    again = LatentDiffusionPipeline.from_pretrained(run.final_dir)
    torch.testing.assert_close(
        again([0, 9], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images,
        images, rtol=0, atol=0)
    with pytest.raises(ValueError, match="conditional VAE"):
        cvae = train(vae_config(tmp_path / "cvae", "task_options.conditional=true", "train.max_steps=1",
                                "eval.every_steps=null", "eval.at_end=false"))
        train(diffusion_config(tmp_path / "bad", f"task_options.latent_vae={cvae.final_dir}"))
