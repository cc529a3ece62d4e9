"""``diffusion`` and ``noisy-classifier``: class-conditional DDPM training with label dropout, and the
noise-aware classifier that classifier guidance uses.

``diffusion`` trains a diffusers ``UNet2DModel`` with ``num_class_embeds = num_classes + 1``: each label
is replaced by the null class (the last id) with probability ``label_dropout``, so one network learns both
``eps(x_t, y)`` and ``eps(x_t, null)`` and the saved :class:`~hfx.pipelines.ClassConditionalPipeline`
samples with classifier-free guidance at any scale. The loss is the mean squared error to the noise
(``epsilon``) or to the velocity (``v_prediction``, Salimans & Ho 2022) at a uniformly drawn timestep.
Evaluation reports the held-out denoising loss at fixed noise and timesteps (comparable across steps and
runs) and writes a grid of samples (one row per class, EMA weights) to ``samples/`` and TensorBoard.

With ``latent_vae`` (a trained, unconditional :class:`~hfx.models.vae.HfxVAEModel` or a diffusers
``AutoencoderKL``) the model is a latent diffusion model: every image is encoded once, before training, to
its posterior mean and standard deviation; each step draws ``z`` from that posterior and the UNet learns to
denoise ``z * scaling_factor``. The saved artifact is then a
:class:`~hfx.pipelines.LatentDiffusionPipeline` that carries the frozen VAE.

``noisy-classifier`` trains :class:`~hfx.models.noisy_classifier.NoisyClassifier` on ``x_t`` at uniformly
drawn timesteps of the same noise schedule (read from ``diffusion_pipeline`` when given), and reports
accuracy overall and on the noisiest and cleanest thirds of the timesteps.

All noise and timesteps come from the global RNG, which checkpoints restore: a resumed run draws the
same ones as an uninterrupted run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from hfx.trainers.callbacks import Callback
from hfx.trainers.tasks.base import Task, TaskData, register_task
from hfx.trainers.tasks.images import ClassSampleScorer, ImageColumns, build_image_data

logger = logging.getLogger(__name__)

# The UNet of the digits demo: 1.1 M parameters, channels 32/64/64, self-attention at the lowest level (4x4
# for 16x16 images): a training step costs 0.43 s on this 2-core CPU, against 0.50 s with attention at 8x8.
DEFAULT_UNET: dict[str, Any] = {
    "layers_per_block": 1,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


@dataclass
class NoiseScheduleOptions:
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "cosine"] = "cosine"
    """``linear``: Ho et al.'s betas 1e-4 .. 0.02; ``cosine``: Nichol & Dhariwal's squared-cosine alphas."""
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"


@dataclass
class DiffusionOptions(NoiseScheduleOptions, ImageColumns):
    unet: dict[str, Any] = field(default_factory=dict)
    """``UNet2DModel`` keyword arguments over :data:`DEFAULT_UNET` (sizes, channels and classes are set
    from the data)."""
    label_dropout: float = 0.1
    """Probability of training on the null class instead of the label (classifier-free guidance)."""
    default_guidance_scale: float = 2.0
    """The guidance scale the saved pipeline uses when a caller gives none."""
    grid_per_class: int = 4
    """Validation grids: images per class (0: no grids)."""
    grid_steps: int = 25
    """DDIM steps of the validation grids."""
    grid_guidance_scale: float | None = None
    """Guidance of the validation grids (default: ``default_guidance_scale``)."""
    latent_vae: str | None = None
    """A trained VAE folder: diffuse in its latent space (latent diffusion) instead of pixel space."""
    evaluator: str | None = None
    """A classifier folder (``image-classification`` artifact): evaluation then reports ``sample_accuracy``,
    the share of samples (the evaluated weights, default guidance, ``grid_steps`` DDIM steps) asked for class c
    that it classifies as c."""
    evaluator_samples_per_class: int = 30


@dataclass
class NoisyClassifierOptions(NoiseScheduleOptions, ImageColumns):
    classifier: dict[str, Any] = field(default_factory=dict)
    """``NoisyClassifier`` keyword arguments (sizes, channels and classes are set from the data)."""
    diffusion_pipeline: str | None = None
    """A saved ClassConditionalPipeline whose noise schedule the classifier must match (its scheduler
    config replaces the options above)."""


def noise_scheduler(opts: NoiseScheduleOptions, clip_sample: bool = True):
    """The training ``DDPMScheduler`` of ``opts`` (or of ``opts.diffusion_pipeline``, when set).

    ``clip_sample`` clips the predicted ``x_0`` to [-1, 1] while sampling: right for pixels, wrong for latents
    (scaled to unit variance, not to a range), so latent diffusion switches it off."""
    from diffusers import DDPMScheduler

    pipeline = getattr(opts, "diffusion_pipeline", None)
    if pipeline:
        if not (Path(pipeline) / "scheduler").is_dir():
            raise FileNotFoundError(f"task_options.diffusion_pipeline {pipeline!r} has no scheduler/ folder")
        return DDPMScheduler.from_pretrained(pipeline, subfolder="scheduler")
    return DDPMScheduler(num_train_timesteps=opts.num_train_timesteps, beta_schedule=BETA_SCHEDULES[opts.beta_schedule],
                         prediction_type=opts.prediction_type, clip_sample=clip_sample)


def load_vae(path: str):
    """A frozen autoencoder from a folder: an hfx ``HfxVAEModel`` or a diffusers ``AutoencoderKL``."""
    import json

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"task_options.latent_vae {path!r} is not a saved VAE folder (no config.json)")
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") == "AutoencoderKL":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(folder)
    elif config.get("model_type") == "hfx_vae":
        from hfx.models.vae import HfxVAEModel

        vae = HfxVAEModel.from_pretrained(folder)
    else:
        raise ValueError(f"task_options.latent_vae {path!r} holds neither an hfx_vae model nor an AutoencoderKL")
    if getattr(vae.config, "num_classes", None) is not None:
        raise ValueError(f"task_options.latent_vae {path!r} is a conditional VAE; latent diffusion needs an "
                         "unconditional one (the UNet carries the class)")
    return vae.eval().requires_grad_(False)


class LatentPosteriors(torch.utils.data.Dataset):
    """Images encoded once: each item is the posterior ``latent_mean``, ``latent_std`` (C, h, w) and label."""

    def __init__(self, vae, images, batch_size: int = 256):
        means, stds, labels = [], [], []
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size)
        with torch.no_grad():
            for batch in loader:
                dist = vae.encode(batch["pixel_values"]).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
                labels.append(batch["labels"])
        self.means, self.stds, self.labels = torch.cat(means), torch.cat(stds), torch.cat(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"latent_mean": self.means[index], "latent_std": self.stds[index], "labels": self.labels[index]}


def noised(scheduler, x0: torch.Tensor, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw a timestep per image and noise ``x0`` (B, C, H, W) to ``x_t``. Returns ``(x_t, t, noise)``."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    return scheduler.add_noise(x0, noise, t), t, noise


class _KeepTrainer(Callback):
    """Gives the task the running trainer (for the step number of validation grids)."""

    def __init__(self, task: Task):
        self.task = task

    def on_train_begin(self, trainer) -> None:
        self.task.trainer = trainer


@register_task("diffusion")
class DiffusionTask(Task):
    Options = DiffusionOptions
    hub_task_type = "unconditional-image-generation"
    trainer = None

    def build_data(self) -> TaskData:
        opts = self.options
        if not 0.0 <= opts.label_dropout < 1.0:
            raise ValueError(f"task_options.label_dropout must be in [0, 1), got {opts.label_dropout}")
        data, self.info = build_image_data(self)
        self.vae = None
        if opts.latent_vae:
            self.vae = load_vae(opts.latent_vae)
            size = getattr(self.vae.config, "image_size", None) or getattr(self.vae.config, "sample_size", None)
            if size != self.info.size or self.vae.config.in_channels != self.info.channels:
                raise ValueError(f"task_options.latent_vae was trained on {self.vae.config.in_channels}x{size}x{size} "
                                 f"images, the data are {self.info.channels}x{self.info.size}x{self.info.size}")
            data.train = LatentPosteriors(self.vae, data.train)
            data.eval = LatentPosteriors(self.vae, data.eval) if data.eval is not None else None
        return data

    def build_models(self) -> dict[str, torch.nn.Module]:
        from diffusers import UNet2DModel

        opts, info = self.options, self.info
        self.scheduler = noise_scheduler(opts, clip_sample=self.vae is None)
        side, channels = info.size, info.channels
        if self.vae is not None:
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            side, channels = info.size // factor, self.vae.config.latent_channels
        config = {**DEFAULT_UNET, **opts.unet, "sample_size": side, "in_channels": channels,
                  "out_channels": channels, "num_class_embeds": len(info.label_names) + 1}
        try:
            unet = UNet2DModel(**config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"task_options.unet does not make a UNet2DModel: {err}") from None
        return {"unet": unet}

    @property
    def null_class(self) -> int:
        return len(self.info.label_names)

    def _target(self, x0, noise, t):
        if self.options.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return noise

    def clean_sample(self, batch, sample_posterior: bool = True) -> torch.Tensor:
        """``x_0`` of a batch: the pixels, or (latent diffusion) a posterior draw times ``scaling_factor``."""
        if self.vae is None:
            return batch["pixel_values"]
        z = batch["latent_mean"]
        if sample_posterior:
            z = z + batch["latent_std"] * torch.randn_like(z)
        return z * self.vae.config.scaling_factor

    def loss(self, models, batch, phase):
        x0, labels = self.clean_sample(batch), batch["labels"]
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(x0.device)
        x_t, t, noise = noised(self.scheduler, x0)
        drop = torch.rand(labels.shape, device=labels.device) < self.options.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        prediction = models["unet"](x_t, t, class_labels=labels).sample
        return F.mse_loss(prediction.float(), self._target(x0, noise, t).float())

    @torch.no_grad()
    def evaluate(self, models, loader) -> dict[str, float]:
        """Held-out denoising loss (conditional and null class) at noise and timesteps fixed per batch."""
        total = {"loss": 0.0, "loss_uncond": 0.0}
        count = 0
        for index, batch in enumerate(loader):
            x0, labels = self.clean_sample(batch, sample_posterior=False), batch["labels"]
            generator = torch.Generator(x0.device).manual_seed(10_000 + index + 1_000 * self.accelerator.process_index)
            x_t, t, noise = noised(self.scheduler, x0, generator)
            target = self._target(x0, noise, t).float()
            cond = models["unet"](x_t, t, class_labels=labels).sample.float()
            uncond = models["unet"](x_t, t, class_labels=torch.full_like(labels, self.null_class)).sample.float()
            per_image = torch.stack([(cond - target).pow(2).flatten(1).mean(1), (uncond - target).pow(2).flatten(1).mean(1)], 1)
            per_image = self.accelerator.gather_for_metrics(per_image)
            total["loss"] += float(per_image[:, 0].sum())
            total["loss_uncond"] += float(per_image[:, 1].sum())
            count += per_image.shape[0]
        metrics = {key: value / max(count, 1) for key, value in total.items()}
        if self.options.evaluator:  # every process draws the same samples, so all agree on the number
            metrics["sample_accuracy"] = self.sample_accuracy(self.accelerator.unwrap_model(models["unet"]))
        if self.options.grid_per_class > 0 and self.accelerator.is_main_process:
            self._write_grid(self.accelerator.unwrap_model(models["unet"]))
        return metrics

    def sample_accuracy(self, unet) -> float:
        """Share of the pipeline's samples asked for class c that ``task_options.evaluator`` classifies as c."""
        if not hasattr(self, "_scorer"):
            self._scorer = ClassSampleScorer(self.options.evaluator, len(self.info.label_names),
                                             self.options.evaluator_samples_per_class)
        pipe = self.pipeline(unet)
        pipe.set_progress_bar_config(disable=True)

        def generate(labels):
            images = pipe(labels.tolist(), num_inference_steps=self.options.grid_steps,
                          generator=torch.Generator().manual_seed(0), output_type="pt").images
            return images.to(unet.device) * 2 - 1

        return self._scorer(generate, unet.device)

    def pipeline(self, unet):
        """The pipeline around ``unet`` (a LatentDiffusionPipeline with the VAE for latent diffusion), sampling
        with DDIM on the training noise schedule."""
        from diffusers import DDIMScheduler

        from hfx.pipelines import ClassConditionalPipeline, LatentDiffusionPipeline

        common = dict(unet=unet, scheduler=DDIMScheduler.from_config(self.scheduler.config),
                      class_names=self.info.label_names, default_guidance_scale=self.options.default_guidance_scale)
        if self.vae is not None:
            return LatentDiffusionPipeline(vae=self.vae.to(unet.device), **common)
        return ClassConditionalPipeline(**common)

    def _write_grid(self, unet) -> None:
        from hfx.pipelines import class_grid

        opts = self.options
        step = self.trainer.global_step if self.trainer is not None else 0
        pipe = self.pipeline(unet)
        pipe.set_progress_bar_config(disable=True)
        grid = class_grid(pipe, list(range(len(self.info.label_names))), opts.grid_per_class,
                          guidance_scale=opts.grid_guidance_scale if opts.grid_guidance_scale is not None
                          else opts.default_guidance_scale,
                          num_inference_steps=opts.grid_steps, generator=torch.Generator().manual_seed(0))
        folder = self.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"step-{step:07d}.png")
        if "tensorboard" in self.config.log.report_to:
            import numpy as np

            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image("samples", np.asarray(grid.convert("RGB")), step, dataformats="HWC")

    def callbacks(self) -> list[Callback]:
        return [_KeepTrainer(self)]

    def save(self, models, state_dicts, output_dir: Path) -> None:
        from diffusers import UNet2DModel

        unet = UNet2DModel.from_config(models["unet"].config)
        unet.load_state_dict(state_dicts["unet"])
        self.pipeline(unet).save_pretrained(output_dir)

    def card(self, metrics: dict[str, float]) -> dict[str, Any]:
        names = self.info.label_names
        cls = "LatentDiffusionPipeline" if self.vae is not None else "ClassConditionalPipeline"
        snippet = ("import hfx, torch\n"
                   f"from hfx.pipelines import {cls}\n"
                   f"pipe = {cls}.from_pretrained(\"PATH/TO/final\")\n"
                   f"images = pipe([{names[0]!r}, {names[-1]!r}], guidance_scale={self.options.default_guidance_scale}, "
                   "num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images")
        space = "latent" if self.vae is not None else "pixel-space"
        summary = (f"A class-conditional {space} DDPM ({self.options.prediction_type} prediction, {self.options.beta_schedule} "
                   f"noise schedule, label dropout {self.options.label_dropout}) on {self.info.size}x{self.info.size} "
                   f"images of {len(names)} classes, sampled with classifier-free guidance by hfx's "
                   f"{cls} (default guidance scale "
                   f"{self.options.default_guidance_scale}).")
        return {"load_snippet": snippet, "model_summary": summary, "library_name": "hfx"}


@register_task("noisy-classifier")
class NoisyClassifierTask(Task):
    Options = NoisyClassifierOptions
    hub_task_type = "image-classification"

    def build_data(self) -> TaskData:
        data, self.info = build_image_data(self)
        return data

    def build_models(self) -> dict[str, torch.nn.Module]:
        from hfx.models.noisy_classifier import NoisyClassifier

        info = self.info
        self.scheduler = noise_scheduler(self.options)
        config = {**self.options.classifier, "sample_size": info.size, "in_channels": info.channels,
                  "num_classes": len(info.label_names)}
        try:
            return {"classifier": NoisyClassifier(**config)}
        except (TypeError, ValueError) as err:
            raise ValueError(f"task_options.classifier does not make a NoisyClassifier: {err}") from None

    def loss(self, models, batch, phase):
        x0 = batch["pixel_values"]
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(x0.device)
        x_t, t, _ = noised(self.scheduler, x0)
        return F.cross_entropy(models["classifier"](x_t, t).logits.float(), batch["labels"])

    @torch.no_grad()
    def evaluate(self, models, loader) -> dict[str, float]:
        """Accuracy at fixed noise and timesteps: overall, on the cleanest third (small t) and the noisiest."""
        third = self.scheduler.config.num_train_timesteps / 3
        hits = {"accuracy": [], "accuracy_low_noise": [], "accuracy_high_noise": []}
        for index, batch in enumerate(loader):
            x0 = batch["pixel_values"]
            generator = torch.Generator(x0.device).manual_seed(20_000 + index + 1_000 * self.accelerator.process_index)
            x_t, t, _ = noised(self.scheduler, x0, generator)
            correct = models["classifier"](x_t, t).logits.argmax(-1) == batch["labels"]
            correct, t = self.accelerator.gather_for_metrics((correct, t))
            hits["accuracy"].append(correct)
            hits["accuracy_low_noise"].append(correct[t < third])
            hits["accuracy_high_noise"].append(correct[t >= 2 * third])
        return {key: float(torch.cat(values).float().mean()) if values else 0.0 for key, values in hits.items()}

    def save(self, models, state_dicts, output_dir: Path) -> None:
        from hfx.models.noisy_classifier import NoisyClassifier

        classifier = NoisyClassifier.from_config(models["classifier"].config)
        classifier.load_state_dict(state_dicts["classifier"])
        classifier.save_pretrained(output_dir)

    def card(self, metrics: dict[str, float]) -> dict[str, Any]:
        snippet = ("import hfx\n"
                   "from hfx.models.noisy_classifier import NoisyClassifier\n"
                   "from hfx.pipelines import ClassConditionalPipeline\n"
                   "classifier = NoisyClassifier.from_pretrained(\"PATH/TO/final\")\n"
                   "pipe = ClassConditionalPipeline.from_pretrained(\"PATH/TO/pipeline\", classifier=classifier)\n"
                   "images = pipe([3], guidance_scale=1.0, classifier_scale=2.0).images")
        summary = (f"A noise-aware classifier p(y | x_t, t) over {len(self.info.label_names)} classes for classifier "
                   "guidance with hfx's ClassConditionalPipeline; trained on the noise schedule of the diffusion model "
                   "it guides.")
        return {"load_snippet": snippet, "model_summary": summary, "library_name": "hfx"}
