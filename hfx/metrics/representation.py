"""How good frozen features are: k-NN accuracy (DINO's ``eval_knn``), a linear probe, zero-shot accuracy from
text embeddings, the few-labels subsets the measured tables use, and the collapse monitor.

All take features as tensors or arrays (N, D) and labels (N,) and return plain floats; nothing is trained
here except the probe's logistic regression, which is deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _tensor(x) -> torch.Tensor:
    return (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).detach().cpu()


def _check(features, labels, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = _tensor(features).double(), _tensor(labels).long()
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels) or len(labels) == 0:
        raise ValueError(f"{name}: features must be (N, D) and labels (N,) with N >= 1, got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name}: features hold NaN or inf (a diverged or collapsed model?)")
    return features, labels


def knn_predict(train_features, train_labels, test_features, k: int = 20, temperature: float = 0.07,
                num_classes: int | None = None) -> torch.Tensor:
    """Weighted k-NN on cosine similarity, as DINO's ``knn_classifier``: each of the ``k`` nearest training
    features votes for its class with weight ``exp(similarity / temperature)``. Returns the (M,) predicted labels."""
    train, train_labels = _check(train_features, train_labels, "train")
    test = _tensor(test_features).double()
    if test.ndim != 2 or test.shape[1] != train.shape[1]:
        raise ValueError(f"test features must be (M, {train.shape[1]}), got {tuple(test.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train))
    similarity = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    top, index = similarity.topk(k, dim=1)
    votes = torch.zeros(len(test), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, train_labels[index], (top / temperature).exp())
    return votes.argmax(1)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k: int = 20,
                 temperature: float = 0.07) -> float:
    """Top-1 accuracy of :func:`knn_predict` (DINO reports k = 20, temperature 0.07)."""
    test, test_labels = _check(test_features, test_labels, "test")
    num_classes = int(max(_tensor(train_labels).max(), test_labels.max())) + 1
    predicted = knn_predict(train_features, train_labels, test, k, temperature, num_classes)
    return float((predicted == test_labels).double().mean())


def linear_probe_accuracy(train_features, train_labels, test_features, test_labels, c: float = 1.0,
                          max_iter: int = 2000) -> float:
    """Test accuracy of a multinomial logistic regression (L2, strength ``1 / c``, lbfgs) on standardised frozen
    features: the linear-probe protocol on a small dataset (the features are never fine-tuned)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, train_labels = _check(train_features, train_labels, "train")
    test, test_labels = _check(test_features, test_labels, "test")
    if not c > 0:
        raise ValueError(f"c must be > 0, got {c!r}")
    scaler = StandardScaler().fit(train.numpy())
    probe = LogisticRegression(C=c, max_iter=max_iter)
    probe.fit(scaler.transform(train.numpy()), train_labels.numpy())
    return float((probe.predict(scaler.transform(test.numpy())) == test_labels.numpy()).mean())


def zero_shot_accuracy(image_features, labels, class_text_features) -> float:
    """Accuracy of picking, for each image, the class whose text embedding is the most cosine-similar.

    ``class_text_features`` is (C, D), or (C, P, D) for P prompts per class: a prompt ensemble, whose
    normalised embeddings are averaged (and normalised again) per class, as in CLIP's ImageNet evaluation."""
    images, labels = _check(image_features, labels, "images")
    texts = _tensor(class_text_features).double()
    if texts.ndim == 3:
        texts = F.normalize(F.normalize(texts, dim=-1).mean(1), dim=-1)
    if texts.ndim != 2 or texts.shape[1] != images.shape[1]:
        raise ValueError(f"class_text_features must be (C, {images.shape[1]}) or (C, P, {images.shape[1]}), got "
                         f"{tuple(_tensor(class_text_features).shape)}")
    predicted = (F.normalize(images, dim=1) @ F.normalize(texts, dim=1).T).argmax(1)
    return float((predicted == labels).double().mean())


def labels_per_class(labels, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of ``per_class`` examples of every class (drawn with ``seed``, sorted): the few-labels regime.
    A class with fewer examples gives all it has."""
    labels = np.asarray(_tensor(labels))
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be an int >= 1, got {per_class!r}")
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def feature_std(features) -> float:
    """The collapse monitor: the standard deviation over the batch of the L2-normalised features, averaged over
    dimensions, times ``sqrt(D)``. About 1 for features spread over the sphere, 0 when every input maps to
    the same point (complete collapse); SimSiam (Chen & He 2021) plots the same quantity without the factor."""
    features = _tensor(features).double()
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be (N >= 2, D), got {tuple(features.shape)}")
    normalised = F.normalize(features, dim=1)
    return float(normalised.std(0).mean() * features.shape[1] ** 0.5)


#: Below this :func:`feature_std`, a task reports its features as collapsed (a warning and ``collapsed: 1``).
#: Measured on digits: SimCLR/MoCo ResNet features sit at 0.8, a learning DINO ViT's mean-pooled tokens at
#: 0.09-0.10 (they share a large common direction), a random-init tiny ViT's [CLS] at about 0.05, a DINO run
#: collapsed to the uniform distribution below 0.01.
COLLAPSE_THRESHOLD = 0.05
