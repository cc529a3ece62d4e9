"""``text-to-image``: latent diffusion conditioned on a pretrained text encoder through cross-attention.

A diffusers ``UNet2DConditionModel`` (``cross_attention_dim`` = the encoder's width) learns to denoise the
latents of a frozen hfx-trained autoencoder (``latent_vae``), attending to the hidden states of a frozen
pretrained text encoder (``text_encoder``: all-MiniLM-L6-v2 by default, found offline in its PyPI package).
With probability ``prompt_dropout`` a caption is replaced by the empty prompt, so the one network is also the
unconditional model that classifier-free guidance needs. The encoder being frozen, every caption is encoded
once before training (as every image is encoded once to its latent posterior); each step draws a latent
from the posterior, as ``diffusion`` does for latent diffusion.

Evaluation: the held-out denoising loss at fixed noise and timesteps, with the captions and with the empty
prompt; a grid of fixed prompts (``grid_prompts``, default the first eval captions) in ``samples/``; with
``evaluator`` (an ``image-classification`` artifact of the label column) the share of ``eval_samples``
images, generated at the default guidance from eval captions, classified as their caption's label
(``sample_accuracy``), and for each of ``attribute_columns`` (columns of the data measured by
:data:`hfx.metrics.DIGIT_ATTRIBUTES`) the share whose measured attribute is the caption's. The saved artifact is
a :class:`~hfx.pipelines.TextToImagePipeline` (VAE, encoder, tokenizer, UNet, DDIM).

All noise comes from the global RNG, which checkpoints restore, so a killed run resumes exactly.
"""

from __future__ import annotations

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
    check_evaluator,
    image_grid,
    noise_scheduler,
    trained_classifier,
    write_sample_grids,
)
from hfx.trainers.tasks.base import Task, TaskData, register_task, with_weights
from hfx.trainers.tasks.diffusion import LatentPosteriors, latent_sample, load_vae

logger = logging.getLogger(__name__)

#: The UNet of ``t2i-digits``: cross-attention at both levels of 8x8x4 latents.
DEFAULT_T2I_UNET: dict[str, Any] = {
    "layers_per_block": 1,
    "block_out_channels": [64, 128],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}


@dataclass
class TextToImageOptions(NoiseScheduleOptions, ImageColumns):
    text_column: str = "text"
    text_encoder: str = "sentence-transformers/all-MiniLM-L6-v2"
    """A transformers encoder (folder or Hub name; the packaged MiniLM loads offline), frozen."""
    max_length: int = bounded(32, ">=1")
    """Tokens of a caption the encoder reads (longer captions are truncated); the saved tokenizer's limit."""
    prompt_dropout: float = bounded(0.1, "[0,1)")
    """Probability of training on the empty prompt instead of the caption (classifier-free guidance)."""
    latent_vae: str | None = None
    """The trained, unconditional VAE folder whose latents are diffused (required)."""
    unet: dict[str, Any] = field(default_factory=dict)
    """``UNet2DConditionModel`` keyword arguments over :data:`DEFAULT_T2I_UNET` (sizes, channels and the
    cross-attention width come from the data, the VAE and the encoder)."""
    default_guidance_scale: float = bounded(3.0, ">=0")
    grid_prompts: list[str] | None = None
    """Prompts of the evaluation grids (one row each); None: the first 8 eval captions."""
    grid_per_prompt: int = bounded(4, ">=0")
    grid_steps: int = bounded(25, ">=1")
    evaluator: str | None = None
    """A classifier of ``label_column`` (``image-classification`` artifact): ``sample_accuracy`` at evaluations."""
    eval_samples: int = bounded(100, ">=1")
    attribute_columns: list[str] = field(default_factory=list)
    """Columns of the data whose value a program measures on the generated images (``hfx.metrics.DIGIT_ATTRIBUTES``:
    ``size``, ``position``, ``thickness``), reported as ``<column>_accuracy``."""

    def __post_init__(self):
        if not self.latent_vae:
            raise ConfigError("task_options.latent_vae is required: the folder of a trained VAE whose latents the UNet "
                              "denoises (e.g. hfx train vae-digits data.dataset=digits-captions ...)")
        if self.grid_prompts is not None and (not isinstance(self.grid_prompts, list) or not self.grid_prompts
                                              or not all(isinstance(p, str) for p in self.grid_prompts)):
            raise ConfigError(f"task_options.grid_prompts must be a non-empty list of strings or null, got "
                              f"{self.grid_prompts!r}")
        from hfx.metrics import DIGIT_ATTRIBUTES

        unknown = [c for c in self.attribute_columns if c not in DIGIT_ATTRIBUTES]
        if unknown:
            raise ConfigError(f"task_options.attribute_columns names {unknown}, which no program measures (measured: "
                              f"{', '.join(DIGIT_ATTRIBUTES)})")


class CaptionedLatents(torch.utils.data.Dataset):
    """Latent posteriors and labels (:class:`LatentPosteriors`) with each caption's encoder states and mask."""

    def __init__(self, posteriors: LatentPosteriors, hidden: torch.Tensor, mask: torch.Tensor):
        self.posteriors, self.hidden, self.mask = posteriors, hidden, mask

    def __len__(self) -> int:
        return len(self.posteriors)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**self.posteriors[index], "text_states": self.hidden[index], "text_mask": self.mask[index]}


def load_text_encoder(name: str, max_length: int):
    """``(encoder, tokenizer)`` of ``name`` (a folder or Hub name; packaged checkpoints resolve offline), frozen,
    the tokenizer limited to ``max_length`` tokens."""
    from transformers import AutoModel, AutoTokenizer

    from hfx.models import resolve_pretrained

    try:
        path = resolve_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"task_options.text_encoder {name!r} cannot be loaded: {first}") from None
    if getattr(encoder.config, "hidden_size", None) is None:
        raise ConfigError(f"task_options.text_encoder {name!r} has no hidden_size: not a transformers text encoder")
    positions = getattr(encoder.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise ConfigError(f"task_options.max_length={max_length} exceeds what {name!r} reads ({positions} positions)")
    tokenizer.model_max_length = max_length
    return encoder.eval().requires_grad_(False), tokenizer


@torch.no_grad()
def encode_texts(encoder, tokenizer, texts: list[str], batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``(last hidden states (N, L, width), attention masks (N, L))`` of ``texts`` at the tokenizer's limit, as
    :meth:`~hfx.pipelines.TextToImagePipeline.encode_prompt` computes them."""
    hidden, masks = [], []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        hidden.append(encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state)
        masks.append(enc["attention_mask"])
    return torch.cat(hidden), torch.cat(masks)


def score_samples(pipe, prompts: list[str], labels: list[int], attributes: dict[str, list[int]], evaluator,
                  guidance_scale: float, steps: int, seed: int, batch_size: int = 100) -> dict[str, Any]:
    """Generate one image per prompt and score it: ``class_accuracy`` (``evaluator``'s prediction equals the label),
    ``<attribute>_accuracy`` (the measuring program of :data:`hfx.metrics.DIGIT_ATTRIBUTES` recovers the prompt's
    value), and the images (N, C, H, W) in [-1, 1] with the evaluator's features, for FID."""
    from hfx.metrics import DIGIT_ATTRIBUTES

    generator = torch.Generator(pipe.device).manual_seed(seed)
    images = torch.cat([pipe(prompts[i:i + batch_size], guidance_scale=guidance_scale, num_inference_steps=steps,
                             generator=generator, output_type="pt").images for i in range(0, len(prompts), batch_size)])
    images = images * 2 - 1
    result: dict[str, Any] = {"images": images}
    if evaluator is not None:
        features, logits = evaluator.features_and_logits(images.to(evaluator.model.device if hasattr(
            evaluator.model, "device") else "cpu"))
        result["features"] = features.cpu()
        result["class_accuracy"] = float((logits.argmax(1).cpu() == torch.tensor(labels)).double().mean())
    for name, values in attributes.items():
        measure = DIGIT_ATTRIBUTES[name][0]
        result[f"{name}_accuracy"] = float((torch.as_tensor(measure(images)) == torch.tensor(values)).double().mean())
    return result


@register_task("text-to-image")
class TextToImageTask(Task):
    Options = TextToImageOptions
    hub_task_type = "text-to-image"
    eval_seed = 60_000

    def build_data(self) -> TaskData:
        opts = self.options
        data, self.info = build_image_data(self, extra_columns={c: "attribute_columns" for c in opts.attribute_columns})
        raw = {"train": data.train.with_format(None), "eval": data.eval.with_format(None) if data.eval else None}
        if opts.text_column not in raw["train"].column_names:
            raise ConfigError(f"dataset {self.config.data.dataset!r} has no column {opts.text_column!r} (columns: "
                              f"{', '.join(raw['train'].column_names)}); set task_options.text_column")
        check_evaluator(opts.evaluator)
        self.vae = load_vae(opts.latent_vae)
        size = getattr(self.vae.config, "image_size", None) or getattr(self.vae.config, "sample_size", None)
        if size != self.info.size or self.vae.config.in_channels != self.info.channels:
            raise ConfigError(f"task_options.latent_vae was trained on {self.vae.config.in_channels}x{size}x{size} "
                              f"images, the data are {self.info.channels}x{self.info.size}x{self.info.size}")
        self.encoder, self.tokenizer = load_text_encoder(opts.text_encoder, opts.max_length)
        self.empty_states, self.empty_mask = encode_texts(self.encoder, self.tokenizer, [""])
        splits = {}
        for split, images in (("train", data.train), ("eval", data.eval)):
            if images is None:
                continue
            texts = [str(t) for t in raw[split][opts.text_column]]
            hidden, mask = encode_texts(self.encoder, self.tokenizer, texts)
            splits[split] = CaptionedLatents(LatentPosteriors(self.vae, images), hidden, mask)
        self.eval_texts = [str(t) for t in raw["eval"][opts.text_column]] if raw["eval"] is not None else []
        self.eval_rows = raw["eval"]
        return TaskData(train=splits["train"], eval=splits.get("eval"))

    def build_models(self) -> dict[str, torch.nn.Module]:
        from diffusers import UNet2DConditionModel

        opts = self.options
        self.scheduler = noise_scheduler(opts, clip_sample=False)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        config = {**DEFAULT_T2I_UNET, **opts.unet, "sample_size": self.info.size // factor,
                  "in_channels": self.vae.config.latent_channels, "out_channels": self.vae.config.latent_channels,
                  "cross_attention_dim": self.encoder.config.hidden_size}
        try:
            unet = UNet2DConditionModel(**config)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"task_options.unet does not make a UNet2DConditionModel: {err}") from None
        return {"unet": unet}

    # ------------------------------------------------------------------------------------------ the loss
    def clean_sample(self, batch, sample_posterior: bool = True) -> torch.Tensor:
        return latent_sample(batch, self.vae, sample_posterior)

    def condition(self, batch, drop: torch.Tensor | None):
        """The batch's text states and masks, the rows of ``drop`` replaced by the empty prompt's."""
        states, mask = batch["text_states"], batch["text_mask"]
        if drop is None:
            return states, mask
        empty_states = self.empty_states.to(states)
        empty_mask = self.empty_mask.to(mask)
        states = torch.where(drop[:, None, None], empty_states, states)
        mask = torch.where(drop[:, None], empty_mask, mask)
        return states, mask

    def loss(self, models, batch, state):
        x0 = self.clean_sample(batch)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(x0.device)
        x_t, t, noise = noised(self.scheduler, x0)
        drop = torch.rand(x0.shape[0], device=x0.device) < self.options.prompt_dropout
        states, mask = self.condition(batch, drop)
        prediction = models["unet"](x_t, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
        return denoising_loss(prediction, prediction_target(self.scheduler, x0, noise, t))

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        total, count = torch.zeros(2, dtype=torch.float64), 0
        unet = models["unet"]
        for index, batch in enumerate(loader):
            x0 = self.clean_sample(batch, sample_posterior=False)
            x_t, t, noise = noised(self.scheduler, x0, self.eval_generator(x0.device, index))
            target = prediction_target(self.scheduler, x0, noise, t)
            losses = []
            for drop in (None, torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)):
                states, mask = self.condition(batch, drop)
                out = unet(x_t, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
                losses.append(denoising_loss(out, target, "none"))
            per_image = self.accelerator.gather_for_metrics(torch.stack(losses, 1))
            total += per_image.double().sum(0).cpu()
            count += per_image.shape[0]
        metrics = {"loss": float(total[0] / max(count, 1)), "loss_empty_prompt": float(total[1] / max(count, 1))}
        pipe = self.pipeline(self.accelerator.unwrap_model(unet))
        pipe.set_progress_bar_config(disable=True)
        if (self.options.evaluator or self.options.attribute_columns) and self.eval_texts:
            metrics.update(self.sample_metrics(pipe))
        if self.options.grid_per_prompt > 0 and self.accelerator.is_main_process and self.grid_prompts():
            write_sample_grids(self, {"": self.sample_grid(pipe)}, state.global_step)
        return metrics

    def evaluator(self):
        return trained_classifier(self)

    def sample_metrics(self, pipe) -> dict[str, float]:
        """Class and attribute accuracy of one image for each of the first ``eval_samples`` eval captions."""
        n = min(self.options.eval_samples, len(self.eval_texts))
        rows = self.eval_rows.select(range(n))
        attributes = {c: list(rows[c]) for c in self.options.attribute_columns}
        scored = score_samples(pipe, self.eval_texts[:n], list(rows[self.options.label_column]), attributes,
                               self.evaluator() if self.options.evaluator else None,
                               self.options.default_guidance_scale, self.options.grid_steps, seed=self.eval_seed - 1)
        renamed = {"class_accuracy": "sample_accuracy"}
        return {renamed.get(k, k): v for k, v in scored.items() if k.endswith("accuracy")}

    def grid_prompts(self) -> list[str]:
        return self.options.grid_prompts or self.eval_texts[:8]

    def sample_grid(self, pipe):
        """One row of ``grid_per_prompt`` images per grid prompt, at the default guidance, fixed noise."""
        prompts, k = self.grid_prompts(), self.options.grid_per_prompt
        images = pipe(prompts, num_images_per_prompt=k, num_inference_steps=self.options.grid_steps,
                      generator=torch.Generator(pipe.device).manual_seed(self.eval_seed + 1), output_type="pt").images
        return image_grid(images * 2 - 1, rows=len(prompts))

    # ------------------------------------------------------------------------------------------ artifact
    def pipeline(self, unet):
        from diffusers import DDIMScheduler

        from hfx.pipelines import TextToImagePipeline

        device = unet.device
        return TextToImagePipeline(vae=self.vae.to(device), text_encoder=self.encoder.to(device),
                                   tokenizer=self.tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(self.scheduler.config, clip_sample=False),
                                   default_guidance_scale=self.options.default_guidance_scale)

    def save(self, models, state_dicts, output_dir: Path) -> None:
        self.pipeline(with_weights(models["unet"], state_dicts["unet"])).save_pretrained(output_dir)

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        opts = self.options
        return {"summary": f"Text-to-image latent diffusion on {self.info.size}x{self.info.size} images: a "
                           f"UNet2DConditionModel cross-attending to the frozen `{opts.text_encoder}` encoder "
                           f"(captions of up to {opts.max_length} tokens), denoising the latents of the VAE at "
                           f"`{opts.latent_vae}`; prompt dropout {opts.prompt_dropout} to the empty prompt, sampled with "
                           f"classifier-free guidance (default scale {opts.default_guidance_scale}) by hfx's "
                           "TextToImagePipeline."}
