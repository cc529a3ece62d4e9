"""What the representation-learning tasks share (``simclr``, ``moco``, ``dino``, ``mae``, ``contrastive``): the
backbone, the augmented views, and the evaluation of frozen features (k-NN, linear probe, collapse monitor).

Views are drawn on the batch, on the training device, from the global torch RNG (which checkpoints restore),
so a resumed run draws the same crops as an uninterrupted one.

The evaluation embeds the WHOLE train and eval splits on every process (the datasets are small; no gather,
every process computes the same numbers) and reports, for the frozen features:

- ``knn_accuracy``: DINO's weighted k-NN (``knn_k``, ``knn_temperature``) with every train label;
- ``linear_probe_accuracy``: a logistic regression on them;
- ``knn_accuracy_<n>_per_class`` / ``linear_probe_accuracy_<n>_per_class``: the same with ``few_labels`` labelled
  train images per class (the few-labels regime);
- ``feature_std``: :func:`hfx.metrics.representation.feature_std` of the test features (about 1 healthy, 0
  collapsed); below :data:`~hfx.metrics.representation.COLLAPSE_THRESHOLD` the run logs a warning and
  ``collapsed`` is 1, so a collapse is reported, not discovered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hfx.trainers.config import bounded
from hfx.trainers.errors import ConfigError
from hfx.trainers.tasks._image_tasks import ImageColumns
from hfx.trainers.tasks.base import Task

logger = logging.getLogger(__name__)


@dataclass
class RepresentationOptions(ImageColumns):
    """The ``task_options`` every representation task has (its own options dataclass derives from this)."""

    backbone: str = "timm:vit_tiny_patch16_224"
    """``timm:<name>``: the encoder, built with ``num_classes=0`` (it returns pooled features)."""
    backbone_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``timm.create_model`` (``img_size``, ``patch_size``, ``embed_dim``, ``depth`` ...)."""
    mean: float = 0.5
    std: float = bounded(0.5, ">0")
    knn_k: int = bounded(20, ">=1")
    knn_temperature: float = bounded(0.07, ">0")
    few_labels: int = bounded(10, ">=1")
    """Labelled train images per class in the few-labels evaluation."""
    eval_batch_size: int = bounded(256, ">=1")


#: ``backbone_options`` a recipe may not set, and why.
FROM_TASK = {"in_chans": "it comes from the data (the images' channels)",
             "num_classes": "the backbone returns pooled features (num_classes=0); the task adds its own head",
             "pretrained": "the backbone is trained from scratch"}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def build_backbone(options: RepresentationOptions, channels: int) -> torch.nn.Module:
    """``timm.create_model(<name>, in_chans=channels, num_classes=0, **backbone_options)``; a ConfigError naming
    ``task_options.backbone`` for anything else."""
    import timm

    if not options.backbone.startswith("timm:"):
        raise ConfigError(f"task_options.backbone {options.backbone!r} must be 'timm:<name>'")
    name = options.backbone[len("timm:"):]
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        raise ConfigError(f"task_options.backbone {options.backbone!r}: timm has no model {name!r}"
                          + (f"; did you mean 'timm:{close[0]}'?" if close else ""))
    for key in FROM_TASK:
        if key in options.backbone_options:
            raise ConfigError(f"task_options.backbone_options.{key} cannot be set: {FROM_TASK[key]}")
    try:
        return timm.create_model(name, pretrained=False, in_chans=channels, num_classes=0, **options.backbone_options)
    except Exception as err:  # timm raises TypeError, ValueError, AssertionError ... for arguments it cannot take
        raise ConfigError(f"task_options.backbone_options {options.backbone_options!r} do not make a "
                          f"{options.backbone!r}: {_first_line(err)}") from None


def random_views(pixels: torch.Tensor, size: int, scale: tuple[float, float] = (0.4, 1.0),
                 max_rotation: float = 15.0, jitter: float = 0.4, fill: float = -1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One augmented view of each image of ``pixels`` (B, C, H, W), resampled to ``size`` x ``size``: a random
    resized crop (area fraction in ``scale``, aspect ratio 3/4..4/3) with a rotation of up to ``max_rotation``
    degrees, then brightness and contrast jitter of up to ``jitter``. No flips (digits are not symmetric).
    Uncovered pixels take ``fill`` (the normalised background). Draws from the global torch RNG, or from
    ``generator`` (on ``pixels``' device) when given: an evaluation's fixed views."""
    b, device = pixels.shape[0], pixels.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, device=device, generator=generator) * (hi - lo) + lo

    area = uniform(*scale)
    log_ratio = uniform(-0.2877, 0.2877)  # ln(3/4) .. ln(4/3)
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx, ty = uniform(-1, 1) * (1 - sx), uniform(-1, 1) * (1 - sy)
    angle = uniform(-max_rotation, max_rotation) * (torch.pi / 180)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([sx * cos, -sy * sin, tx], 1), torch.stack([sx * sin, sy * cos, ty], 1)], 1)
    grid = F.affine_grid(theta, [b, pixels.shape[1], size, size], align_corners=False)
    views = F.grid_sample(pixels - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    brightness = uniform(-jitter, jitter)[:, None, None, None]
    contrast = (1 + uniform(-jitter, jitter))[:, None, None, None]
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    return (views - mean) * contrast + mean + brightness


@torch.no_grad()
def embed(encode: Callable[[torch.Tensor], torch.Tensor], dataset, batch_size: int, device) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """``encode`` over every example of ``dataset`` (items with ``pixel_values`` and ``labels``), in order.
    Returns (features (N, D) float32 on the CPU, labels (N,))."""
    features, labels = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        pixels = torch.stack([item["pixel_values"] for item in items]).to(device)
        features.append(encode(pixels).float().flatten(1).cpu())
        labels.append(torch.stack([torch.as_tensor(item["labels"]) for item in items]))
    return torch.cat(features), torch.cat(labels)


def representation_metrics(task: Task, encode: Callable[[torch.Tensor], torch.Tensor], train_set, eval_set
                           ) -> dict[str, float]:
    """The frozen-feature metrics of the module docstring for ``encode`` (pixels -> features) on the task's train
    and eval datasets (unaugmented)."""
    from hfx.metrics.representation import (
        COLLAPSE_THRESHOLD,
        feature_std,
        knn_accuracy,
        labels_per_class,
        linear_probe_accuracy,
    )

    opts, device = task.options, task.accelerator.device
    train_x, train_y = embed(encode, train_set, opts.eval_batch_size, device)
    test_x, test_y = embed(encode, eval_set, opts.eval_batch_size, device)
    std = feature_std(test_x)
    metrics = {"feature_std": std, "collapsed": float(std < COLLAPSE_THRESHOLD)}
    if std < COLLAPSE_THRESHOLD:
        logger.warning("the features have collapsed: feature_std %.4f < %.2f (every input maps to nearly the same "
                       "point); lower the learning rate or check the augmentations", std, COLLAPSE_THRESHOLD)
    if not torch.isfinite(train_x).all() or not torch.isfinite(test_x).all():
        logger.warning("the features hold NaN or inf: no k-NN or probe accuracy")
        return metrics
    few = labels_per_class(train_y, opts.few_labels, seed=task.config.seed)
    for suffix, index in (("", slice(None)), (f"_{opts.few_labels}_per_class", torch.as_tensor(few))):
        x, y = train_x[index], train_y[index]
        metrics[f"knn_accuracy{suffix}"] = knn_accuracy(x, y, test_x, test_y, opts.knn_k, opts.knn_temperature)
        metrics[f"linear_probe_accuracy{suffix}"] = linear_probe_accuracy(x, y, test_x, test_y)
    return metrics


def save_timm_backbone(backbone: torch.nn.Module, state_dict: dict[str, torch.Tensor], model_args: dict[str, Any],
                       output_dir, extra_config: dict[str, Any] | None = None) -> None:
    """Write the backbone as timm's Hub layout (``config.json`` + ``model.safetensors``), loadable without hfx by
    ``timm.create_model("local-dir:<dir>", pretrained=True)`` (``hf-hub:<repo>`` once pushed)."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(output_dir / "model.safetensors"))
    save_config_for_hf(backbone, str(output_dir / "config.json"), model_args=model_args,
                       model_config=extra_config or {})
