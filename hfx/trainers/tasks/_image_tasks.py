"""What the image tasks share: PIL images to training batches (the one place), sample grids to ``samples/``
and TensorBoard, and the DDPM noise schedule that the diffusion model and its noisy classifier agree on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from hfx.trainers.config import bounded
from hfx.trainers.errors import ConfigError
from hfx.trainers.tasks.base import Task, TaskData


@dataclass
class ImageDataInfo:
    """What the tasks need to know about the images they were given."""

    label_names: list[str]
    mode: str
    """PIL mode the images are converted to: ``"L"`` (1 channel) or ``"RGB"`` (3 channels)."""
    channels: int
    size: int


@dataclass
class ImageColumns:
    """The ``task_options`` every image task has: which columns hold the images and labels, and their size.
    Image tasks' options dataclasses derive from it."""

    image_column: str = "image"
    label_column: str = "label"
    image_size: int | None = bounded(None, ">=1", "null keeps the dataset's size")
    """Resize (square) to this side; None keeps the dataset's size."""


def build_image_data(task: Task, *, image_size: int | None = None, mean: float = 0.5, std: float = 0.5,
                     extra_columns: dict[str, str] | None = None) -> tuple[TaskData, ImageDataInfo]:
    """Load ``task``'s dataset (``data.*`` of the recipe) as batches of ``pixel_values`` (B, C, S, S), equal
    to ``(pixels / 255 - mean) / std`` (the defaults give [-1, 1]), and ``labels`` (B,). The columns and the
    side come from ``task.options`` (an :class:`ImageColumns`); ``image_size`` overrides the side. Each column
    of ``extra_columns`` (integer columns, e.g. a CycleGAN domain, each mapped to the task option that names
    it) comes along as a (B,) tensor of the column's name.

    Raises:
        ValueError: a column the dataset does not have (the message lists the columns it has).
    """
    columns: ImageColumns = task.options
    image_column, label_column = columns.image_column, columns.label_column
    image_size = image_size or columns.image_size
    cfg = task.config.data
    dataset = task.load_dataset()
    train = dataset[cfg.train_split]
    extra_columns = extra_columns or {}
    options = {image_column: "image_column / label_column", label_column: "image_column / label_column", **extra_columns}
    for column, option in options.items():
        if column not in train.column_names:
            raise ConfigError(f"dataset {cfg.dataset!r} has no column {column!r} (columns: "
                             f"{', '.join(train.column_names)}); set task_options.{option}")
    feature = train.features[label_column]
    label_names = list(feature.names) if hasattr(feature, "names") else [str(v) for v in sorted(set(train[label_column]))]
    first = train[0][image_column]
    mode = "L" if first.mode in ("L", "1", "I", "I;16", "F") else "RGB"
    info = ImageDataInfo(label_names=label_names, mode=mode, channels=1 if mode == "L" else 3,
                         size=image_size or first.size[0])

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        pixels = []
        for image in batch[image_column]:
            image = image.convert(info.mode)
            if image.size != (info.size, info.size):
                image = image.resize((info.size, info.size))
            array = np.asarray(image, dtype=np.float32).reshape(info.size, info.size, info.channels) / 255.0
            pixels.append(torch.from_numpy((array - mean) / std).permute(2, 0, 1))
        extra = {column: [torch.tensor(int(v)) for v in batch[column]] for column in extra_columns}
        return {"pixel_values": pixels, "labels": [torch.tensor(int(y)) for y in batch[label_column]], **extra}

    eval_set = dataset[cfg.eval_split].with_transform(transform) if cfg.eval_split is not None else None
    return TaskData(train=train.with_transform(transform), eval=eval_set), info


def check_evaluator(folder: str | None) -> None:
    """``task_options.evaluator``, when set, must be an ``image-classification`` artifact: a ConfigError naming it."""
    if folder and not (Path(folder) / "hfx_preprocessing.json").is_file():
        raise ConfigError(f"task_options.evaluator {folder!r} is not an image-classification artifact "
                          "(no hfx_preprocessing.json)")


def trained_classifier(task: Task):
    """The classifier of ``task.options.evaluator``, loaded on first use onto the task's device and kept."""
    from hfx.metrics.classifier import TrainedImageClassifier

    if getattr(task, "_evaluator", None) is None:
        task._evaluator = TrainedImageClassifier(task.options.evaluator)
        task._evaluator.model.to(task.accelerator.device)
    return task._evaluator


def to_pil_images(pixels: torch.Tensor) -> list:
    """(B, C, H, W) tensors in [-1, 1] -> PIL images (mode ``L`` for one channel, ``RGB`` for three)."""
    from PIL import Image

    array = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in array]


def image_grid(pixels: torch.Tensor, rows: int):
    """(rows * cols, C, H, W) in [-1, 1] -> one PIL grid image, row-major."""
    from diffusers.utils import make_image_grid

    images = to_pil_images(pixels)
    return make_image_grid(images, rows=rows, cols=len(images) // rows)


def write_sample_grids(task: Task, grids: dict, step: int) -> None:
    """Save each named PIL grid as ``samples/<name>step-<step>.png`` (``name`` empty or ending in ``-``) and, when
    the run reports to TensorBoard, as an image of that name. Main process only."""
    folder = task.output_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    for name, grid in grids.items():
        grid.save(folder / f"{name}step-{step:07d}.png")
    if "tensorboard" in task.config.log.report_to:
        writer = task.accelerator.get_tracker("tensorboard", unwrap=True)
        for name, grid in grids.items():
            writer.add_image(name.rstrip("-") or "samples", np.asarray(grid.convert("RGB")), step, dataformats="HWC")


# ---------------------------------------------------------------------------------------------- noise schedule
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


@dataclass
class NoiseScheduleOptions:
    num_train_timesteps: int = bounded(1000, ">=1")
    beta_schedule: Literal["linear", "cosine"] = "cosine"
    """``linear``: Ho et al.'s betas 1e-4 .. 0.02; ``cosine``: Nichol & Dhariwal's squared-cosine alphas."""
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"


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
