"""Scoring generated images with a trained image classifier: the evaluator of the class-conditional models.

:class:`TrainedImageClassifier` loads an ``image-classification`` artifact (timm or transformers, with its
``hfx_preprocessing.json``) and gives features and logits for images in [-1, 1]; :class:`ClassSampleScorer`
turns it into "the share of samples asked for class c that the classifier assigns to c".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class TrainedImageClassifier:
    """A classifier saved by the ``image-classification`` task (``final/``), with its preprocessing.

    ``features(pixels)`` and ``logits(pixels)`` take (B, C, H, W) in [-1, 1], the range every hfx
    generator produces, and apply the classifier's own normalisation.
    """

    def __init__(self, folder):
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
