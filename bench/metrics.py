"""FID from 10k x 2048 features: hfx versus the scipy.linalg.sqrtm route (pytorch-fid, clean-fid) and
versus torchmetrics, in one run, interleaved so that machine load falls on every side alike.

Each route goes from the two feature matrices to the number:
- hfx: ``FeatureStatistics`` (float64 sums) + ``frechet_distance`` (two symmetric eigen-decompositions);
- scipy: ``np.mean`` / ``np.cov`` + ``scipy.linalg.sqrtm(s1 @ s2)``, as pytorch-fid's
  ``calculate_frechet_distance`` (without its ``disp=False``, which SciPy >= 1.18 rejects);
- torchmetrics: ``FrechetInceptionDistance`` fed the features through an identity "extractor" (its own
  float64 sums, then ``eigvals`` of the non-symmetric product).
The "matrix part" rows time only the step from (mean, covariance) to the distance, the part that differs.
Values are compared with a float64 reference (``|eigvalsh|`` route through ``scipy.linalg.eigh``).

torchmetrics is a bench-only dependency: ``.venv/bin/pip install torchmetrics`` (without it the bench
says so and skips that route).

Every route runs with the same number of threads (``--threads``, default 1: on a shared machine, several
threads per process spend their time waiting at barriers). Both wall time and CPU time are reported: on a
busy machine CPU time is the steadier measure of work done.

Run: ``.venv/bin/python bench/metrics.py [--n 10000] [--dim 2048] [--rounds 3] [--threads 1] [--device cpu]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import numpy as np
import scipy
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from hfx.metrics import FeatureStatistics, frechet_distance, frechet_distance_from_statistics


def make_features(n: int, dim: int, seed: int, shift: float) -> np.ndarray:
    """Correlated, non-negative, Inception-like features: ReLU of a random mixture with a decaying spectrum."""
    rng = np.random.default_rng(seed)
    spectrum = 1.0 / np.sqrt(1.0 + np.arange(dim))
    mixing = rng.normal(size=(dim, dim)) * spectrum[:, None] / np.sqrt(dim) * 4
    return np.maximum(rng.normal(size=(n, dim)) @ mixing + shift, 0.0)


# --------------------------------------------------------------------------------------------- routes
def hfx_route(a: np.ndarray, b: np.ndarray, device: str) -> float:
    stats_a = FeatureStatistics(a.shape[1], device=device).update(torch.from_numpy(a))
    stats_b = FeatureStatistics(b.shape[1], device=device).update(torch.from_numpy(b))
    return frechet_distance(stats_a, stats_b)


def scipy_matrix_part(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's calculate_frechet_distance, minus the `disp=False` argument."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def scipy_route(a: np.ndarray, b: np.ndarray, device: str) -> float:
    return scipy_matrix_part(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


class _Features(torch.nn.Module):
    """An identity "extractor" so torchmetrics' FID consumes ready-made features."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


def torchmetrics_route(a: np.ndarray, b: np.ndarray, device: str) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Features(a.shape[1])).to(device)
    metric.update(torch.from_numpy(a).to(device), real=True)  # float64 in: its result keeps float64
    metric.update(torch.from_numpy(b).to(device), real=False)
    return float(metric.compute())


def reference_fid(mu1, sigma1, mu2, sigma2) -> float:
    """Independent float64 value: Tr sqrt(S1 S2) from the eigenvalues of S1^1/2 S2 S1^1/2 via scipy.linalg."""
    w, v = scipy.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = scipy.linalg.eigh(root @ sigma2 @ root, eigvals_only=True)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--device", default="cpu", help="device for the torch routes (hfx, torchmetrics)")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and numpy/scipy BLAS (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:

    try:
        import torchmetrics
        torchmetrics_version = torchmetrics.__version__
    except ImportError:
        torchmetrics_version = None
        print("torchmetrics is not installed (.venv/bin/pip install torchmetrics): its route is skipped")

    a = make_features(args.n, args.dim, seed=0, shift=0.0)
    b = make_features(args.n, args.dim, seed=1, shift=0.05)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = reference_fid(mu1, s1, mu2, s2)
    t1, t2 = (torch.from_numpy(x).to(args.device) for x in (s1, s2))
    m1, m2 = (torch.from_numpy(x).to(args.device) for x in (mu1, mu2))

    routes = {
        "hfx (features -> FID)": lambda: hfx_route(a, b, args.device),
        "scipy sqrtm (features -> FID)": lambda: scipy_route(a, b, args.device),
        "hfx (matrix part)": lambda: frechet_distance_from_statistics(m1, t1, m2, t2),
        "scipy sqrtm (matrix part)": lambda: scipy_matrix_part(mu1, s1, mu2, s2),
    }
    if torchmetrics_version:
        from torchmetrics.image.fid import _compute_fid

        routes["torchmetrics (features -> FID)"] = lambda: torchmetrics_route(a, b, args.device)
        routes["torchmetrics (matrix part)"] = lambda: float(_compute_fid(m1, t1, m2, t2))

    wall: dict[str, list[float]] = {name: [] for name in routes}
    cpu: dict[str, list[float]] = {name: [] for name in routes}
    values: dict[str, float] = {}
    order = list(routes)
    for round_index in range(args.rounds):
        for name in order if round_index % 2 == 0 else reversed(order):  # alternate the order
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            values[name] = routes[name]()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            print(f"round {round_index + 1}: {name}: wall {wall[name][-1]:.2f} s, cpu {cpu[name][-1]:.2f} s, "
                  f"FID {values[name]:.10g}", flush=True)

    median = {name: statistics.median(t) for name, t in wall.items()}
    median_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    print()
    print(f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
          f"{os.cpu_count()} cores, {args.threads} thread(s) per route, device {args.device}; torch {torch.__version__}, "
          f"scipy {scipy.__version__}, numpy {np.__version__}, torchmetrics {torchmetrics_version or 'not installed'}")
    print(f"- Features: {args.n} x {args.dim} per side, float64; FID reference (scipy.linalg.eigh route): "
          f"{reference:.10g}; median of {args.rounds} interleaved rounds.")
    print()
    print("| route | wall (s) | hfx speed-up (wall) | CPU (s) | hfx speed-up (CPU) | FID | rel. diff. to reference |")
    print("|---|---|---|---|---|---|---|")
    for part in ("features -> FID", "matrix part"):
        ours, ours_cpu = median[f"hfx ({part})"], median_cpu[f"hfx ({part})"]
        for name in routes:
            if name.endswith(f"({part})"):
                rel = abs(values[name] - reference) / abs(reference)
                print(f"| {name} | {median[name]:.2f} | {median[name] / ours:.2f}x | {median_cpu[name]:.2f} | "
                      f"{median_cpu[name] / ours_cpu:.2f}x | {values[name]:.10g} | {rel:.1e} |")


if __name__ == "__main__":
    main()
