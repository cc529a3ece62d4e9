"""The ``gan`` task: tiny GANs of every loss train with finite losses and the D loss falls; phases honour
``n_critic``; the evaluation's FID equals one recomputed from the saved pipeline; a SIGKILLed run with EMA resumes
bit-identically; every bad recipe is a one-line ConfigError naming the key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from kill_resume import assert_same_weights, full_killed_resumed

from hfx.trainers import ConfigError, Trainer, load_config, train

TINY = {
    "task": "gan", "seed": 0,
    "data": {"dataset": "digits", "options": {"image_size": 8}, "max_train_samples": 256, "max_eval_samples": 64},
    "task_options": {"generator": {"latent_dim": 8, "base_channels": 8}, "discriminator": {"base_channels": 8},
                     "grid_size": 2},
    "train": {"max_steps": 6, "batch_size": 16, "max_grad_norm": None},
    "optimizer": {"name": "adam", "lr": 2e-3, "betas": [0.5, 0.999]},
    "eval": {"every_steps": None},
    "log": {"every_steps": 1, "report_to": []},
}
STYLE = {"latent_dim": 8, "w_dim": 8, "base_channels": 8, "max_channels": 8}


def recipe(out: Path, options: dict | None = None, **sections) -> dict:
    config = {**TINY, **sections, "output_dir": str(out)}
    config["task_options"] = {**TINY["task_options"], **(options or {})}
    return config


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory) -> Path:
    """A (barely) trained digits classifier: what the evaluation needs is its features, not its accuracy."""
    out = tmp_path_factory.mktemp("evaluator")
    return train("classify-digits", [f"output_dir={out}", "train.max_steps=2", "train.batch_size=16",
                                     "data.options.image_size=8", "eval.every_steps=null", "eval.at_end=false",
                                     "checkpoint.every_steps=null", "log.report_to=[]"]).final_dir


VARIANTS = {
    "non_saturating": {},
    "lsgan": {"loss": "lsgan"},
    "hinge-sn-conditional": {"loss": "hinge", "conditional": True,
                             "discriminator": {"base_channels": 8, "norm": "none", "spectral_norm": True}},
    "wgan-clip": {"loss": "wgan", "weight_clip": 0.05, "discriminator": {"base_channels": 8, "norm": "none"}},
    "stylegan-r1-mixing": {"architecture": "stylegan", "generator": STYLE, "r1_gamma": 1.0, "style_mixing_prob": 0.5,
                           "discriminator": {"base_channels": 8, "norm": "layer"}},
}


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_trains_with_finite_losses_and_saves_a_pipeline(name, tmp_path):
    from hfx.pipelines import GANPipeline

    result = train(load_config(recipe(tmp_path, VARIANTS[name])))
    logged = [r for r in records(tmp_path) if "loss/discriminator" in r]
    assert len(logged) == 6 and all(math.isfinite(r["loss/discriminator"]) and math.isfinite(r["loss/generator"])
                                    for r in logged)
    assert {"d_loss", "g_loss", "d_real", "d_fake"} <= set(result.metrics)
    pipe = GANPipeline.from_pretrained(result.final_dir)
    conditional = VARIANTS[name].get("conditional", False)
    out = pipe(**({"class_labels": [0, 9]} if conditional else {"batch_size": 2}), output_type="pt").images
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    assert (pipe.num_classes == 10) == conditional
    if name == "wgan-clip":  # clamped before every use: the saved critic went through at most one step since
        assert max(float(p.detach().abs().max()) for p in pipe.discriminator.parameters()) <= 0.05 + 2e-3 * 2
    assert (tmp_path / "samples" / "step-0000006.png").is_file()  # the fixed-noise grid of the final evaluation
    mixing = tmp_path / "samples" / "style-mixing-step-0000006.png"
    assert mixing.is_file() == (name == "stylegan-r1-mixing")
    if mixing.is_file():  # the card shows it
        assert "images/style-mixing-step-0000006.png" in (result.final_dir / "README.md").read_text()


def test_the_style_mixing_grid_takes_coarse_layers_from_its_row_and_fine_layers_from_its_column():
    from hfx.models.gan import StyleGANGenerator
    from hfx.trainers.tasks.gan import style_mixing_grid

    torch.manual_seed(0)
    G = StyleGANGenerator(image_size=8, **STYLE).eval()
    with torch.no_grad():
        images, rows = style_mixing_grid(G, seed=3, cutoff=1, n=3)
        g = torch.Generator().manual_seed(3)
        z_a, z_b = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
        cell = G(z_a[1:2], mixing_latents=z_b[2:3], mixing_cutoff=1, noise_mode="const").sample.clamp(-1, 1)
        source_b = G(z_b[2:3], noise_mode="const").sample.clamp(-1, 1)
    grid = images.reshape(4, 4, *images.shape[1:])
    assert rows == 4 and torch.equal(grid[0, 0], -torch.ones_like(grid[0, 0]))
    assert torch.allclose(grid[2, 3], cell[0], atol=1e-6) and torch.allclose(grid[0, 3], source_b[0], atol=1e-6)
    assert not torch.allclose(grid[2, 3], grid[1, 3])  # another row, another coarse style


def test_the_discriminator_loss_falls_as_it_learns_to_tell_real_from_fake(tmp_path):
    train(load_config(recipe(tmp_path, train={**TINY["train"], "max_steps": 40})))
    losses = [r["loss/discriminator"] for r in records(tmp_path) if "loss/discriminator" in r]
    assert losses[0] == pytest.approx(2 * math.log(2), abs=0.05)  # a discriminator at chance: -2 log(1/2)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1


def test_phases_honour_n_critic_and_the_task_counts_what_each_side_saw(tmp_path):
    config = load_config(recipe(tmp_path, {"loss": "wgan", "n_critic": 3, "gradient_penalty": 10.0,
                                           "discriminator": {"base_channels": 8, "norm": "layer"}}))
    trainer = Trainer(config)
    trainer.fit()
    steps = {name: {int(s["step"]) for s in opt.state.values()} for name, opt in trainer.state.optimizers.items()}
    assert steps == {"discriminator": {6}, "generator": {2}}  # Adam's step count: 6 critic steps, 2 generator steps
    assert trainer.task.state_dict() == {"images_seen": {"discriminator": 6 * 16, "generator": 2 * 16}}
    logged = records(tmp_path)
    assert [r["step"] for r in logged if "loss/generator" in r] == [3, 6]
    assert all(r["gradient_penalty/discriminator"] >= 0 for r in logged if "loss/discriminator" in r)


def test_the_evaluation_scores_samples_in_the_evaluators_features(tmp_path, evaluator):
    """FID, KID, class histogram and conditional accuracy at every evaluation; the final FID equals one
    recomputed from the saved pipeline's samples (the same fixed noise) against the eval split."""
    from hfx.data import builtin_dataset
    from hfx.metrics import frechet_distance
    from hfx.metrics.classifier import TrainedImageClassifier
    from hfx.pipelines import GANPipeline

    options = {"conditional": True, "evaluator": str(evaluator), "eval_num_samples": 40}
    result = train(load_config(recipe(tmp_path, options, eval={"every_steps": 3}, ema={"enabled": True, "decay": 0.9})))
    evals = [r for r in records(tmp_path) if "eval/fid" in r]
    assert [r["step"] for r in evals] == [3, 6]
    metrics = result.metrics
    assert metrics["fid"] >= 0 and math.isfinite(metrics["kid"]) and 0 <= metrics["conditional_accuracy"] <= 1
    assert metrics["class_kl_to_uniform"] >= 0 and 1 <= metrics["classes_covered"] <= 10

    pipe = GANPipeline.from_pretrained(result.final_dir)
    labels = [i % 10 for i in range(40)]
    samples = pipe(class_labels=labels, generator=torch.Generator().manual_seed(40_000 - 1), output_type="pt").images
    classifier = TrainedImageClassifier(evaluator)
    features, logits = classifier.features_and_logits(samples * 2 - 1)
    test = builtin_dataset("digits", image_size=8)["test"].select(range(64))
    real = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).reshape(1, 8, 8) / 127.5 - 1
                        for im in test["image"]])
    assert metrics["fid"] == pytest.approx(frechet_distance(features, classifier.features_and_logits(real)[0]), rel=1e-3)
    assert metrics["conditional_accuracy"] == pytest.approx(float((logits.argmax(1) == torch.tensor(labels)).float().mean()))
    facts = json.loads((tmp_path / "results.json").read_text())["card_facts"]
    assert facts["method"] == "gan" and "projection discriminator" in facts["summary"] and "FID and KID" in facts["summary"]
    by_metric = {r["metric"]: r for r in facts["eval_results"]}
    assert by_metric["fid"]["num_samples"] == 40 and by_metric["d_loss"]["num_samples"] == 64  # samples vs eval split
    assert by_metric["fid"]["extractor"].startswith("penultimate features of the classifier at")
    card = (result.final_dir / "README.md").read_text()
    assert "pipe(class_labels=[0, 1, 2, 3]).images" in card and "GANPipeline" in card
    assert "| fid |" in card and "penultimate features of the classifier" in card


def test_a_sigkilled_run_with_ema_resumes_bit_identically(tmp_path):
    """StyleGAN-style G (per-layer noise, style mixing from the global RNG), spectrally normalised projection D,
    n_critic 2, EMA of G: killed with SIGKILL after a checkpoint, resumed, it ends where the uninterrupted run ends."""
    config = recipe(tmp_path / "run", {"architecture": "stylegan", "generator": STYLE, "conditional": True,
                                       "loss": "hinge", "n_critic": 2, "style_mixing_prob": 0.5,
                                       "discriminator": {"base_channels": 8, "norm": "none", "spectral_norm": True}},
                    train={**TINY["train"], "max_steps": 240}, ema={"enabled": True, "decay": 0.9},
                    eval={"every_steps": 60}, checkpoint={"every_steps": 20}, log={"every_steps": 7, "report_to": []})
    full, killed, _ = full_killed_resumed(config, tmp_path, kill_at=40)
    saved = assert_same_weights(full, killed, ["generator", "discriminator"])
    # the EMA generator's tracked mean w and spectral norm's power-iteration vectors came through too
    assert "w_avg" in saved["generator"] and any(k.endswith("_u") for k in saved["discriminator"])
    assert [r for r in records(full) if "eval/d_loss" in r] == [r for r in records(killed) if "eval/d_loss" in r]
    state = torch.load(killed / "checkpoint-240" / "task_state_0.pt", weights_only=True)
    assert state == {"images_seen": {"discriminator": 240 * 16, "generator": 120 * 16}}


BAD = [
    ({"loss": "hinje"}, "unknown task_options.loss 'hinje'; did you mean 'hinge'?"),
    ({"n_critic": 0}, "config key 'task_options.n_critic' must be >= 1, got 0"),
    ({"generator": {"num_classes": 10}}, "task_options.generator.num_classes cannot be set: class labels need "
                                         "task_options.conditional: true"),
    ({"discriminator": {"image_size": 16}}, "task_options.discriminator.image_size cannot be set"),
    ({"style_mixing_prob": 0.5}, "task_options.style_mixing_prob=0.5 needs task_options.architecture: stylegan"),
    ({"gradient_penalty": 10.0}, "task_options.discriminator.norm is 'batch', which couples the samples"),
    ({"architecture": "biggan"}, "config key 'task_options.architecture' must be one of 'dcgan', 'stylegan'"),
]
BAD_AT_BUILD = [
    ({"generator": {"latent_dim": 8, "base_chanels": 8}}, "task_options.generator does not make a DCGANGenerator: "),
    ({"discriminator": {"norm": "group"}}, "task_options.discriminator does not make a DCGANDiscriminator: norm must be"),
    ({"evaluator": "/nowhere"}, "task_options.evaluator '/nowhere' is not an image-classification artifact"),
]


@pytest.mark.parametrize("options, message", BAD)
def test_bad_recipes_are_one_line_config_errors_naming_the_key(options, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(recipe(tmp_path, options))
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("options, message", BAD_AT_BUILD)
def test_bad_model_options_fail_before_training_in_one_line(options, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        train(load_config(recipe(tmp_path, options)))
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("name", ["gan-digits", "cgan-digits", "wgan-gp-digits", "stylegan-digits"])
def test_the_shipped_recipes_load_and_validate(name, tmp_path):
    config = load_config(name, [f"output_dir={tmp_path}"])
    assert config.task == "gan" and config.ema.enabled and config.train.max_grad_norm is None
    assert config.task_options.conditional == (name == "cgan-digits")
