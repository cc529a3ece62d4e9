"""``image-classification``: a timm model or a transformers image model on an image dataset.

Model, by ``task_options.model``:

- ``timm:<name>`` (``timm:resnet10t``): ``timm.create_model(name, in_chans=..., num_classes=...,
  **model_options)``; saved as timm's Hub layout (``config.json`` + ``model.safetensors``), reloaded with
  ``timm.create_model("local-dir:<final>", pretrained=True)``;
- a transformers ``model_type`` (``resnet``, ``convnext``, ``vit``, ...): built from
  ``AutoConfig.for_model(model_type, **model_options)`` with random weights;
- a local folder or Hub name with ``pretrained: true``: ``AutoModelForImageClassification.from_pretrained``
  with a new head for the dataset's labels. Transformers models are saved with ``save_pretrained``.

Images are scaled to [0, 1] and normalised with ``(x - mean) / std``. Augmentation runs on the batch,
on the training device, from the global RNG (which checkpoints restore), so a resumed run draws the same
shifts and flips as an uninterrupted one.

Each evaluation also writes Grad-CAM overlays (:func:`hfx.interpret.explain`, predicted class) of the first
``gradcam_grid`` test images to ``samples/gradcam-step-<n>.png``; the model card shows the newest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hfx.trainers.config import bounded
from hfx.trainers.errors import ConfigError
from hfx.trainers.tasks._image_tasks import ImageColumns, build_image_data, write_sample_grids
from hfx.trainers.tasks.base import Task, TaskData, register_task

logger = logging.getLogger(__name__)


@dataclass
class ImageClassificationOptions(ImageColumns):
    model: str = "timm:resnet10t"
    """``timm:<name>``, a transformers model type, or (with ``pretrained``) a folder / Hub name."""
    model_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``timm.create_model`` or of the transformers config."""
    pretrained: bool = False
    weights: str | None = None
    """timm only: a local weights file to start from (offline alternative to ``pretrained``)."""
    mean: float = 0.5
    std: float = bounded(0.5, ">0")
    label_smoothing: float = bounded(0.0, "[0,1)")
    random_shift: int = bounded(0, ">=0")
    """Translate each training image by up to this many pixels in x and y (edge padding)."""
    random_flip: bool = False
    """Flip training images left-right with probability 0.5 (not for digits or text)."""
    gradcam_grid: int = bounded(8, ">=0")
    """Test images in the Grad-CAM overlay grid written at each evaluation (and shown in the card); 0: none."""


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image of ``images`` (B, C, H, W) by its own offsets in [-max_shift, max_shift]
    (the border pixels repeat into the uncovered area). Returns the same shape."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate").permute(0, 2, 3, 1)  # B, H+2s, W+2s, C
    dy = torch.randint(0, 2 * max_shift + 1, (b, 1), device=images.device)
    dx = torch.randint(0, 2 * max_shift + 1, (b, 1), device=images.device)
    rows = dy + torch.arange(h, device=images.device)  # B, H
    cols = dx + torch.arange(w, device=images.device)  # B, W
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_flip(images: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def logits_of(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of a timm model (a tensor) or a transformers model (an output with ``.logits``)."""
    out = model(pixel_values)
    return out if torch.is_tensor(out) else out.logits


@register_task("image-classification")
class ImageClassificationTask(Task):
    Options = ImageClassificationOptions
    hub_task_type = "image-classification"

    def build_data(self) -> TaskData:
        opts = self.options
        data, info = build_image_data(self, mean=opts.mean, std=opts.std)
        self.label_names, self.mode, self.channels, self.size = info.label_names, info.mode, info.channels, info.size
        return data

    def build_models(self) -> dict[str, torch.nn.Module]:
        opts = self.options
        n = len(self.label_names)
        if opts.model.startswith("timm:"):
            import timm

            name = opts.model[len("timm:"):]
            if not timm.is_model(name):
                import difflib

                close = difflib.get_close_matches(name, timm.list_models(), n=1)
                raise ConfigError(f"task_options.model {opts.model!r}: timm has no model {name!r}"
                                  + (f"; did you mean 'timm:{close[0]}'?" if close else ""))
            self.model_args = {"in_chans": self.channels, "num_classes": n, **opts.model_options}
            extra = {"pretrained_cfg_overlay": {"file": opts.weights}} if opts.weights else {}
            model = timm.create_model(name, pretrained=opts.pretrained or bool(opts.weights),
                                      **self.model_args, **extra)
            return {"model": model}
        import transformers

        labels = {"id2label": dict(enumerate(self.label_names)),
                  "label2id": {name: i for i, name in enumerate(self.label_names)}}
        if opts.pretrained or Path(opts.model).is_dir():
            model = transformers.AutoModelForImageClassification.from_pretrained(
                opts.model, num_labels=n, ignore_mismatched_sizes=True, **labels, **opts.model_options)
        else:
            try:
                config = transformers.AutoConfig.for_model(opts.model, num_labels=n, **labels, **opts.model_options)
            except ValueError as err:
                raise ConfigError(f"task_options.model {opts.model!r} is neither 'timm:<name>' nor a transformers "
                                 f"model type ({str(err).splitlines()[0]})") from None
            for key in ("num_channels", "in_channels"):  # the name differs between model families
                if hasattr(config, key):
                    setattr(config, key, self.channels)
            if hasattr(config, "image_size"):
                config.image_size = self.size
            model = transformers.AutoModelForImageClassification.from_config(config)
        return {"model": model}

    def _augment(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = random_shift(pixels, self.options.random_shift)
        return random_flip(pixels) if self.options.random_flip else pixels

    def loss(self, models, batch, state):
        pixels = self._augment(batch["pixel_values"])
        logits = logits_of(models["model"], pixels)
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.options.label_smoothing)

    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        correct, total, loss_sum, first_batch = 0, 0, 0.0, None
        for batch in loader:
            first_batch = batch if first_batch is None else first_batch
            logits = logits_of(models["model"], batch["pixel_values"]).float()
            losses = F.cross_entropy(logits, batch["labels"], reduction="none")
            hits, losses = self.accelerator.gather_for_metrics(((logits.argmax(-1) == batch["labels"]), losses))
            correct += int(hits.sum())
            total += hits.numel()
            loss_sum += float(losses.sum())
        if self.accelerator.is_main_process and first_batch is not None and self.options.gradcam_grid > 0:
            self._write_gradcam_grid(self.accelerator.unwrap_model(models["model"]), first_batch, state.global_step)
        return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1)}

    def _write_gradcam_grid(self, model, batch, step: int) -> None:
        """Grad-CAM of the predicted class over the first test images, upscaled to >= 64 px, one row."""
        from diffusers.utils import make_image_grid

        from hfx.interpret import explain, overlay

        if self.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):  # a forward on one process would hang
            return
        pixels = batch["pixel_values"][: self.options.gradcam_grid]
        try:
            heatmaps = explain(model, pixels, method="gradcam").heatmaps.cpu()
        except ValueError as err:  # a model explain cannot read: the run goes on without the grid
            logger.warning("no Grad-CAM grid in the card: %s", err)
            return
        images = (pixels.detach().float().cpu() * self.options.std + self.options.mean).clamp(0, 1)
        scale = max(1, -(-64 // self.size))
        tiles = [overlay(F.interpolate(image[None], scale_factor=scale, mode="nearest")[0], heat)
                 for image, heat in zip(images, heatmaps)]
        write_sample_grids(self, {"gradcam-": make_image_grid(tiles, rows=1, cols=len(tiles))}, step)

    def save(self, models, state_dicts, output_dir: Path) -> None:
        model = models["model"]
        if self.options.model.startswith("timm:"):
            from safetensors.torch import save_file
            from timm.models._hub import save_config_for_hf

            save_file({k: v.contiguous() for k, v in state_dicts["model"].items()}, output_dir / "model.safetensors")
            save_config_for_hf(model, str(output_dir / "config.json"), model_args=self.model_args,
                               model_config={"label_names": self.label_names})
        else:
            model.save_pretrained(output_dir, state_dict=state_dicts["model"])
        preprocessing = {"image_size": self.size, "mode": self.mode, "mean": self.options.mean, "std": self.options.std,
                         "scale": "pixel / 255", "labels": self.label_names}
        (output_dir / "hfx_preprocessing.json").write_text(json.dumps(preprocessing, indent=2))

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        summary = (f"`{self.options.model}` trained from {'pretrained weights' if self.options.pretrained else 'scratch'} "
                   f"to classify {self.size}x{self.size} {'greyscale' if self.channels == 1 else 'RGB'} images into "
                   f"{len(self.label_names)} classes. Inputs: pixels / 255, then (x - {self.options.mean}) / "
                   f"{self.options.std} (see hfx_preprocessing.json).")
        return {"summary": summary}
