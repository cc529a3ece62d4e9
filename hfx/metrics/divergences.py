"""Distances between distributions: total variation, KL, Jensen-Shannon and the 1-D Wasserstein distance.

Discrete distributions are probability vectors over one shared support. Sampled distributions become
such vectors through :func:`empirical_distributions` (counts over the union of observed values, or a
histogram over shared bins); the 1-D Wasserstein distance works on samples directly. All in float64
numpy; natural logarithms unless ``base`` is given.
"""

from __future__ import annotations

import numpy as np


def _probabilities(p, name: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D probability vector, got shape {p.shape}")
    if (p < 0).any() or not np.isclose(p.sum(), 1.0, atol=1e-6):
        raise ValueError(f"{name} must be non-negative and sum to 1 (sums to {p.sum():.6g})")
    return p


def _pair(p, q) -> tuple[np.ndarray, np.ndarray]:
    p, q = _probabilities(p, "p"), _probabilities(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"p and q must lie on the same support, got lengths {p.size} and {q.size}")
    return p, q


def total_variation(p, q) -> float:
    """``sup_A |P(A) - Q(A)| = 0.5 * sum |p - q|``, in [0, 1]."""
    p, q = _pair(p, q)
    return float(0.5 * np.abs(p - q).sum())


def kl_divergence(p, q, base: float | None = None) -> float:
    """``KL(p || q) = sum p log(p / q)``; ``inf`` where q is 0 and p is not (0 log 0 = 0)."""
    p, q = _pair(p, q)
    if ((q == 0) & (p > 0)).any():
        return float("inf")
    support = p > 0
    kl = float(np.sum(p[support] * np.log(p[support] / q[support])))
    return kl / np.log(base) if base else kl


def js_divergence(p, q, base: float | None = None) -> float:
    """Jensen-Shannon divergence ``KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2``.

    Symmetric and finite: at most ``log 2`` (1 with ``base=2``). Its square root is a metric (what
    ``scipy.spatial.distance.jensenshannon`` returns).
    """
    p, q = _pair(p, q)
    m = (p + q) / 2
    return 0.5 * kl_divergence(p, m, base) + 0.5 * kl_divergence(q, m, base)


def wasserstein_1d(u_values, v_values, u_weights=None, v_weights=None) -> float:
    """Earth mover's distance between two distributions on the real line: ``integral |F_u(t) - F_v(t)| dt``.

    ``u_values``/``v_values`` are samples (or support points with ``*_weights``, which need not be
    normalised). Equals ``scipy.stats.wasserstein_distance``.
    """
    u, v = np.asarray(u_values, dtype=np.float64).ravel(), np.asarray(v_values, dtype=np.float64).ravel()
    if u.size == 0 or v.size == 0:
        raise ValueError("both distributions need at least one value")
    u_w = _weights(u_weights, u.size, "u_weights")
    v_w = _weights(v_weights, v.size, "v_weights")
    u_order, v_order = np.argsort(u), np.argsort(v)
    points = np.sort(np.concatenate([u, v]))
    widths = np.diff(points)
    # Right-continuous CDFs of both sides evaluated on every interval between consecutive points.
    u_cdf = np.concatenate([[0.0], np.cumsum(u_w[u_order])])[np.searchsorted(u[u_order], points[:-1], "right")]
    v_cdf = np.concatenate([[0.0], np.cumsum(v_w[v_order])])[np.searchsorted(v[v_order], points[:-1], "right")]
    return float(np.sum(np.abs(u_cdf - v_cdf) * widths))


def _weights(weights, size: int, name: str) -> np.ndarray:
    if weights is None:
        return np.full(size, 1.0 / size)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.size != size or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"{name} must be {size} non-negative numbers with a positive sum")
    return w / w.sum()


def empirical_distributions(samples_a, samples_b, bins: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn two samples into probability vectors on one shared support.

    Args:
        samples_a, samples_b: 1-D samples.
        bins: ``None`` treats the values as discrete (labels, counts): the support is the union of the
            values seen. An integer histograms both samples over the same ``bins`` equal-width bins spanning
            both samples' range.
    Returns:
        ``(p, q, support)``: the two probability vectors and the support (the values, or the bin edges,
        one longer than p).
    """
    a, b = np.asarray(samples_a).ravel(), np.asarray(samples_b).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("both samples need at least one value")
    if bins is None:
        support = np.union1d(a, b)
        p = np.bincount(np.searchsorted(support, a), minlength=support.size) / a.size
        q = np.bincount(np.searchsorted(support, b), minlength=support.size) / b.size
        return p.astype(np.float64), q.astype(np.float64), support
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    edges = np.histogram_bin_edges(np.concatenate([a, b]).astype(np.float64), bins=bins)
    p = np.histogram(a, bins=edges)[0] / a.size
    q = np.histogram(b, bins=edges)[0] / b.size
    return p.astype(np.float64), q.astype(np.float64), edges
