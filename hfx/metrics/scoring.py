"""From images to a full report: extract features once, then FID, KID, IS and precision/recall with N.

This is what ``hfx evaluate`` runs. The reference side may be images or a saved ``.npz`` (statistics,
and features when saved by :meth:`ExtractedFeatures.save`), so a dataset is featurised only once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hfx.metrics.extractors import FeatureExtractor, to_pixels
from hfx.metrics.functional import (
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from hfx.metrics.statistics import FeatureStatistics


@dataclass
class ExtractedFeatures:
    """Features ``[N, D]`` (float32) and, for a classifier extractor, logits ``[N, C]`` of one image set."""

    features: np.ndarray
    logits: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.features)

    def statistics(self) -> FeatureStatistics:
        return FeatureStatistics.from_features(self.features)

    def save(self, path: str | os.PathLike) -> Path:
        """One ``.npz`` with the statistics (pytorch-fid compatible ``mu``/``sigma`` too) and the features."""
        extra = {"features": self.features} | ({"logits": self.logits} if self.logits is not None else {})
        return self.statistics().save(path, **extra)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExtractedFeatures | FeatureStatistics:
        """The features saved in ``path``, or only its statistics when it holds no features."""
        statistics = FeatureStatistics.load(path)
        with np.load(path, allow_pickle=False) as data:
            if "features" not in data.files:
                return statistics
            return cls(data["features"], data["logits"] if "logits" in data.files else None)


def _batches(images, batch_size: int) -> Iterator[list]:
    batch = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _one_image(image) -> torch.Tensor:
    """A PIL image, ``[H, W(, C)]`` array or ``[C, H, W]`` tensor as ``[1, C, H, W]`` in [0, 1]."""
    if hasattr(image, "convert"):
        return to_pixels([image])
    return to_pixels(image[None])


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: Iterable, batch_size: int = 64,
                     total: int | None = None, description: str = "features") -> ExtractedFeatures:
    """Run ``extractor`` over ``images`` (an iterable of PIL images, ``[H, W(, C)]`` arrays or ``[C, H, W]``
    tensors; sizes may differ) in batches, with a progress bar."""
    features, logits = [], []
    total = total if total is not None else (len(images) if hasattr(images, "__len__") else None)
    with tqdm(total=total, desc=description, unit="img", disable=total is not None and total < batch_size) as bar:
        for batch in _batches(images, batch_size):
            pixels = [_one_image(image) for image in batch]
            if len({tuple(p.shape[1:]) for p in pixels}) == 1:
                outputs = [extractor(torch.cat(pixels))]
            else:  # mixed sizes cannot be stacked before the extractor's resize
                outputs = [extractor(p) for p in pixels]
            features += [o["features"].cpu() for o in outputs]
            logits += [o["logits"].cpu() for o in outputs if "logits" in o]
            bar.update(len(batch))
    if not features:
        raise ValueError("no images to extract features from")
    return ExtractedFeatures(torch.cat(features).numpy(), torch.cat(logits).numpy() if logits else None)


def generative_scores(generated: ExtractedFeatures, reference: ExtractedFeatures | FeatureStatistics,
                      extractor: dict | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
                      k: int = 3, is_splits: int = 10) -> dict[str, object]:
    """FID, KID, IS (when the extractor gives logits) and precision/recall, with both sample sizes.

    A statistics-only reference allows FID alone; the report says which scores were skipped and why.
    ``extractor`` (its ``describe()``) is copied into the report: the scores mean nothing without it.
    """
    reference_stats = reference if isinstance(reference, FeatureStatistics) else reference.statistics()
    report: dict[str, object] = {"n_generated": len(generated), "n_reference": reference_stats.n}
    report["fid"] = frechet_distance(generated.statistics(), reference_stats)
    skipped = []
    if isinstance(reference, ExtractedFeatures):
        size = min(kid_subset_size, len(generated), len(reference))
        kid = kernel_inception_distance(generated.features, reference.features, subsets=kid_subsets,
                                        subset_size=size)
        report.update(kid=kid.mean, kid_std=kid.std, kid_subset_size=size)
        report.update(precision_recall(reference.features, generated.features, k=k)._asdict())
    else:
        skipped.append("kid, precision, recall: the reference .npz holds statistics only, no features")
    if generated.logits is not None:
        score = inception_score(torch.from_numpy(generated.logits).double().softmax(dim=1),
                                splits=min(is_splits, len(generated)))
        report.update(inception_score=score.mean, inception_score_std=score.std)
    else:
        skipped.append("inception_score: the extractor has no classifier logits")
    if skipped:
        report["skipped"] = skipped
    report.update(extractor or {})
    return report
