"""hfx.metrics math: FID, KID, IS, precision/recall, divergences and streaming statistics against
closed forms and independent references (scipy, brute force)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats
import torch

from hfx.metrics import (
    FeatureStatistics,
    empirical_distributions,
    frechet_distance,
    frechet_distance_from_statistics,
    inception_score,
    js_divergence,
    kernel_inception_distance,
    kl_divergence,
    precision_recall,
    total_variation,
    wasserstein_1d,
)
from hfx.metrics.functional import mmd2_unbiased


def correlated_features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift + rng.normal(size=d) * 0.1


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The pytorch-fid route: scipy.linalg.sqrtm of the covariance product (without the disp argument)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


# ------------------------------------------------------------------------------------------------ FID
def test_fid_equals_closed_form_for_gaussians_with_diagonal_covariances():
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    var1, var2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum()
    got = frechet_distance_from_statistics(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-8)
    # The same Gaussians in a rotated basis (covariances no longer diagonal, still commuting): same distance.
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    rotated = frechet_distance_from_statistics(rotation @ mu1, rotation @ np.diag(var1) @ rotation.T,
                                               rotation @ mu2, rotation @ np.diag(var2) @ rotation.T)
    assert rotated == pytest.approx(expected, rel=1e-8)
    # Singular covariances (no Cholesky factor: the eigen-decomposition route) keep the closed form.
    var1[:5], var2[3:9] = 0.0, 0.0
    expected = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum()
    assert torch.linalg.cholesky_ex(torch.from_numpy(np.diag(var1)))[1] != 0
    got = frechet_distance_from_statistics(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-8)


def test_fid_equals_scipy_sqrtm_route_on_correlated_features():
    a, b = correlated_features(600, 48, seed=1), correlated_features(500, 48, seed=2, shift=0.3)
    assert frechet_distance(a, b) == pytest.approx(scipy_fid(a, b), rel=1e-6)


def test_fid_is_zero_for_identical_sets_and_symmetric():
    a, b = correlated_features(300, 40, seed=3), correlated_features(300, 40, seed=4)
    assert abs(frechet_distance(a, a)) < 1e-9 * np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 0.1


def test_fid_with_fewer_samples_than_dimensions_is_real_and_exact():
    a, b = correlated_features(20, 64, seed=5), correlated_features(30, 64, seed=6)
    got = frechet_distance(torch.from_numpy(a).float(), b)  # mixed input types and dtypes are fine
    # Independent route for singular covariances: with S = A^T A, the eigenvalues of S1 S2 are the squared
    # singular values of A1 A2^T, so Tr (S1 S2)^(1/2) is the sum of those singular values.
    a64 = torch.from_numpy(a).float().double().numpy()
    c1, c2 = (x - x.mean(0) for x in (a64, b))
    f1, f2 = c1 / np.sqrt(len(c1) - 1), c2 / np.sqrt(len(c2) - 1)
    expected = (((a64.mean(0) - b.mean(0)) ** 2).sum() + (f1**2).sum() + (f2**2).sum()
                - 2 * np.linalg.svd(f1 @ f2.T, compute_uv=False).sum())
    assert isinstance(got, float) and np.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-9)
    assert np.iscomplexobj(scipy.linalg.sqrtm(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False)))  # the trap


def test_fid_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="feature dimensions differ: 4 vs 5"):
        frechet_distance(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"2-D array \[N, D\]"):
        frechet_distance(np.zeros(4), np.zeros((3, 4)))


# ------------------------------------------------------------------------------------------------ KID
def test_kid_mmd_matches_brute_force_double_sum():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3)) + 0.5
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    within_x = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / (6 * 5)
    within_y = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    cross = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(within_x + within_y - 2 * cross,
                                                                                     rel=1e-12)


def test_kid_is_unbiased_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(8)
    draws = [kernel_inception_distance(rng.normal(size=(40, 16)), rng.normal(size=(40, 16)), subsets=1,
                                       subset_size=40, seed=i).mean for i in range(300)]
    standard_error = np.std(draws, ddof=1) / np.sqrt(len(draws))
    assert abs(np.mean(draws)) < 3 * standard_error
    shifted = kernel_inception_distance(rng.normal(size=(200, 16)), rng.normal(size=(200, 16)) + 0.5,
                                        subsets=10, subset_size=100)
    assert shifted.mean > 10 * standard_error and shifted.std > 0


def test_kid_rejects_subset_larger_than_sample():
    with pytest.raises(ValueError, match="subset_size must be between 2 and the smaller sample size \\(30\\)"):
        kernel_inception_distance(np.zeros((30, 4)), np.zeros((50, 4)), subset_size=40)


# ------------------------------------------------------------------------------------------------- IS
def test_inception_score_matches_entropy_reference_and_extremes():
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(100, 7)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = [np.exp(np.mean([scipy.stats.entropy(row, part.mean(0)) for row in part]))
                for part in (probs[i * 100 // 4:(i + 1) * 100 // 4] for i in range(4))]
    got = inception_score(probs, splits=4)
    assert got.mean == pytest.approx(np.mean(expected), rel=1e-10)
    assert got.std == pytest.approx(np.std(expected), rel=1e-8)
    one_hot = np.eye(10)[np.arange(50) % 10]  # confident and evenly spread: IS = number of classes
    assert inception_score(one_hot, splits=1).mean == pytest.approx(10.0, rel=1e-12)
    assert inception_score(np.full((20, 10), 0.1), splits=2).mean == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="apply softmax"):
        inception_score(logits, splits=2)


# ------------------------------------------------------------------------------------ precision/recall
def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(10)
    real, fake = rng.normal(size=(60, 5)), rng.normal(size=(50, 5)) * 1.5 + 0.7

    def brute(centres, queries, k=3):
        radii = [np.sort(np.linalg.norm(centres - c, axis=1))[k] for c in centres]
        return np.mean([any(np.linalg.norm(q - c) <= r for c, r in zip(centres, radii)) for q in queries])

    got = precision_recall(real, fake, k=3, batch_size=16)
    assert got.precision == pytest.approx(brute(real, fake))
    assert got.recall == pytest.approx(brute(fake, real))
    assert 0 < got.precision < 1 and 0 < got.recall < 1
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, fake + 100.0) == (0.0, 0.0)


# ---------------------------------------------------------------------------------------- divergences
def test_divergences_equal_scipy_on_discrete_distributions():
    rng = np.random.default_rng(11)
    p, q = rng.dirichlet(np.ones(12)), rng.dirichlet(np.ones(12))
    assert kl_divergence(p, q) == pytest.approx(scipy.stats.entropy(p, q), rel=1e-12)
    assert kl_divergence(p, q, base=2) == pytest.approx(scipy.stats.entropy(p, q, base=2), rel=1e-12)
    assert js_divergence(p, q) == pytest.approx(scipy.spatial.distance.jensenshannon(p, q) ** 2, rel=1e-10)
    assert total_variation(p, q) == pytest.approx(0.5 * np.abs(p - q).sum())
    assert total_variation([1, 0], [0, 1]) == 1.0
    assert kl_divergence([0.5, 0.5], [1.0, 0.0]) == float("inf")
    assert js_divergence([1, 0], [0, 1], base=2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same support, got lengths 2 and 3"):
        total_variation([0.5, 0.5], [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="q must be non-negative and sum to 1"):
        kl_divergence([0.5, 0.5], [0.5, 0.6])


def test_divergences_on_sampled_distributions():
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=700), rng.normal(size=500) * 2 + 1
    assert wasserstein_1d(a, b) == pytest.approx(scipy.stats.wasserstein_distance(a, b), rel=1e-12)
    w_a, w_b = rng.uniform(size=700), rng.uniform(size=500)
    assert wasserstein_1d(a, b, w_a, w_b) == pytest.approx(scipy.stats.wasserstein_distance(a, b, w_a, w_b), rel=1e-12)
    labels_a, labels_b = rng.integers(0, 5, size=300), rng.integers(1, 7, size=200)
    p, q, support = empirical_distributions(labels_a, labels_b)
    assert list(support) == list(range(7))
    assert p[np.searchsorted(support, 3)] == pytest.approx(np.mean(labels_a == 3))
    assert q[0] == 0 and p.sum() == pytest.approx(1) and q.sum() == pytest.approx(1)
    p, q, edges = empirical_distributions(a, b, bins=20)
    assert len(edges) == 21 and edges[0] == min(a.min(), b.min()) and edges[-1] == max(a.max(), b.max())
    assert 0 < total_variation(p, q) < 1


# ------------------------------------------------------------------------------- streaming statistics
def test_streaming_statistics_equal_one_shot_for_any_batching_and_merge(tmp_path):
    features = correlated_features(257, 24, seed=13, shift=2.0)
    rng = np.random.default_rng(14)
    streamed = FeatureStatistics(24)
    start = 0
    while start < len(features):
        size = int(rng.integers(1, 40))
        streamed.update(features[start:start + size])
        start += size
    first, second = FeatureStatistics(24), FeatureStatistics(24)  # two "processes", uneven halves
    first.update(features[:100])
    second.update(torch.from_numpy(features[100:]).double())
    merged = first.merge(second)
    for stats in (streamed, merged):
        assert stats.n == 257
        np.testing.assert_allclose(stats.mean.numpy(), features.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(stats.covariance.numpy(), np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12)
    other = correlated_features(200, 24, seed=15)
    assert frechet_distance(streamed, other) == pytest.approx(frechet_distance(features, other), rel=1e-10)

    loaded = FeatureStatistics.load(streamed.save(tmp_path / "ref" / "stats.npz"))
    assert loaded.n == 257 and torch.equal(loaded.sum_outer, streamed.sum_outer)
    loaded.update(other)  # sums reload, so a saved reference can grow
    assert loaded.n == 457
    # pytorch-fid / clean-fid files carry only mu and sigma: usable for FID, not for merging.
    np.savez(tmp_path / "pytorch_fid.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    foreign = FeatureStatistics.load(tmp_path / "pytorch_fid.npz")
    assert frechet_distance(foreign, other) == pytest.approx(frechet_distance(features, other), rel=1e-10)
    with pytest.raises(ValueError, match="mean/covariance only"):
        foreign.update(other)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        FeatureStatistics.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="dimension 5, these statistics have dimension 24"):
        streamed.update(np.zeros((2, 5)))


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rng = np.random.default_rng(0)
        features = rng.normal(size=(301, 16)) @ rng.normal(size=(16, 16)) + 3.0
        stats = FeatureStatistics(16)
        for batch in np.array_split(features[rank::2], 5):  # each rank streams its own rows
            stats.update(batch)
        stats.all_reduce()
        if rank == 0:
            np.savez(out, n=stats.n, mean=stats.mean.numpy(), cov=stats.covariance.numpy(),
                     expected_mean=features.mean(0), expected_cov=np.cov(features, rowvar=False))
    finally:
        torch.distributed.destroy_process_group()


def test_statistics_all_reduce_across_two_real_processes(tmp_path):
    """Two real processes joined by a gloo process group (what torchrun / accelerate launch set up on a
    CPU), forked so they need not import torch again."""
    import multiprocessing
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "result.npz"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_two_rank_worker, args=(rank, port, str(out))) for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    data = np.load(out)
    assert int(data["n"]) == 301
    np.testing.assert_allclose(data["mean"], data["expected_mean"], rtol=1e-10)
    np.testing.assert_allclose(data["cov"], data["expected_cov"], rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_statistics_and_fid_on_cuda_equal_cpu():
    a, b = correlated_features(500, 64, seed=16), correlated_features(400, 64, seed=17, shift=0.2)
    on_gpu = [FeatureStatistics(64, device="cuda").update(torch.from_numpy(x).cuda()) for x in (a, b)]
    assert frechet_distance(*on_gpu) == pytest.approx(frechet_distance(a, b), rel=1e-10)
    assert kernel_inception_distance(torch.from_numpy(a).cuda(), b, subsets=3, subset_size=100).mean == pytest.approx(
        kernel_inception_distance(a, b, subsets=3, subset_size=100).mean, rel=1e-10)
    assert precision_recall(torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()) == precision_recall(a, b)
