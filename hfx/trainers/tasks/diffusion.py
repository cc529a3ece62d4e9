"""``diffusion``: class-conditional DDPM training with label dropout, for classifier-free guidance.

The task trains a diffusers ``UNet2DModel`` with ``num_class_embeds = num_classes + 1``: each label is
replaced by the null class (the last id) with probability ``label_dropout``, so one network learns both
``eps(x_t, y)`` and ``eps(x_t, null)`` and the saved :class:`~hfx.pipelines.ClassConditionalPipeline` samples
with classifier-free guidance at any scale. The loss is the mean squared error to the noise (``epsilon``) or
to the velocity (``v_prediction``, Salimans & Ho 2022) at a uniformly drawn timestep (:mod:`hfx.losses.diffusion`).
Evaluation reports the held-out denoising loss at fixed noise and timesteps (comparable across steps and
runs) and writes a grid of samples (one row per class, EMA weights) to ``samples/`` and TensorBoard.

With ``latent_vae`` (a trained, unconditional :class:`~hfx.models.vae.HfxVAEModel` or a diffusers
``AutoencoderKL``) the model is a latent diffusion model: every image is encoded once, before training, to
its posterior mean and standard deviation; each step draws ``z`` from that posterior and the UNet learns to
denoise ``z * scaling_factor``. The saved artifact is then a
:class:`~hfx.pipelines.LatentDiffusionPipeline` that carries the frozen VAE.

All noise and timesteps come from the global RNG, which checkpoints restore: a resumed run draws the
same ones as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hfx.losses import denoising_loss, noised, prediction_target
from hfx.trainers.config import bounded
from hfx.trainers.errors import ConfigError
from hfx.trainers.tasks._image_tasks import (
    ImageColumns,
    NoiseScheduleOptions,
    build_image_data,
    noise_scheduler,
    write_sample_grids,
)
from hfx.trainers.tasks.base import Task, TaskData, register_task, with_weights

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


@dataclass
class DiffusionOptions(NoiseScheduleOptions, ImageColumns):
    unet: dict[str, Any] = field(default_factory=dict)
    """``UNet2DModel`` keyword arguments over :data:`DEFAULT_UNET` (sizes, channels and classes are set
    from the data)."""
    label_dropout: float = bounded(0.1, "[0,1)")
    """Probability of training on the null class instead of the label (classifier-free guidance)."""
    default_guidance_scale: float = bounded(2.0, ">=0")
    """The guidance scale the saved pipeline uses when a caller gives none."""
    grid_per_class: int = bounded(4, ">=0")
    """Validation grids: images per class (0: no grids)."""
    grid_steps: int = bounded(25, ">=1")
    """DDIM steps of the validation grids."""
    grid_guidance_scale: float | None = bounded(None, ">=0", "null uses default_guidance_scale")
    """Guidance of the validation grids (default: ``default_guidance_scale``)."""
    latent_vae: str | None = None
    """A trained VAE folder: diffuse in its latent space (latent diffusion) instead of pixel space."""
    evaluator: str | None = None
    """A classifier folder (``image-classification`` artifact): evaluation then reports ``sample_accuracy``,
    the share of samples (the evaluated weights, default guidance, ``grid_steps`` DDIM steps) asked for class c
    that it classifies as c."""
    evaluator_samples_per_class: int = bounded(30, ">=1")


def load_vae(path: str):
    """A frozen autoencoder from a folder: an hfx ``HfxVAEModel`` or a diffusers ``AutoencoderKL``."""
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
        raise ConfigError(f"task_options.latent_vae {path!r} holds neither an hfx_vae model nor an AutoencoderKL")
    if getattr(vae.config, "num_classes", None) is not None:
        raise ConfigError(f"task_options.latent_vae {path!r} is a conditional VAE; latent diffusion needs an "
                          "unconditional one (the UNet carries the class)")
    return vae.eval().requires_grad_(False)


def latent_sample(batch, vae, sample_posterior: bool = True) -> torch.Tensor:
    """A batch of :class:`LatentPosteriors` items -> latents at the diffusion scale: a posterior draw (or its mean)
    times the VAE's ``scaling_factor``."""
    z = batch["latent_mean"]
    if sample_posterior:
        z = z + batch["latent_std"] * torch.randn_like(z)
    return z * vae.config.scaling_factor


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


@register_task("diffusion")
class DiffusionTask(Task):
    Options = DiffusionOptions
    hub_task_type = "unconditional-image-generation"
    eval_seed = 10_000

    def build_data(self) -> TaskData:
        opts = self.options
        data, self.info = build_image_data(self)
        self.vae = None
        if opts.latent_vae:
            self.vae = load_vae(opts.latent_vae)
            size = getattr(self.vae.config, "image_size", None) or getattr(self.vae.config, "sample_size", None)
            if size != self.info.size or self.vae.config.in_channels != self.info.channels:
                raise ConfigError(f"task_options.latent_vae was trained on {self.vae.config.in_channels}x{size}x{size} "
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
            raise ConfigError(f"task_options.unet does not make a UNet2DModel: {err}") from None
        return {"unet": unet}

    @property
    def null_class(self) -> int:
        return len(self.info.label_names)

    def clean_sample(self, batch, sample_posterior: bool = True) -> torch.Tensor:
        """``x_0`` of a batch: the pixels, or (latent diffusion) a posterior draw times ``scaling_factor``."""
        if self.vae is None:
            return batch["pixel_values"]
        return latent_sample(batch, self.vae, sample_posterior)

    def loss(self, models, batch, state):
        x0, labels = self.clean_sample(batch), batch["labels"]
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(x0.device)
        x_t, t, noise = noised(self.scheduler, x0)
        drop = torch.rand(labels.shape, device=labels.device) < self.options.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        prediction = models["unet"](x_t, t, class_labels=labels).sample
        return denoising_loss(prediction, prediction_target(self.scheduler, x0, noise, t))

    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        """Held-out denoising loss (conditional and null class) at noise and timesteps fixed per batch."""
        total = {"loss": 0.0, "loss_uncond": 0.0}
        count = 0
        for index, batch in enumerate(loader):
            x0, labels = self.clean_sample(batch, sample_posterior=False), batch["labels"]
            x_t, t, noise = noised(self.scheduler, x0, self.eval_generator(x0.device, index))
            target = prediction_target(self.scheduler, x0, noise, t)
            cond = models["unet"](x_t, t, class_labels=labels).sample
            uncond = models["unet"](x_t, t, class_labels=torch.full_like(labels, self.null_class)).sample
            per_image = torch.stack([denoising_loss(cond, target, "none"), denoising_loss(uncond, target, "none")], 1)
            per_image = self.accelerator.gather_for_metrics(per_image)
            total["loss"] += float(per_image[:, 0].sum())
            total["loss_uncond"] += float(per_image[:, 1].sum())
            count += per_image.shape[0]
        metrics = {key: value / max(count, 1) for key, value in total.items()}
        unet = self.accelerator.unwrap_model(models["unet"])
        if self.options.evaluator:  # every process draws the same samples, so all agree on the number
            metrics["sample_accuracy"] = self.sample_accuracy(unet)
        if self.options.grid_per_class > 0 and self.accelerator.is_main_process:
            write_sample_grids(self, {"": self.sample_grid(unet)}, state.global_step)
        return metrics

    def sample_accuracy(self, unet) -> float:
        """Share of the pipeline's samples asked for class c that ``task_options.evaluator`` classifies as c."""
        from hfx.metrics.classifier import ClassSampleScorer

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

    def sample_grid(self, unet):
        """One row of ``grid_per_class`` samples per class (DDIM, ``grid_steps``, the grid guidance)."""
        from hfx.pipelines import class_grid

        opts = self.options
        pipe = self.pipeline(unet)
        pipe.set_progress_bar_config(disable=True)
        guidance = opts.grid_guidance_scale if opts.grid_guidance_scale is not None else opts.default_guidance_scale
        return class_grid(pipe, list(range(len(self.info.label_names))), opts.grid_per_class, guidance_scale=guidance,
                          num_inference_steps=opts.grid_steps, generator=torch.Generator().manual_seed(0))

    def save(self, models, state_dicts, output_dir: Path) -> None:
        self.pipeline(with_weights(models["unet"], state_dicts["unet"])).save_pretrained(output_dir)

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        opts, names = self.options, self.info.label_names
        cls = "LatentDiffusionPipeline" if self.vae is not None else "ClassConditionalPipeline"
        space = "latent" if self.vae is not None else "pixel-space"
        return {"summary": f"A class-conditional {space} DDPM ({opts.prediction_type} prediction, {opts.beta_schedule} "
                           f"noise schedule, label dropout {opts.label_dropout}) on {self.info.size}x{self.info.size} "
                           f"images of {len(names)} classes, sampled with classifier-free guidance by hfx's {cls} "
                           f"(default guidance scale {opts.default_guidance_scale})."}
