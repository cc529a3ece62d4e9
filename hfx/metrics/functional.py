"""The generative-model metrics as pure functions of features, in float64.

Every function takes feature matrices ``[N, D]`` (numpy arrays or torch tensors, any float dtype) or
class probabilities ``[N, C]`` and returns Python floats. What the features are (Inception pool3, a timm
backbone, CLIP image embeddings) is the caller's choice: see :mod:`hfx.metrics.extractors`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from hfx.metrics.statistics import FeatureStatistics, _as_float64_matrix


class MeanStd(NamedTuple):
    """A score averaged over subsets or splits, with the standard deviation across them (ddof=0)."""

    mean: float
    std: float


# ------------------------------------------------------------------------------------------------ FID
def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``. The trace of the matrix square root is the sum of
    the square roots of the eigenvalues of ``S1 S2``, which equal those of the symmetric positive
    semi-definite ``L^T S2 L`` for any factor ``S1 = L L^T``: in float64, never a complex number. ``L`` is
    the Cholesky factor when ``S1`` is positive definite (cheap), else ``S1^(1/2)`` from a symmetric
    eigen-decomposition, which stays exact for singular covariances (fewer samples than dimensions).

    Args:
        mu1, mu2: means ``[D]``.
        sigma1, sigma2: covariances ``[D, D]`` (symmetric positive semi-definite).
    Returns:
        The distance (>= 0).
    """
    mu1, mu2 = (torch.as_tensor(m).to(torch.float64).flatten() for m in (mu1, mu2))
    device = mu1.device
    s1, s2 = (torch.as_tensor(s).to(device=device, dtype=torch.float64) for s in (sigma1, sigma2))
    mu2 = mu2.to(device)
    d = mu1.shape[0]
    if mu2.shape[0] != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, "
                         f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(s2.shape)}")
    s1 = (s1 + s1.T) / 2
    factor, info = torch.linalg.cholesky_ex(s1)
    if info.item() == 0:
        middle = _lower_triangular_congruence(factor, s2)
    else:  # singular S1: its symmetric square root is a factor too
        eigenvalues, eigenvectors = torch.linalg.eigh(s1)
        factor = (eigenvectors * _significant(eigenvalues).sqrt()) @ eigenvectors.T
        middle = factor.T @ s2 @ factor
    trace_sqrt_product = _significant(torch.linalg.eigvalsh((middle + middle.T) / 2)).sqrt().sum()
    diff = mu1 - mu2
    distance = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * trace_sqrt_product
    return max(float(distance), 0.0)  # rounding can leave -1e-13 for identical inputs


def _lower_triangular_congruence(factor: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """``L^T S2 L`` for a lower-triangular ``L``. On the CPU through BLAS ``dtrmm``, which skips the zero
    triangle: half the work of two general matrix products (the dominant cost at D = 2048)."""
    if factor.device.type != "cpu":
        return factor.T @ s2 @ factor
    from scipy.linalg.blas import dtrmm

    lower = factor.numpy()
    s2_lower = dtrmm(1.0, lower, s2.numpy(), side=1, lower=1)  # S2 L
    return torch.from_numpy(dtrmm(1.0, lower, s2_lower, side=0, lower=1, trans_a=1))  # L^T (S2 L)


def _significant(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Zero the eigenvalues that rounding cannot tell from 0 (below ``D * eps * max``, the rank threshold
    numpy's ``matrix_rank`` uses). A singular covariance has exact zeros that come out as +-1e-16; their
    square roots (1e-8 each) would otherwise add up to a visible error."""
    tolerance = eigenvalues.shape[0] * torch.finfo(eigenvalues.dtype).eps * eigenvalues.abs().max()
    return torch.where(eigenvalues > tolerance, eigenvalues, torch.zeros_like(eigenvalues))


def frechet_distance(features_a, features_b) -> float:
    """FID between two feature sets ``[N_a, D]`` and ``[N_b, D]`` (or two :class:`FeatureStatistics`).

    Uses the unbiased covariance (N - 1), as pytorch-fid and torchmetrics do. FID is biased upwards at
    small N: compare scores only at equal N.
    """
    stats_a, stats_b = (s if isinstance(s, FeatureStatistics) else FeatureStatistics.from_features(s)
                        for s in (features_a, features_b))
    if stats_a.dim != stats_b.dim:
        raise ValueError(f"feature dimensions differ: {stats_a.dim} vs {stats_b.dim}")
    return frechet_distance_from_statistics(stats_a.mean, stats_a.covariance, stats_b.mean, stats_b.covariance)


# ------------------------------------------------------------------------------------------------ KID
def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef0: float = 1.0) -> torch.Tensor:
    """``(x y^T / D + coef0) ** degree`` for ``x [n, D]``, ``y [m, D]`` -> ``[n, m]``."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased estimate of the squared MMD between samples ``x [m, D]`` and ``y [n, D]`` (m, n >= 2).

    Mean of the off-diagonal within-set kernel values of each side, minus twice the mean cross-kernel.
    """
    k_xx, k_yy, k_xy = (polynomial_kernel(a, b, degree, coef0) for a, b in ((x, x), (y, y), (x, y)))
    m, n = x.shape[0], y.shape[0]
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kernel_inception_distance(features_a, features_b, subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, coef0: float = 1.0, seed: int = 0) -> MeanStd:
    """KID (Bińkowski et al. 2018): unbiased MMD^2 with the kernel ``(x.y / D + 1)^3``, over random subsets.

    Each of ``subsets`` rounds draws ``subset_size`` rows of each side without replacement (numpy
    ``RandomState(seed)``, reproducible) and computes :func:`mmd2_unbiased`. KID has no
    sample-size bias: its expectation is 0 when both sides come from one distribution.

    Returns:
        ``MeanStd(mean, std)`` over the subsets.
    """
    x, y = _as_float64_matrix(features_a), _as_float64_matrix(features_b)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    y = y.to(x.device)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    smallest = min(x.shape[0], y.shape[0])
    if not 2 <= subset_size <= smallest:
        raise ValueError(f"subset_size must be between 2 and the smaller sample size ({smallest}), got {subset_size}; "
                         f"sizes: {x.shape[0]} and {y.shape[0]}")
    rng = np.random.RandomState(seed)
    scores = []
    for _ in range(subsets):
        rows_x = torch.from_numpy(rng.choice(x.shape[0], subset_size, replace=False))
        rows_y = torch.from_numpy(rng.choice(y.shape[0], subset_size, replace=False))
        scores.append(mmd2_unbiased(x[rows_x.to(x.device)], y[rows_y.to(x.device)], degree, coef0))
    return MeanStd(float(np.mean(scores)), float(np.std(scores)))


# ------------------------------------------------------------------------------------------------- IS
def inception_score(probs, splits: int = 10) -> MeanStd:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` of class probabilities ``[N, C]``.

    As in the original code (Salimans et al. 2016): rows are cut, in order, into ``splits`` contiguous
    parts ``[i N / splits, (i + 1) N / splits)``; ``p(y)`` is each part's mean; the score is averaged over
    the parts. Pass probabilities (softmax of the logits), not logits.

    Returns:
        ``MeanStd(mean, std)`` over the splits.
    """
    p = _as_float64_matrix(probs)
    n = p.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be between 1 and the number of samples ({n}), got {splits}")
    if (p < 0).any() or not torch.allclose(p.sum(dim=1), torch.ones(n, dtype=torch.float64), atol=1e-3):
        raise ValueError("probs must be non-negative rows that sum to 1 (apply softmax to logits first)")
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(dim=0, keepdim=True)
        kl = torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal.expand_as(part))
        scores.append(float(torch.exp(kl.sum(dim=1).mean())))
    return MeanStd(float(np.mean(scores)), float(np.std(scores)))


# ------------------------------------------------------------------------------------ precision/recall
class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _kth_neighbour_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row (the row itself is the 0-th)."""
    radii = []
    for start in range(0, x.shape[0], batch_size):
        distances = torch.cdist(x[start:start + batch_size], x)
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of ``queries`` that lie within ``radii[j]`` of some ``centres[j]``."""
    inside = 0
    for start in range(0, queries.shape[0], batch_size):
        distances = torch.cdist(queries[start:start + batch_size], centres)
        inside += int((distances <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real_features, generated_features, k: int = 3, batch_size: int = 1024) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019) from k-NN manifold estimates.

    Each sample's hypersphere reaches its k-th nearest neighbour in its own set. Precision: fraction of
    generated samples inside the union of the real hyperspheres (fidelity). Recall: fraction of real
    samples inside the union of the generated hyperspheres (coverage). Distances in float64.

    Args:
        real_features: ``[N_r, D]``; generated_features: ``[N_g, D]``; k: neighbourhood size (paper: 3).
        batch_size: rows per block of the pairwise-distance computation (memory ``batch_size x N``).
    """
    real, fake = _as_float64_matrix(real_features), _as_float64_matrix(generated_features)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k must be between 1 and the smaller sample size minus 1, got k={k} for sizes "
                         f"{real.shape[0]} and {fake.shape[0]}")
    fake = fake.to(real.device)
    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)
    return PrecisionRecall(precision=_fraction_inside(fake, real, real_radii, batch_size),
                           recall=_fraction_inside(real, fake, fake_radii, batch_size))
