"""Image datasets as training batches: the one place every image task turns PIL images into tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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
    image_size: int | None = None
    """Resize (square) to this side; None keeps the dataset's size."""


def build_image_data(task: Task, *, image_size: int | None = None, mean: float = 0.5, std: float = 0.5
                     ) -> tuple[TaskData, ImageDataInfo]:
    """Load ``task``'s dataset (``data.*`` of the recipe) as batches of ``pixel_values`` (B, C, S, S), equal
    to ``(pixels / 255 - mean) / std`` (the defaults give [-1, 1]), and ``labels`` (B,). The columns and the
    side come from ``task.options`` (an :class:`ImageColumns`); ``image_size`` overrides the side.

    Raises:
        ValueError: a column the dataset does not have (the message lists the columns it has).
    """
    columns: ImageColumns = task.options
    image_column, label_column = columns.image_column, columns.label_column
    image_size = image_size or columns.image_size
    cfg = task.config.data
    dataset = task.load_dataset()
    train = dataset[cfg.train_split]
    for column in (image_column, label_column):
        if column not in train.column_names:
            raise ValueError(f"dataset {cfg.dataset!r} has no column {column!r} (columns: "
                             f"{', '.join(train.column_names)}); set task_options.image_column / label_column")
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
        return {"pixel_values": pixels, "labels": [torch.tensor(int(y)) for y in batch[label_column]]}

    eval_set = dataset[cfg.eval_split].with_transform(transform) if cfg.eval_split is not None else None
    return TaskData(train=train.with_transform(transform), eval=eval_set), info


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


class TrainedImageClassifier:
    """A classifier saved by the ``image-classification`` task (``final/``), with its preprocessing.

    ``features(pixels)`` and ``logits(pixels)`` take (B, C, H, W) in [-1, 1], the range every hfx
    generator produces, and apply the classifier's own normalisation.
    """

    def __init__(self, folder):
        import json
        from pathlib import Path

        folder = Path(folder)
        prep_file = folder / "hfx_preprocessing.json"
        if not prep_file.is_file():
            raise FileNotFoundError(f"{folder} is not an image-classification artifact (no hfx_preprocessing.json)")
        self.folder = folder
        self.preprocessing = json.loads(prep_file.read_text())
        config = json.loads((folder / "config.json").read_text())
        if "architecture" in config:  # timm's layout
            import timm

            self.model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
            self.is_timm = True
        else:
            import transformers

            self.model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
            self.is_timm = False

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """[-1, 1] pixels -> the classifier's input: ``(pixels / 255 - mean) / std`` of its training."""
        unit = (pixels + 1) / 2
        size = self.preprocessing["image_size"]
        if unit.shape[-1] != size:
            unit = torch.nn.functional.interpolate(unit, size=(size, size), mode="bilinear", antialias=True)
        return (unit - self.preprocessing["mean"]) / self.preprocessing["std"]

    @torch.no_grad()
    def features_and_logits(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalise(pixels)
        if self.is_timm:
            features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
            return features, self.model.get_classifier()(features)
        out = self.model(pixel_values=x, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        return (hidden.flatten(2).mean(-1) if hidden.ndim == 4 else hidden.mean(1)), out.logits


class ClassSampleScorer:
    """Scores a class-conditional generator with a trained classifier (an ``image-classification``
    artifact): the share of samples asked for class c that the classifier assigns to c.

    ``scorer(generate, device)`` calls ``generate(labels)`` with ``per_class`` labels of every class, (N,) on
    ``device``, which must return (N, C, H, W) images in [-1, 1]. The classifier loads on first use.
    """

    def __init__(self, folder, num_classes: int, per_class: int):
        self.folder, self.num_classes, self.per_class = folder, num_classes, per_class
        self.classifier: TrainedImageClassifier | None = None

    def __call__(self, generate, device) -> float:
        if self.classifier is None:
            self.classifier = TrainedImageClassifier(self.folder)
        self.classifier.model.to(device)
        labels = torch.arange(self.num_classes, device=device).repeat_interleave(self.per_class)
        _, logits = self.classifier.features_and_logits(generate(labels))
        return float((logits.argmax(-1) == labels).float().mean())
