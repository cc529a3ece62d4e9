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


def build_image_data(task: Task, *, image_column: str = "image", label_column: str = "label",
                     image_size: int | None = None, mean: float = 0.5, std: float = 0.5
                     ) -> tuple[TaskData, ImageDataInfo]:
    """Load ``task``'s dataset (``data.*`` of the recipe) as batches of ``pixel_values`` (B, C, S, S), equal
    to ``(pixels / 255 - mean) / std`` (the defaults give [-1, 1]), and ``labels`` (B,).

    Raises:
        ValueError: a column the dataset does not have (the message lists the columns it has).
    """
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
