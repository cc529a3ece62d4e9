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
from hfx.trainers.tasks._image_tasks import ImageColumns, build_image_data
from hfx.trainers.tasks.base import Task, TaskData

logger = logging.getLogger(__name__)


@dataclass
class FrozenFeatureOptions(ImageColumns):
    """The ``task_options`` of every task whose frozen features are evaluated: the images' normalisation and the
    k-NN / probe settings of :func:`representation_metrics`."""

    mean: float = 0.5
    std: float = bounded(0.5, ">0")
    knn_k: int = bounded(20, ">=1")
    knn_temperature: float = bounded(0.07, ">0")
    few_labels: int = bounded(10, ">=1")
    """Labelled train images per class in the few-labels evaluation."""
    eval_batch_size: int = bounded(256, ">=1")


@dataclass
class RepresentationOptions(FrozenFeatureOptions):
    """The ``task_options`` of the tasks that train a timm backbone (their options dataclasses derive from this)."""

    backbone: str = "timm:vit_tiny_patch16_224"
    """``timm:<name>``: the encoder, built with ``num_classes=0`` (it returns pooled features)."""
    backbone_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of ``timm.create_model`` (``img_size``, ``patch_size``, ``embed_dim``, ``depth`` ...)."""


def representation_data(task: Task) -> TaskData:
    """``task``'s images as batches (:func:`build_image_data` with its ``mean`` / ``std``); keeps ``task.info`` and the
    unaugmented ``task.train_set`` / ``task.eval_set`` that the frozen-feature evaluation embeds (views are drawn on
    the batch). A ConfigError when there is no eval split."""
    data, task.info = build_image_data(task, mean=task.options.mean, std=task.options.std)
    if data.eval is None:
        raise ConfigError(f"task {task.name} evaluates frozen features on data.eval_split: set it (e.g. 'test')")
    task.train_set, task.eval_set = data.train, data.eval
    return data


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
                       output_dir, extra_config: dict[str, Any] | None = None,
                       data_config: dict[str, Any] | None = None) -> None:
    """Write the backbone as timm's Hub layout (``config.json`` + ``model.safetensors``), loadable without hfx by
    ``timm.create_model("local-dir:<dir>", pretrained=True)`` (``hf-hub:<repo>`` once pushed). ``data_config``
    (``input_size``, ``mean``, ``std``, ...) is the preprocessing ``timm.data.resolve_data_config`` then gives."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(output_dir / "model.safetensors"))
    save_config_for_hf(backbone, str(output_dir / "config.json"), model_args=model_args,
                       model_config=extra_config or {}, data_config=data_config)


# ================================================================================== the two-view contrastive tasks
@dataclass
class ContrastiveOptions(RepresentationOptions):
    """The ``task_options`` of the two-view contrastive tasks (``simclr``, ``moco``): the loss temperature, the
    projection head and the views."""

    temperature: float = bounded(0.5, ">0")
    """Softmax temperature of the contrastive loss."""
    projection_dim: int = bounded(128, ">=1")
    """Output size of the projection head (the space the loss compares in)."""
    projection_hidden_dim: int = bounded(512, ">=1")
    projection_layers: int = bounded(2, ">=1")
    """Linear layers of the projection head (1: a linear map; SimCLR and MoCo v2: 2)."""
    projection_batch_norm: bool = True
    """BatchNorm after each hidden layer of the head (SimCLR's; MoCo v2's head has none)."""
    crop_scale: tuple[float, float] = bounded((0.4, 1.0), "(0,1]")
    """Area fraction of the random resized crop of each view (low, high)."""
    max_rotation: float = bounded(15.0, ">=0")
    """Degrees of random rotation of each view, either way."""
    jitter: float = bounded(0.4, "[0,1)")
    """Brightness and contrast jitter of each view."""

    def __post_init__(self):
        low, high = self.crop_scale
        if low > high:
            raise ConfigError(f"task_options.crop_scale must be (low, high) with low <= high, got {list(self.crop_scale)}")


class ProjectionHead(torch.nn.Sequential):
    """SimCLR's projection g(.) (MoCo v2's MLP head): ``num_layers - 1`` times [Linear, BatchNorm1d (if
    ``batch_norm``), ReLU], then a Linear to ``out_features``. (B, in_features) -> (B, out_features). It is
    trained with the backbone and dropped afterwards: the representation is the backbone's output."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, num_layers: int = 2,
                 batch_norm: bool = True):
        layers, width = [], in_features
        for _ in range(num_layers - 1):
            layers.append(torch.nn.Linear(width, hidden_features, bias=not batch_norm))
            if batch_norm:
                layers.append(torch.nn.BatchNorm1d(hidden_features))
            layers.append(torch.nn.ReLU(inplace=True))
            width = hidden_features
        layers.append(torch.nn.Linear(width, out_features))
        super().__init__(*layers)


def feature_dim(backbone: torch.nn.Module, options: RepresentationOptions, channels: int, size: int) -> int:
    """D of the backbone's (B, D) features for ``size`` x ``size`` images of ``channels`` channels, from one forward
    in eval mode (no RNG drawn, no statistics updated). A backbone that cannot take such images is a ConfigError."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(2, channels, size, size))
    except Exception as err:
        hint = f" (a ViT needs task_options.backbone_options.img_size: {size})" if "vit" in options.backbone else ""
        raise ConfigError(f"task_options.backbone {options.backbone!r} cannot take {size}x{size} images with "
                          f"{channels} channel(s){hint}: {_first_line(err)}") from None
    finally:
        backbone.train(was_training)
    if not torch.is_tensor(out) or out.ndim != 2:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(f"task_options.backbone {options.backbone!r} returns {shape}, not pooled (B, D) features")
    return int(out.shape[1])


@torch.no_grad()
def momentum_update(target: torch.nn.Module, source: torch.nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * source``, parameter by parameter: MoCo's key encoder (a
    teacher of BYOL or DINO the same way). Buffers (BatchNorm statistics) stay the target's own, as in MoCo."""
    targets, sources = list(target.parameters()), [p.detach() for p in source.parameters()]
    if len(targets) != len(sources):
        raise ValueError(f"momentum_update: the target has {len(targets)} parameters, the source {len(sources)}")
    torch._foreach_lerp_(targets, sources, 1.0 - momentum)


class ContrastiveTask(Task):
    """What ``simclr`` and ``moco`` share: the images, a timm backbone with a projection head (models ``backbone``
    and ``projection_head``), the views, the frozen-feature evaluation plus the loss on fixed views of the eval
    split, and the artifact: the backbone alone, as a plain timm model. A subclass writes :meth:`view_loss`."""

    Options = ContrastiveOptions
    hub_task_type = "image-feature-extraction"
    eval_seed = 60_000
    #: The method's name in the model card.
    method_name: str = ""

    def build_data(self) -> TaskData:
        return representation_data(self)

    def build_encoder(self) -> dict[str, torch.nn.Module]:
        """The query encoder: ``{"backbone": timm model, "projection_head": ProjectionHead}``."""
        opts, info = self.options, self.info
        backbone = build_backbone(opts, info.channels)
        self.feature_dim = feature_dim(backbone, opts, info.channels, info.size)
        self.model_args = {"in_chans": info.channels, "num_classes": 0, **opts.backbone_options}
        self.num_parameters = sum(p.numel() for p in backbone.parameters())
        head = ProjectionHead(self.feature_dim, opts.projection_hidden_dim, opts.projection_dim, opts.projection_layers,
                              opts.projection_batch_norm)
        return {"backbone": backbone, "projection_head": head}

    def views(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One random view of each image (:func:`random_views` with the task's options; the background fill is the
        normalised 0)."""
        opts = self.options
        return random_views(pixels, self.info.size, tuple(opts.crop_scale), opts.max_rotation, opts.jitter,
                            fill=-opts.mean / opts.std, generator=generator)

    def view_loss(self, models: dict[str, torch.nn.Module], pixels: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """The method's loss on two views of ``pixels`` drawn from ``generator`` (None: the global RNG), without
        changing any task state: what the evaluation reports on the eval split. Each method (``simclr``,
        ``moco``) implements it; the base class has no loss of its own."""
        raise NotImplementedError(f"{type(self).__name__} must implement view_loss")

    @torch.no_grad()
    def evaluate(self, models, loader, state) -> dict[str, float]:
        backbone = self.accelerator.unwrap_model(models["backbone"])
        metrics = representation_metrics(self, backbone, self.train_set, self.eval_set)
        plain = {name: self.accelerator.unwrap_model(model) for name, model in models.items()}
        total = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)
        for index, batch in enumerate(loader):
            pixels = batch["pixel_values"]
            loss = self.view_loss(plain, pixels, self.eval_generator(pixels.device, index))
            total += torch.stack([loss.double() * len(pixels), torch.tensor(float(len(pixels)), dtype=torch.float64, device=total.device)])
        total = self.accelerator.reduce(total, "sum")
        if total[1] > 0:
            metrics["loss"] = float(total[0] / total[1])
        return metrics

    def save(self, models, state_dicts, output_dir) -> None:
        """The backbone only (the projection head is dropped), in timm's Hub layout, with the preprocessing in
        its ``pretrained_cfg`` (``timm.data.resolve_data_config`` gives it back)."""
        opts, info = self.options, self.info
        data_config = {"input_size": (info.channels, info.size, info.size), "mean": (opts.mean,) * info.channels,
                       "std": (opts.std,) * info.channels, "crop_pct": 1.0}
        save_timm_backbone(models["backbone"], state_dicts["backbone"], self.model_args, output_dir,
                           extra_config={"hfx_method": self.name}, data_config=data_config)

    def method_summary(self) -> str:
        """One sentence on how the backbone was trained (the card's summary continues from it)."""
        return ""

    def card_facts(self, metrics: dict[str, float]) -> dict[str, Any]:
        opts, info = self.options, self.info
        summary = (f"A `{opts.backbone}` backbone ({self.num_parameters / 1e6:.2f} M parameters, {self.feature_dim}-d "
                   f"features) trained from scratch with {self.method_name} on {info.size}x{info.size} "
                   f"{'greyscale' if info.channels == 1 else 'RGB'} images, without labels. {self.method_summary()} "
                   "The projection head is dropped: the artifact is the plain timm backbone (num_classes=0, pooled "
                   f"features). Inputs: pixels / 255, then (x - {opts.mean}) / {opts.std}. The metrics are of its "
                   f"frozen features: weighted k-NN (k={opts.knn_k}) and a linear probe with every train label, and "
                   f"with {opts.few_labels} labels per class; feature_std is the collapse monitor (about 1 healthy, "
                   "0 collapsed).")
        return {"summary": summary, "pipeline_tag": "image-feature-extraction"}
