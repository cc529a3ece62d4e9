"""The hfx metrics as ``evaluate`` modules, fed with features (not raw images).

``evaluate`` stores what ``add_batch`` receives in an Arrow table and hands ``_compute`` Python lists, so
these modules take what is small: feature vectors, class probabilities, embeddings, saved statistics.
Extract features with :mod:`hfx.metrics.extractors` first. Load a module through the loader
(``evaluate.load(hfx.metrics.module_path("fid"))``, works offline) or use the class directly
(``FrechetInceptionDistance().compute(...)``): the thin scripts under ``evaluate_modules/`` only import
these classes, so both give the same numbers.

Feature sets of different sizes (FID, KID, precision/recall): ``predictions`` and ``references`` may have
different lengths, in ``compute`` and in ``add_batch``; the shorter column is padded with empty rows that
``_compute`` drops. The sizes are reported as ``n_predictions`` and ``n_references``.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
import torch

from hfx.metrics.clip_score import clip_score_from_embeddings
from hfx.metrics.functional import (
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from hfx.metrics.statistics import FeatureStatistics

_CITATION_FID = """@inproceedings{heusel2017gans, title={GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium}, author={Heusel, Martin and others}, booktitle={NeurIPS}, year={2017}}"""
_CITATION_KID = """@inproceedings{binkowski2018demystifying, title={Demystifying MMD GANs},
author={Bi{\\'n}kowski, Miko{\\l}aj and others}, booktitle={ICLR}, year={2018}}"""
_CITATION_IS = """@inproceedings{salimans2016improved, title={Improved Techniques for Training GANs},
author={Salimans, Tim and others}, booktitle={NeurIPS}, year={2016}}"""
_CITATION_PR = """@inproceedings{kynkaanniemi2019improved, title={Improved Precision and Recall Metric for Assessing
Generative Models}, author={Kynk{\\"a}{\\"a}nniemi, Tuomas and others}, booktitle={NeurIPS}, year={2019}}"""
_CITATION_LPIPS = """@inproceedings{zhang2018unreasonable, title={The Unreasonable Effectiveness of Deep Features as
a Perceptual Metric}, author={Zhang, Richard and others}, booktitle={CVPR}, year={2018}}"""
_CITATION_CLIP = """@inproceedings{hessel2021clipscore, title={CLIPScore: A Reference-free Evaluation Metric for
Image Captioning}, author={Hessel, Jack and others}, booktitle={EMNLP}, year={2021}}"""

_VECTOR = datasets.Sequence(datasets.Value("float64"))


def _rows(column) -> np.ndarray | None:
    """Non-empty rows of a feature column as a float64 matrix (None when there are none)."""
    rows = [row for row in column if row is not None and len(row) > 0]
    return np.asarray(rows, dtype=np.float64) if rows else None


def _statistics(value) -> FeatureStatistics | None:
    if value is None or isinstance(value, FeatureStatistics):
        return value
    return FeatureStatistics.load(value)


class _TwoFeatureSets(evaluate.Metric):
    """Shared plumbing of the metrics that compare two feature sets ``[N_p, D]`` and ``[N_r, D]``."""

    def _two_set_info(self, description: str, citation: str, inputs: str) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(description=description, citation=citation, inputs_description=inputs,
                                   features=datasets.Features({"predictions": _VECTOR, "references": _VECTOR}),
                                   reference_urls=["https://github.com/hfx"])

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add generated and/or reference feature rows (either may be missing or shorter).
        """
        predictions = [] if predictions is None else list(predictions)
        references = [] if references is None else list(references)
        length = max(len(predictions), len(references))
        predictions += [None] * (length - len(predictions))
        references += [None] * (length - len(references))
        if length:
            super().add_batch(predictions=predictions, references=references, **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Score the rows added so far plus ``predictions``/``references``; statistics-only calls need no rows.
        """
        if self.writer is None and predictions is None and references is None:  # statistics only, no rows
            return self._compute(predictions=[], references=[], **kwargs)
        return super().compute(predictions=predictions, references=references, **kwargs)

    @staticmethod
    def _report(result: dict, n_predictions: int, n_references: int, extractor: dict | None) -> dict:
        result.update(n_predictions=n_predictions, n_references=n_references)
        if extractor:
            result.update(extractor)
        return result


class FrechetInceptionDistance(_TwoFeatureSets):
    """FID between generated (``predictions``) and reference (``references``) features.

    Compute keyword arguments: ``prediction_statistics`` / ``reference_statistics`` (a
    :class:`FeatureStatistics` or an ``.npz`` path) replace the corresponding features; ``extractor``
    (the extractor's ``describe()``) is copied into the result. Returns ``{"fid", "n_predictions",
    "n_references", ...}``.
    """

    def _info(self):
        return self._two_set_info("Frechet Inception Distance (unbiased covariances, float64 eigenvalue route).",
                                  _CITATION_FID, "predictions, references: feature vectors [N, D] (N may differ)")

    def _compute(self, predictions, references, prediction_statistics=None, reference_statistics=None,
                 extractor=None):
        sides = []
        for rows, stats, name in ((predictions, prediction_statistics, "predictions"),
                                  (references, reference_statistics, "references")):
            stats = _statistics(stats)
            if stats is None:
                features = _rows(rows)
                if features is None:
                    raise ValueError(f"FID needs {name} features or {name.removesuffix('s')}_statistics")
                stats = FeatureStatistics.from_features(features)
            sides.append(stats)
        return self._report({"fid": frechet_distance(*sides)}, sides[0].n, sides[1].n, extractor)


class KernelInceptionDistance(_TwoFeatureSets):
    """KID between generated and reference features: ``{"kid", "kid_std", "n_predictions", "n_references"}``.

    Compute keyword arguments: ``subsets`` (100), ``subset_size`` (1000, lowered to the smaller side),
    ``seed`` (0), ``extractor``.
    """

    def _info(self):
        return self._two_set_info("Kernel Inception Distance: unbiased MMD^2, cubic polynomial kernel, over subsets.",
                                  _CITATION_KID, "predictions, references: feature vectors [N, D] (N may differ)")

    def _compute(self, predictions, references, subsets=100, subset_size=1000, seed=0, extractor=None):
        generated, reference = _rows(predictions), _rows(references)
        if generated is None or reference is None:
            raise ValueError("KID needs both predictions and references features")
        size = min(subset_size, len(generated), len(reference))
        kid = kernel_inception_distance(generated, reference, subsets=subsets, subset_size=size, seed=seed)
        return self._report({"kid": kid.mean, "kid_std": kid.std, "kid_subset_size": size},
                            len(generated), len(reference), extractor)


class PrecisionRecallMetric(_TwoFeatureSets):
    """Improved precision/recall: ``predictions`` generated features, ``references`` real features.

    Compute keyword arguments: ``k`` (3), ``extractor``. Returns ``{"precision", "recall", ...}``.
    """

    def _info(self):
        return self._two_set_info("Improved precision and recall (k-NN manifolds).", _CITATION_PR,
                                  "predictions: generated features [N_g, D]; references: real features [N_r, D]")

    def _compute(self, predictions, references, k=3, extractor=None):
        generated, reference = _rows(predictions), _rows(references)
        if generated is None or reference is None:
            raise ValueError("precision/recall needs both predictions and references features")
        result = precision_recall(reference, generated, k=k)._asdict()
        return self._report(result, len(generated), len(reference), extractor)


class InceptionScore(evaluate.Metric):
    """Inception Score of class probabilities (``predictions`` ``[N, C]``).

    Compute keyword arguments: ``splits`` (10), ``from_logits`` (False: apply softmax first when True),
    ``extractor``. Returns ``{"inception_score", "inception_score_std", "n_predictions"}``.
    """

    def _info(self):
        return evaluate.MetricInfo(description="Inception Score exp(E KL(p(y|x) || p(y))) over splits.",
                                   citation=_CITATION_IS, inputs_description="predictions: class probabilities [N, C]",
                                   features=datasets.Features({"predictions": _VECTOR}))

    def _compute(self, predictions, splits=10, from_logits=False, extractor=None):
        probs = torch.as_tensor(np.asarray(predictions, dtype=np.float64))
        if from_logits:
            probs = probs.softmax(dim=1)
        score = inception_score(probs, splits=splits)
        result = {"inception_score": score.mean, "inception_score_std": score.std, "n_predictions": len(probs)}
        return {**result, **(extractor or {})}


class LearnedPerceptualImagePatchSimilarity(evaluate.Metric):
    """Mean LPIPS between image pairs (``predictions[i]`` vs ``references[i]``, ``[C, H, W]`` in [-1, 1]).

    Images pass through Python lists here: for many or large images use :class:`hfx.metrics.lpips.LPIPS`
    directly. Compute keyword arguments: ``net`` ("alex"), ``trunk_weights``, ``heads`` (local files).
    Returns ``{"lpips", "n_pairs", "lpips_net", "trunk_weights", "heads"}``.
    """

    def _info(self):
        image = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32"))))
        return evaluate.MetricInfo(description="LPIPS perceptual distance between image pairs.",
                                   citation=_CITATION_LPIPS,
                                   inputs_description="predictions, references: images [N, C, H, W] in [-1, 1]",
                                   features=datasets.Features({"predictions": image, "references": image}))

    def _compute(self, predictions, references, net="alex", trunk_weights=None, heads=None):
        from hfx.metrics.lpips import LPIPS

        key = (net, str(trunk_weights), str(heads))
        if getattr(self, "_lpips_key", None) != key:  # building the network is the slow part: reuse it
            self._lpips, self._lpips_key = LPIPS(net, trunk_weights=trunk_weights, heads=heads), key
        distances = self._lpips(torch.tensor(np.asarray(predictions, dtype=np.float32)),
                                torch.tensor(np.asarray(references, dtype=np.float32)))
        return {"lpips": float(distances.double().mean()), "n_pairs": len(distances), **self._lpips.describe()}


class CLIPScoreMetric(evaluate.Metric):
    """Mean CLIP score from embeddings: ``predictions`` image embeddings, ``references`` text embeddings.

    Embed with :class:`hfx.metrics.clip_score.CLIPScore` (or any CLIP). Returns ``{"clip_score", "n_pairs"}``.
    """

    def _info(self):
        return evaluate.MetricInfo(description="CLIP score 100 * max(cos(image, text), 0), averaged over pairs.",
                                   citation=_CITATION_CLIP,
                                   inputs_description="predictions: image embeddings [N, E]; references: text "
                                                      "embeddings [N, E]",
                                   features=datasets.Features({"predictions": _VECTOR, "references": _VECTOR}))

    def _compute(self, predictions, references, extractor=None):
        scores = clip_score_from_embeddings(np.asarray(predictions, dtype=np.float64),
                                            np.asarray(references, dtype=np.float64))
        return {"clip_score": float(scores.mean()), "n_pairs": len(scores), **(extractor or {})}


_CITATION_DINO = """@inproceedings{caron2021emerging, title={Emerging Properties in Self-Supervised Vision Transformers},
author={Caron, Mathilde and others}, booktitle={ICCV}, year={2021}}"""
_CITATION_CLIP_ZS = """@inproceedings{radford2021learning, title={Learning Transferable Visual Models From Natural
Language Supervision}, author={Radford, Alec and others}, booktitle={ICML}, year={2021}}"""
_LABELLED = datasets.Features({"predictions": _VECTOR, "references": datasets.Value("int64")})


class KNNAccuracy(evaluate.Metric):
    """k-NN accuracy of frozen features, as DINO's ``eval_knn``: ``predictions`` test features, ``references``
    their labels; ``train_features`` / ``train_labels`` the labelled pool (passed to ``compute``), ``k`` (20) and
    ``temperature`` (0.07). Returns ``{"knn_accuracy", "k", "temperature", "n_train", "n_test"}``."""

    def _info(self):
        return evaluate.MetricInfo(description="Weighted k-NN (cosine, votes exp(sim / T)) top-1 accuracy.",
                                   citation=_CITATION_DINO, features=_LABELLED,
                                   inputs_description="predictions: test features [N, D]; references: labels [N]; "
                                                      "train_features [M, D], train_labels [M] as compute options")

    def _compute(self, predictions, references, train_features=None, train_labels=None, k=20, temperature=0.07):
        from hfx.metrics.representation import knn_accuracy

        if train_features is None or train_labels is None:
            raise ValueError("knn_accuracy needs train_features and train_labels (the labelled pool)")
        accuracy = knn_accuracy(np.asarray(train_features, dtype=np.float64), np.asarray(train_labels),
                                np.asarray(predictions, dtype=np.float64), np.asarray(references), k, temperature)
        return {"knn_accuracy": accuracy, "k": k, "temperature": temperature, "n_train": len(train_labels),
                "n_test": len(references)}


class LinearProbeAccuracy(evaluate.Metric):
    """Linear-probe accuracy of frozen features: a logistic regression fitted on ``train_features`` /
    ``train_labels`` (compute options) and scored on ``predictions`` (test features) / ``references`` (labels).
    Returns ``{"linear_probe_accuracy", "c", "n_train", "n_test"}``."""

    def _info(self):
        return evaluate.MetricInfo(description="Accuracy of a logistic regression on standardised frozen features.",
                                   citation=_CITATION_DINO, features=_LABELLED,
                                   inputs_description="predictions: test features [N, D]; references: labels [N]; "
                                                      "train_features [M, D], train_labels [M] as compute options")

    def _compute(self, predictions, references, train_features=None, train_labels=None, c=1.0):
        from hfx.metrics.representation import linear_probe_accuracy

        if train_features is None or train_labels is None:
            raise ValueError("linear_probe needs train_features and train_labels (the labelled pool)")
        accuracy = linear_probe_accuracy(np.asarray(train_features, dtype=np.float64), np.asarray(train_labels),
                                         np.asarray(predictions, dtype=np.float64), np.asarray(references), c)
        return {"linear_probe_accuracy": accuracy, "c": c, "n_train": len(train_labels), "n_test": len(references)}


class ZeroShotAccuracy(evaluate.Metric):
    """Zero-shot classification accuracy of an image-text model: ``predictions`` image embeddings, ``references``
    labels, ``class_text_features`` (compute option) the text embeddings of each class, (C, D) or (C, P, D) for a
    prompt ensemble (averaged per class). Returns ``{"zero_shot_accuracy", "n_classes", "n_prompts", "n_images"}``."""

    def _info(self):
        return evaluate.MetricInfo(description="Accuracy of the class whose (ensembled) text embedding is nearest.",
                                   citation=_CITATION_CLIP_ZS, features=_LABELLED,
                                   inputs_description="predictions: image embeddings [N, D]; references: labels [N]; "
                                                      "class_text_features [C, D] or [C, P, D] as a compute option")

    def _compute(self, predictions, references, class_text_features=None):
        from hfx.metrics.representation import zero_shot_accuracy

        if class_text_features is None:
            raise ValueError("zero_shot_accuracy needs class_text_features: (C, D) or (C, P, D) text embeddings")
        texts = np.asarray(class_text_features, dtype=np.float64)
        accuracy = zero_shot_accuracy(np.asarray(predictions, dtype=np.float64), np.asarray(references), texts)
        return {"zero_shot_accuracy": accuracy, "n_classes": texts.shape[0],
                "n_prompts": texts.shape[1] if texts.ndim == 3 else 1, "n_images": len(references)}
