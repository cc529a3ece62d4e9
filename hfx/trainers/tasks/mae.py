"""``mae``: masked autoencoders (He et al. 2022) with transformers' ``ViTMAEForPreTraining``.

The encoder sees a random ``1 - mask_ratio`` of the patches (MAE: 25 %); a light decoder predicts the pixels of
the masked ones, and the loss is the mean squared error over the MASKED patches only, against per-patch
normalised pixels (``norm_pix_loss``). The model, its masking and its loss are transformers' own; this task
builds it from ``task_options.model`` (a ``ViTMAEConfig``'s fields; the side and the channels come from the
data) and feeds it images, optionally through a light random resized crop (``random_crop``). The masking noise
is ``torch.rand`` on the training device, the global RNG that checkpoints restore, so a resumed run masks the
same patches as an uninterrupted one.

Evaluation: the frozen-feature metrics of :func:`~hfx.trainers.tasks._ssl.representation_metrics` (k-NN, linear
probe, few labels, ``feature_std``) of the encoder with NO masking (``mask_ratio`` 0 for the call, and a noise
that keeps the patches in order, so no random draw), pooled as ``pooling`` says: ``mean`` of the patch tokens
(default; MAE's fine-tuning and global-pool probe) or the ``cls`` token; the masked reconstruction loss of the
test split with fixed masks (:meth:`~hfx.trainers.tasks.base.Task.eval_generator`); and a grid of test images,
their masked inputs and their reconstructions, ``samples/reconstructions-step-<n>.png``. MAE's features are
known to be weak for k-NN and better for (linear and, above all, fine-tuned) probes.

Artifact: the encoder converted, tensor for tensor, to a transformers ``ViTModel`` (no pooler; the same
architecture, keys and weights; no masking and no shuffling), plus a ``ViTImageProcessor``: loadable without hfx
with ``AutoModel.from_pretrained`` / ``AutoImageProcessor.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from hfx.trainers.config import bounded
from hfx.trainers.errors import ConfigError
from hfx.trainers.tasks._image_tasks import image_grid, write_sample_grids
from hfx.trainers.tasks._ssl import (
    FrozenFeatureOptions,
    random_views,
    representation_data,
    representation_metrics,
)
from hfx.trainers.tasks.base import Task, TaskData, register_task

logger = logging.getLogger(__name__)

#: ``ViTMAEConfig`` fields that come from the data or from this task's own options, not from ``task_options.model``.
NOT_IN_MODEL = {"image_size": "task_options.image_size and the data", "num_channels": "the images' channels",
                "mask_ratio": "task_options.mask_ratio", "norm_pix_loss": "task_options.norm_pix_loss"}
#: The ``ViTMAEConfig`` fields a ``ViTModel`` shares (the encoder's architecture).
ENCODER_FIELDS = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
                  "initializer_range", "layer_norm_eps", "qkv_bias")


@dataclass
class MaeOptions(FrozenFeatureOptions):
    """``task_options`` of ``mae``."""

    model: dict[str, Any] = field(default_factory=dict)
    """``ViTMAEConfig`` fields: ``patch_size``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``intermediate_size``, ``decoder_hidden_size``, ``decoder_num_hidden_layers``, ... (not the side or channels)."""
    mask_ratio: float = bounded(0.75, "[0,1)")
    """Fraction of the patches hidden from the encoder (MAE: 0.75)."""
    norm_pix_loss: bool = True
    """Targets are each patch's pixels normalised by the patch's mean and variance (MAE's better setting)."""
    random_crop: bool = True
    """A light random resized crop of each training image (area ``crop_scale``, no rotation or jitter)."""
    crop_scale: tuple[float, float] = bounded((0.6, 1.0), "(0,1]")
    pooling: Literal["mean", "cls"] = "mean"
    """The evaluated feature: the mean of the patch tokens (MAE's global pooling) or the [CLS] token."""
    reconstruction_grid: int = bounded(8, ">=0")
    """Test images in the reconstruction grid of each evaluation; 0: none."""

    def __post_init__(self):
        from transformers import ViTMAEConfig

        if not isinstance(self.model, dict):
            raise ConfigError(f"task_options.model must be a mapping of ViTMAEConfig fields, got {self.model!r}")
        known = set(ViTMAEConfig().to_dict())
        for key in self.model:
            if key in NOT_IN_MODEL:
                raise ConfigError(f"task_options.model.{key} cannot be set: it comes from {NOT_IN_MODEL[key]}")
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known - set(NOT_IN_MODEL)), n=1)
                raise ConfigError(f"unknown key 'task_options.model.{key}' (a ViTMAEConfig field)"
                                  + (f"; did you mean {close[0]!r}?" if close else ""))
        low, high = self.crop_scale
        if not low <= high:
            raise ConfigError(f"config key 'task_options.crop_scale' must be (low, high) with low <= high, got "
                              f"{list(self.crop_scale)!r}")


@contextlib.contextmanager
def unmasked(config):
    """``config.mask_ratio`` is 0 inside the block (ViTMAE reads it at every forward), restored after."""
    saved = config.mask_ratio
    config.mask_ratio = 0.0
    try:
        yield
    finally:
        config.mask_ratio = saved


def in_order(pixels: torch.Tensor, num_patches: int) -> torch.Tensor:
    """A ViTMAE ``noise`` (B, num_patches) that keeps every patch in its place (ascending: argsort is the identity)."""
    return torch.arange(num_patches, device=pixels.device, dtype=torch.float32).expand(pixels.shape[0], -1)


def sincos_position_embeddings(grid_size: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embeddings (1, 1 + grid_size**2, dim), a zero row for [CLS] first, in the
    layout transformers' pretrained ViTMAE checkpoints use ([sin_w|cos_w|sin_h|cos_h])."""
    if dim % 4:
        raise ConfigError(f"task_options.model: hidden_size and decoder_hidden_size must be multiples of 4 (MAE's "
                          f"2-D sin-cos position embeddings), got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    h, w = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64),
                          indexing="ij")
    out_w, out_h = w.reshape(-1, 1) * omega, h.reshape(-1, 1) * omega
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float().unsqueeze(0)


@torch.no_grad()
def restore_position_embeddings(model) -> None:
    """Give a freshly built ``ViTMAEForPreTraining`` its fixed sin-cos position embeddings (encoder and decoder)
    where they are all zero. transformers 5's weight initialisation leaves both at zero (the encoder's
    ``initialize_weights`` returns early once the patch projection is marked initialised, and the decoder's
    ``_init_weights`` zeroes ``decoder_pos_embed``); they are frozen, so the model would never know where a patch
    is: the decoder predicts one value for every masked patch of an image (the loss stalls at about the pixels'
    variance) and the encoder sees a bag of patches."""
    grid = int(model.vit.embeddings.patch_embeddings.num_patches ** 0.5)
    for table in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
        if not table.abs().any():
            table.copy_(sincos_position_embeddings(grid, table.shape[-1]).to(table))


@register_task("mae")
class MaeTask(Task):
    """Masked-autoencoder pretraining of a ViT (see the module docstring)."""

    Options = MaeOptions
    hub_task_type = "image-feature-extraction"

    def build_data(self) -> TaskData:
        return representation_data(self)

    def build_models(self) -> dict[str, torch.nn.Module]:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining

        opts = self.options
        config = ViTMAEConfig(**{**opts.model, "image_size": self.info.size, "num_channels": self.info.channels,
                                 "mask_ratio": opts.mask_ratio, "norm_pix_loss": opts.norm_pix_loss})
        patch = config.patch_size
        if not isinstance(patch, int) or isinstance(patch, bool) or patch < 1 or self.info.size % patch:
            raise ConfigError(f"task_options.model.patch_size {patch!r} must be an int >= 1 dividing the image side "
                              f"{self.info.size}")
        if config.hidden_size % config.num_attention_heads or config.decoder_hidden_size % config.decoder_num_attention_heads:
            raise ConfigError("task_options.model: hidden_size must be a multiple of num_attention_heads, and "
                              "decoder_hidden_size of decoder_num_attention_heads")
        if int((self.info.size // patch) ** 2 * (1 - opts.mask_ratio)) < 1:
            raise ConfigError(f"task_options.mask_ratio {opts.mask_ratio} leaves the encoder no patch of the "
                              f"{(self.info.size // patch) ** 2}: lower it")
        model = ViTMAEForPreTraining(config)
        restore_position_embeddings(model)
        return {"model": model}

    def loss(self, models, batch, state):
        opts = self.options
        pixels = batch["pixel_values"]
        if opts.random_crop:
            pixels = random_views(pixels, self.info.size, opts.crop_scale, max_rotation=0.0, jitter=0.0,
                                  fill=(0.0 - opts.mean) / opts.std)
        return models["model"](pixel_values=pixels).loss

    # ------------------------------------------------------------------------------------------ evaluation
    def encode(self, model, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, hidden_size) of the encoder of ``model`` (a ``ViTMAEForPreTraining``) on every patch."""
        vit = model.vit
        with unmasked(vit.config):
            hidden = vit(pixel_values=pixels, noise=in_order(pixels, vit.embeddings.patch_embeddings.num_patches))
        hidden = hidden.last_hidden_state
        return hidden[:, 1:].mean(1) if self.options.pooling == "mean" else hidden[:, 0]

    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        model = self.accelerator.unwrap_model(models["model"])
        metrics = representation_metrics(self, lambda x: self.encode(model, x), self.train_set, self.eval_set)
        total, count, first = 0.0, 0, None
        for i, batch in enumerate(loader):
            pixels = batch["pixel_values"]
            first = pixels if first is None else first
            noise = self._noise(pixels, i)
            loss = model(pixel_values=pixels, noise=noise).loss.float()
            losses = self.accelerator.gather_for_metrics(loss.expand(pixels.shape[0]).contiguous())
            total, count = total + float(losses.sum()), count + losses.numel()
        metrics["reconstruction_loss"] = total / max(count, 1)
        if self.accelerator.is_main_process and first is not None and self.options.reconstruction_grid > 0:
            self._write_reconstructions(model, first[: self.options.reconstruction_grid], state.global_step)
        return metrics

    def _noise(self, pixels: torch.Tensor, batch_index: int) -> torch.Tensor:
        """Masking noise of eval batch ``batch_index``: the same masks in every evaluation (no global draw)."""
        num_patches = (self.info.size // self.options.model.get("patch_size", 16)) ** 2
        generator = self.eval_generator(pixels.device, batch_index)
        return torch.rand(pixels.shape[0], num_patches, generator=generator, device=pixels.device)

    def _write_reconstructions(self, model, pixels: torch.Tensor, step: int) -> None:
        """Three rows: the images, their masked inputs (hidden patches grey), the reconstruction (visible patches
        pasted back). Predictions of normalised patches are un-normalised with each patch's own statistics."""
        out = model(pixel_values=pixels, noise=self._noise(pixels, 0))
        target = model.patchify(pixels)
        prediction = out.logits
        if model.config.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            prediction = prediction * (var + 1.0e-6) ** 0.5 + mean
        mask = out.mask[..., None]
        grey = torch.full_like(target, (0.5 - self.options.mean) / self.options.std)
        masked = model.unpatchify(target * (1 - mask) + grey * mask)
        pasted = model.unpatchify(target * (1 - mask) + prediction * mask)

        def to_unit(x):  # the model's normalisation -> [-1, 1], what image_grid draws
            return (x.float() * self.options.std + self.options.mean) * 2 - 1

        grid = image_grid(torch.cat([to_unit(pixels), to_unit(masked), to_unit(pasted)]).cpu(), rows=3)
        scale = max(1, -(-64 // self.info.size))
        write_sample_grids(self, {"reconstructions-": grid.resize((grid.width * scale, grid.height * scale), 0)}, step)

    # ------------------------------------------------------------------------------------------ artifact
    def encoder(self, model, state_dict: dict[str, torch.Tensor]):
        """A transformers ``ViTModel`` (no pooler) holding the encoder weights of ``state_dict`` (a
        ``ViTMAEForPreTraining``'s): the same modules under the same names, so the copy is exact."""
        from transformers import ViTConfig, ViTModel

        mae = model.config
        config = ViTConfig(**{key: getattr(mae, key) for key in ENCODER_FIELDS})
        vit = ViTModel(config, add_pooling_layer=False)
        weights = {k[len("vit."):]: v for k, v in state_dict.items() if k.startswith("vit.")}
        vit.load_state_dict(weights, strict=True)
        return vit.eval()

    def save(self, models, state_dicts, output_dir: Path) -> None:
        self.encoder(models["model"], state_dicts["model"]).save_pretrained(output_dir)
        self.save_preprocessing(output_dir)

    def save_preprocessing(self, output_dir: Path) -> None:
        from transformers import ViTImageProcessor

        c = self.info.channels
        ViTImageProcessor(do_resize=True, size={"height": self.info.size, "width": self.info.size}, do_rescale=True,
                          rescale_factor=1 / 255, do_normalize=True, image_mean=[self.options.mean] * c,
                          image_std=[self.options.std] * c).save_pretrained(output_dir)

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        opts = self.options
        pooled = "the mean of the patch tokens" if opts.pooling == "mean" else "the [CLS] token"
        summary = (f"A ViT encoder pretrained as a masked autoencoder (transformers' ViTMAE, {opts.mask_ratio:.0%} of "
                   f"the patches masked, {'normalised-pixel' if opts.norm_pix_loss else 'pixel'} targets) on "
                   f"{self.info.size}x{self.info.size} {'greyscale' if self.info.channels == 1 else 'RGB'} images, saved as a "
                   f"plain `ViTModel` (no masking). The reported accuracies are k-NN and linear probes of its frozen "
                   f"features, {pooled} of `last_hidden_state` ({'`[:, 1:].mean(1)`' if opts.pooling == 'mean' else '`[:, 0]`'}).")
        return {"summary": summary}
