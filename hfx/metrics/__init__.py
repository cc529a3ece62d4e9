"""Generative-model metrics: FID, KID, Inception Score, precision/recall, LPIPS, CLIP score, divergences; and
metrics of representations: k-NN and linear-probe accuracy, zero-shot accuracy, the collapse monitor
(:mod:`~hfx.metrics.representation`).

Layers, bottom up: :mod:`~hfx.metrics.functional` and :mod:`~hfx.metrics.divergences` (pure float64 math
on features), :mod:`~hfx.metrics.statistics` (streaming, mergeable moments), :mod:`~hfx.metrics.extractors`
(images -> features), :mod:`~hfx.metrics.lpips` and :mod:`~hfx.metrics.clip_score` (image-pair and
image-text scores), :mod:`~hfx.metrics.modules` (the same as ``evaluate`` modules; load them with
``evaluate.load(hfx.metrics.module_path("fid"))``) and :mod:`~hfx.metrics.scoring` (images -> full report,
what ``hfx evaluate`` prints). Per-image measures: :mod:`~hfx.metrics.strokes` (stroke width) and
:mod:`~hfx.metrics.attributes` (a drawn digit's size, position and thickness, the ``digits-captions`` attributes:
:data:`DIGIT_ATTRIBUTES`).

Example::

    from hfx.metrics import FeatureStatistics, frechet_distance
    from hfx.metrics.extractors import InceptionFeatureExtractor

    inception = InceptionFeatureExtractor("pt_inception-2015-12-05-6726825d.pth")  # a local file
    generated = FeatureStatistics(2048)
    for images in loader:                       # uint8 [B, C, H, W], or floats in [0, 1]
        generated.update(inception(images)["features"])
    fid = frechet_distance(generated, FeatureStatistics.load("cifar10-train.npz"))
    print(fid, generated.n, inception.describe())   # FID means little without N and the extractor
"""

from __future__ import annotations

from pathlib import Path

from hfx.metrics.attributes import (
    DIGIT_ATTRIBUTES,
    measure_position,
    measure_size,
    measure_thickness,
)
from hfx.metrics.divergences import (
    empirical_distributions,
    js_divergence,
    kl_divergence,
    total_variation,
    wasserstein_1d,
)
from hfx.metrics.functional import (
    MeanStd,
    PrecisionRecall,
    frechet_distance,
    frechet_distance_from_statistics,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from hfx.metrics.representation import (
    feature_std,
    knn_accuracy,
    labels_per_class,
    linear_probe_accuracy,
    zero_shot_accuracy,
)
from hfx.metrics.statistics import FeatureStatistics
from hfx.metrics.strokes import stroke_width

#: Per-image measures that tell two image domains apart (CycleGAN's ``domain_measure``): images (B, C, H, W)
#: in [-1, 1] -> (B,) numbers.
DOMAIN_MEASURES = {"stroke_width": stroke_width}

EVALUATE_MODULES = ("fid", "kid", "inception_score", "precision_recall", "lpips", "clip_score", "knn_accuracy",
                    "linear_probe", "zero_shot_accuracy")


def module_path(name: str) -> str:
    """Folder of the ``evaluate`` module ``name`` (one of :data:`EVALUATE_MODULES`), for ``evaluate.load``."""
    if name not in EVALUATE_MODULES:
        raise ValueError(f"unknown metric module {name!r}; choose from {', '.join(EVALUATE_MODULES)}")
    return str(Path(__file__).parent / "evaluate_modules" / name)


__all__ = [
    "DIGIT_ATTRIBUTES",
    "DOMAIN_MEASURES",
    "EVALUATE_MODULES",
    "FeatureStatistics",
    "MeanStd",
    "PrecisionRecall",
    "empirical_distributions",
    "feature_std",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "inception_score",
    "js_divergence",
    "kernel_inception_distance",
    "kl_divergence",
    "knn_accuracy",
    "labels_per_class",
    "linear_probe_accuracy",
    "measure_position",
    "measure_size",
    "measure_thickness",
    "module_path",
    "precision_recall",
    "stroke_width",
    "total_variation",
    "wasserstein_1d",
    "zero_shot_accuracy",
]
