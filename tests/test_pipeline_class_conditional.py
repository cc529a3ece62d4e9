"""ClassConditionalPipeline: guidance against independent reference loops, classifier guidance, bad input,
save/load in a fresh process, Hub repo ids, scheduler swaps, and the ``hfx sample`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
)
from diffusers.models.unets.unet_2d import UNet2DOutput
from PIL import Image

from hfx.cli import main
from hfx.models.noisy_classifier import NoisyClassifier
from hfx.pipelines import ClassConditionalPipeline, scheduler_from_name

NUM_CLASSES = 10
NULL = NUM_CLASSES
NAMES = [f"digit-{i}" for i in range(NUM_CLASSES)]



def tiny_unet(seed: int = 0, cls=UNet2DModel) -> UNet2DModel:
    torch.manual_seed(seed)
    return cls(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8, attention_head_dim=8, num_class_embeds=NUM_CLASSES + 1,
    ).eval()


def tiny_classifier(seed: int = 1) -> NoisyClassifier:
    torch.manual_seed(seed)
    return NoisyClassifier(sample_size=8, num_classes=NUM_CLASSES, block_out_channels=(16, 32),
                           down_block_types=("DownBlock2D", "DownBlock2D")).eval()


def make_pipe(scheduler=None, classifier=None, **config) -> ClassConditionalPipeline:
    scheduler = scheduler or DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    pipe = ClassConditionalPipeline(tiny_unet(), scheduler, classifier=classifier, class_names=NAMES, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def reference_sample(unet, scheduler, labels, guidance_scale, steps, seed, guidance_rescale=0.0):
    """Sampling written out independently: two separate UNet calls per step for guidance."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(labels)
    x = torch.randn((len(labels), 1, 8, 8), generator=generator)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        if guidance_scale == 0:
            out = unet(x, t, class_labels=torch.full_like(labels, NULL)).sample
        else:
            cond = unet(x, t, class_labels=labels).sample
            out = cond
            if guidance_scale != 1:
                uncond = unet(x, t, class_labels=torch.full_like(labels, NULL)).sample
                out = uncond + guidance_scale * (cond - uncond)
                if guidance_rescale:
                    rescaled = out * cond.std(dim=(1, 2, 3), keepdim=True) / out.std(dim=(1, 2, 3), keepdim=True)
                    out = guidance_rescale * rescaled + (1 - guidance_rescale) * out
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def sample(pipe, labels, seed=0, steps=6, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe(labels, num_inference_steps=steps, generator=generator, output_type="pt", **kwargs).images


# ---------------------------------------------------------------------------------- classifier-free guidance
@pytest.mark.parametrize("guidance_scale", [0.0, 1.0])
def test_guidance_zero_and_one_are_the_unconditional_and_conditional_model(guidance_scale):
    pipe = make_pipe()
    labels = [3, 7, 0, 9]
    images = sample(pipe, labels, guidance_scale=guidance_scale)
    expected = reference_sample(pipe.unet, pipe.scheduler, labels, guidance_scale, steps=6, seed=0)
    assert torch.equal(images, expected)


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_batched_cfg_equals_two_pass_formula(guidance_rescale):
    pipe = make_pipe()
    labels = [1, 4, 4, 8]
    images = sample(pipe, labels, guidance_scale=3.0, guidance_rescale=guidance_rescale)
    expected = reference_sample(pipe.unet, pipe.scheduler, labels, 3.0, steps=6, seed=0,
                                guidance_rescale=guidance_rescale)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    # Guidance does something: the unguided conditional samples differ.
    assert (images - sample(pipe, labels, guidance_scale=1.0)).abs().max() > 1e-3


def test_cfg_uses_one_batched_unet_call_per_step():
    pipe = make_pipe()
    batch_sizes = []
    pipe.unet.register_forward_hook(lambda module, args, output: batch_sizes.append(args[0].shape[0]))
    sample(pipe, [2, 5, 6], guidance_scale=2.5, steps=4)
    assert batch_sizes == [6] * 4


def test_class_names_equal_ids_and_default_guidance_comes_from_config():
    pipe = make_pipe(default_guidance_scale=4.0)
    by_name = sample(pipe, ["digit-3", "digit-7"])
    by_id = sample(pipe, torch.tensor([3, 7]), guidance_scale=4.0)
    assert torch.equal(by_name, by_id)
    assert torch.equal(sample(pipe, np.array([3, 7]), guidance_scale=4.0), by_id)  # e.g. labels from a dataset
    assert not torch.equal(by_name, sample(pipe, [3, 7], guidance_scale=2.0))


def test_output_types_and_reproducibility():
    pipe = make_pipe()
    pt = sample(pipe, [1, 2], seed=5)
    assert pt.shape == (2, 1, 8, 8) and 0 <= pt.min() and pt.max() <= 1
    np_images = pipe([1, 2], num_inference_steps=6, generator=torch.Generator().manual_seed(5), output_type="np").images
    assert np_images.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy())
    pil = pipe([1, 2], num_inference_steps=6, generator=torch.Generator().manual_seed(5)).images
    assert [im.size for im in pil] == [(8, 8)] * 2
    assert torch.equal(sample(pipe, [1, 2], seed=5), pt)
    assert not torch.equal(sample(pipe, [1, 2], seed=6), pt)


@pytest.mark.parametrize("name, cls", [("ddim", DDIMScheduler), ("dpm++", DPMSolverMultistepScheduler)])
def test_schedulers_swap_in_from_config(name, cls):
    pipe = make_pipe()
    ddpm_images = sample(pipe, [3, 3], guidance_scale=2.0)
    pipe.scheduler = scheduler_from_name(name, pipe.scheduler.config)
    assert isinstance(pipe.scheduler, cls)
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    images = sample(pipe, [3, 3], guidance_scale=2.0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    assert torch.equal(images, sample(pipe, [3, 3], guidance_scale=2.0))
    assert not torch.allclose(images, ddpm_images)


def test_dynamic_thresholding_bounds_saturation_at_high_guidance():
    # DDIM's last step (final alpha_bar = 1) returns the predicted x_0 itself, so the output shows the
    # thresholding directly: at most the top (1 - ratio) share of |x_0| can reach the extremes.
    pipe = make_pipe(scheduler=DDIMScheduler(num_train_timesteps=100))
    with torch.no_grad():  # an over-confident denoiser, as high guidance makes one: |x_0| predictions >> 1
        pipe.unet.conv_out.weight.mul_(30)
    labels = list(range(NUM_CLASSES))

    def saturated(images):
        return ((images <= 1e-6) | (images >= 1 - 1e-6)).flatten(1).float().mean(dim=1)

    clipped = sample(pipe, labels, guidance_scale=8.0)
    thresholded = sample(pipe, labels, guidance_scale=8.0, dynamic_thresholding_ratio=0.9)
    assert saturated(clipped).mean() > 0.3
    assert saturated(thresholded).max() <= 8 / 64
    assert pipe.scheduler.config.thresholding is False  # the pipeline's own scheduler is left alone


# ---------------------------------------------------------------------------------- classifier guidance
class ReparametrisedUNet(UNet2DModel):
    """Predicts v or x_0 by converting the epsilon of the same weights: exactly the same denoiser."""

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        eps = super().forward(sample, timestep, class_labels=class_labels).sample
        alpha_bar = self.alphas_cumprod[timestep]
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if self.target == "v_prediction":
            return UNet2DOutput(sample=(eps - sigma * sample) / alpha)
        return UNet2DOutput(sample=(sample - sigma * eps) / alpha)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_classifier_guidance_is_the_same_for_epsilon_v_and_sample_prediction(prediction_type):
    scheduler = DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    eps_pipe = make_pipe(scheduler=scheduler, classifier=tiny_classifier())
    other_unet = tiny_unet(cls=ReparametrisedUNet)
    other_unet.alphas_cumprod, other_unet.target = scheduler.alphas_cumprod, prediction_type
    other_pipe = ClassConditionalPipeline(
        other_unet, DDIMScheduler.from_config(scheduler.config, prediction_type=prediction_type),
        classifier=eps_pipe.classifier,
    )
    other_pipe.set_progress_bar_config(disable=True)
    labels = [0, 5, 9]
    guided = sample(eps_pipe, labels, guidance_scale=2.0, classifier_scale=20.0)
    assert (guided - sample(eps_pipe, labels, guidance_scale=2.0)).abs().max() > 1e-2
    torch.testing.assert_close(sample(other_pipe, labels, guidance_scale=2.0, classifier_scale=20.0), guided,
                               atol=2e-4, rtol=0)


@pytest.fixture(scope="module")
def trained_digits_models():
    """A tiny unconditional UNet and a noise-aware classifier, briefly trained on 8x8 digits, and an
    independent judge: a logistic regression on the clean digits."""
    from sklearn.linear_model import LogisticRegression

    from hfx.data import builtin_dataset

    digits = builtin_dataset("digits", image_size=8)
    x = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in digits["train"]["image"]]) / 127.5 - 1)[:, None]
    y = torch.tensor(list(digits["train"]["label"]))
    judge = LogisticRegression(max_iter=2000).fit(x.flatten(1).numpy(), y.numpy())

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    unet, classifier = tiny_unet().train(), tiny_classifier().train()
    generator = torch.Generator().manual_seed(0)

    def noisy_batch():
        idx = torch.randint(0, len(x), (64,), generator=generator)
        t = torch.randint(0, 1000, (64,), generator=generator)
        noise = torch.randn((64, 1, 8, 8), generator=generator)
        return scheduler.add_noise(x[idx], noise, t), noise, t, y[idx]

    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    for _ in range(80):
        x_t, noise, t, _ = noisy_batch()
        loss = torch.nn.functional.mse_loss(unet(x_t, t, class_labels=torch.full_like(t, NULL)).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt = torch.optim.AdamW(classifier.parameters(), lr=3e-3)
    for _ in range(400):
        x_t, _, t, labels = noisy_batch()
        loss = torch.nn.functional.cross_entropy(classifier(x_t, t).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pipe = ClassConditionalPipeline(unet.eval(), DDIMScheduler.from_config(scheduler.config), classifier=classifier.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe, judge


def test_classifier_guidance_moves_samples_toward_the_asked_class(trained_digits_models):
    pipe, judge = trained_digits_models
    labels = [i % NUM_CLASSES for i in range(60)]

    def judged_accuracy(classifier_scale):
        # guidance_scale=0: the unconditional model, so any pull toward the class comes from the classifier.
        images = sample(pipe, labels, steps=20, seed=1, guidance_scale=0.0, classifier_scale=classifier_scale)
        return float((judge.predict(images.flatten(1).numpy() * 2 - 1) == np.array(labels)).mean())

    unguided, guided = judged_accuracy(0.0), judged_accuracy(1.0)
    assert unguided < 0.3
    assert guided > unguided + 0.15


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    ({"class_labels": ["digit-11"]}, "unknown class name 'digit-11'"),
    ({"class_labels": [3, 10]}, r"class id 10 is out of range \[0, 10\)"),
    ({"class_labels": [-1]}, r"class id -1 is out of range"),
    ({"class_labels": [1.5]}, "must be an int id or a class name"),
    ({"class_labels": []}, "class_labels is empty"),
    ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
    ({"classifier_scale": -0.5}, "classifier_scale must be >= 0"),
    ({"classifier_scale": 1.0}, "needs a classifier"),
    ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1"),
    ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer >= 1"),
    ({"num_inference_steps": 101}, "num_inference_steps=101 is more than DDPMScheduler can run"),
    ({"generator": [torch.Generator()] * 3}, "got 3 generators for 2 class labels"),
    ({"latents": torch.zeros(3, 1, 8, 8)}, r"latents have shape \(3, 1, 8, 8\), expected \(2, 1, 8, 8\)"),
    ({"guidance_rescale": 1.5}, r"guidance_rescale must be in \[0, 1\]"),
    ({"dynamic_thresholding_ratio": 0.0}, r"dynamic_thresholding_ratio must be in \(0, 1\]"),
    ({"output_type": "jpg"}, "output_type must be"),
])
def test_bad_call_arguments_raise_value_errors_naming_the_problem(kwargs, message):
    pipe = make_pipe()
    kwargs = {"class_labels": [1, 2], "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_more_steps_than_train_timesteps_is_refused_for_every_scheduler(scheduler_cls):
    pipe = make_pipe(scheduler=scheduler_cls(num_train_timesteps=50))
    with pytest.raises(ValueError, match=f"num_inference_steps=51 is more than {scheduler_cls.__name__}"):
        pipe([1], num_inference_steps=51)


def test_scheduler_without_thresholding_is_refused():
    pipe = make_pipe(scheduler=EulerDiscreteScheduler(num_train_timesteps=100))
    with pytest.raises(ValueError, match="EulerDiscreteScheduler has no dynamic thresholding"):
        pipe([1], num_inference_steps=2, dynamic_thresholding_ratio=0.99)


def test_bad_components_raise_value_errors():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    unconditional = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    with pytest.raises(ValueError, match="num_class_embeds = num_classes \\+ 1"):
        ClassConditionalPipeline(unconditional, scheduler)
    with pytest.raises(ValueError, match="class_names has 3 entries but the unet has 10 classes"):
        ClassConditionalPipeline(tiny_unet(), scheduler, class_names=["a", "b", "c"])
    wrong_classifier = NoisyClassifier(num_classes=4, block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2)
    with pytest.raises(ValueError, match="classifier predicts 4 classes but the unet has 10"):
        ClassConditionalPipeline(tiny_unet(), scheduler, classifier=wrong_classifier)
    with pytest.raises(ValueError, match="norm_num_groups=8 must divide"):
        NoisyClassifier(block_out_channels=(12, 16), down_block_types=("DownBlock2D",) * 2)


# ---------------------------------------------------------------------------------- saving and loading
FRESH_PROCESS_SAMPLER = """
import sys, numpy as np, torch
from hfx.pipelines import ClassConditionalPipeline
pipe = ClassConditionalPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
torch.set_num_threads(1)
images = pipe(["digit-2", 8, 8], guidance_scale=2.0, classifier_scale=3.0, num_inference_steps=5,
              generator=torch.Generator().manual_seed(11), output_type="np").images
np.save(sys.argv[2], images)
"""


def test_save_then_load_in_a_fresh_process_gives_identical_images(tmp_path):
    pipe = make_pipe(classifier=tiny_classifier(), default_guidance_scale=1.5)
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["classifier"] == ["hfx.models.noisy_classifier.modeling_noisy_classifier", "NoisyClassifier"]
    # An id -> name mapping, not a list: diffusers' Hub loader reads every list as a component.
    assert index["class_names"] == {str(i): name for i, name in enumerate(NAMES)}
    assert index["default_guidance_scale"] == 1.5
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", FRESH_PROCESS_SAMPLER, str(tmp_path / "pipe"), str(tmp_path / "out.npy")],
                   check=True, env=env, timeout=300)
    expected = pipe(["digit-2", 8, 8], guidance_scale=2.0, classifier_scale=3.0, num_inference_steps=5,
                    generator=torch.Generator().manual_seed(11), output_type="np").images
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_load_without_classifier_and_by_hub_repo_id_from_the_cache(tmp_path):
    pipe = make_pipe()
    # The Hub cache layout that snapshot_download reads offline: refs/main -> snapshots/<commit>/.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "models--hfx-tests--tiny-digits"
    pipe.save_pretrained(repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)

    loaded = ClassConditionalPipeline.from_pretrained("hfx-tests/tiny-digits", cache_dir=tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.classifier is None and loaded.class_names == NAMES
    assert torch.equal(sample(loaded, [4, 5]), sample(pipe, [4, 5]))

    with pytest.raises(FileNotFoundError, match="^cannot load pipeline 'hfx-tests/not-cached': it is not in the local "
                                                "cache and the Hub is offline"):
        ClassConditionalPipeline.from_pretrained("hfx-tests/not-cached", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no pipeline folder"):
        ClassConditionalPipeline.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        ClassConditionalPipeline.from_pretrained(str(repo_dir))


def test_noisy_classifier_round_trip(tmp_path):
    classifier = tiny_classifier()
    classifier.save_pretrained(tmp_path)
    loaded = NoisyClassifier.from_pretrained(tmp_path)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 50, 99])
    with torch.no_grad():
        logits = classifier(x, t).logits
        assert logits.shape == (3, NUM_CLASSES)
        assert torch.equal(loaded(x, t).logits, logits)
        assert torch.equal(classifier(x, 50).logits[1], logits[1])


# ---------------------------------------------------------------------------------- hfx sample
def test_hfx_sample_writes_a_grid(tmp_path, capsys):
    make_pipe().save_pretrained(tmp_path / "pipe")
    out = tmp_path / "grids" / "one.png"
    assert main(["sample", str(tmp_path / "pipe"), "--class", "digit-3", "--n", "4", "--steps", "3",
                 "--guidance", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (16, 16)  # 2 x 2 images of 8 x 8
    assert "wrote" in capsys.readouterr().out

    out = tmp_path / "rows.png"
    assert main(["sample", str(tmp_path / "pipe"), "--class", "1", "digit-2", "--n", "3", "--steps", "2",
                 "--scheduler", "dpm++", "--out", str(out)]) == 0
    assert Image.open(out).size == (24, 16)  # one row per class, 3 columns

    assert main(["sample", str(tmp_path / "pipe"), "--class", "cat", "--steps", "2", "--out", str(out)]) == 1
    assert "unknown class name 'cat'" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "pipe"), "--scheduler", "euler", "--out", str(out)]) == 1
    assert "unknown scheduler 'euler'" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "pipe"), "--truncation-psi", "0.7", "--out", str(out)]) == 1
    assert "--truncation-psi applies to gan pipelines; " in capsys.readouterr().err
