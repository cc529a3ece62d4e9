"""Streaming first and second moments of feature vectors, in float64, mergeable across processes.

FID compares the mean and covariance of two feature sets. Both follow from three sums that add up over
batches and over processes: the count ``n``, ``sum(x)`` and ``sum(x x^T)``. Keeping them in float64 makes
the result independent of the batch size and of the number of processes (to rounding), and lets a
dataset's reference statistics be computed once and saved to an ``.npz`` file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

# Keys of the .npz file. "mu"/"sigma" are also what pytorch-fid and clean-fid write, so their reference
# statistics files load here (as mean/covariance only: they carry no sums, so they cannot be merged).
_SUM, _SUM_OUTER, _COUNT, _MEAN, _COV = "sum", "sum_outer", "n", "mu", "sigma"


def _as_float64_matrix(features, device=None) -> torch.Tensor:
    features = torch.as_tensor(features)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D array [N, D], got shape {tuple(features.shape)}")
    return features.to(device=device, dtype=torch.float64)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` of a float64 ``[B, D]`` batch. On the CPU through BLAS ``dsyrk``, which computes one triangle
    of the symmetric product: half the work of a general matrix product (the dominant cost at D = 2048)."""
    if x.device.type != "cpu":
        return x.T @ x
    from scipy.linalg.blas import dsyrk

    upper = torch.from_numpy(dsyrk(1.0, x.detach().contiguous().numpy().T))  # Fortran [D, B]: no copy
    return upper.triu() + upper.triu(1).T


class FeatureStatistics:
    """Running ``n``, ``sum(x)`` and ``sum(x x^T)`` of D-dimensional features, in float64.

    Args:
        dim: the feature dimension D.
        device: where the sums live; each batch is moved there (``"cuda"`` keeps the D x D product on the GPU).

    Example::

        stats = FeatureStatistics(2048)
        for batch in loader:
            stats.update(extractor(batch)["features"])   # [B, 2048], any batch size
        stats.all_reduce()                               # under torchrun / accelerate launch
        stats.save("reference.npz")

    The covariance is the unbiased one (divides by n - 1), as pytorch-fid, clean-fid and torchmetrics use.
    Its rounding error relative to a two-pass computation grows like ``eps * (|mean| / std)^2``, which in
    float64 stays far below 1e-10 for network features.
    """

    def __init__(self, dim: int, device: str | torch.device | None = "cpu"):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        # Set only for statistics loaded from a file that stores mean/covariance without the sums.
        self._fixed: tuple[torch.Tensor, torch.Tensor] | None = None

    # --------------------------------------------------------------------------------- accumulate
    def update(self, features) -> FeatureStatistics:
        """Add a batch of features ``[B, D]`` (tensor or array, any float dtype). Returns ``self``."""
        x = _as_float64_matrix(features, self.sum.device)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have dimension {x.shape[1]}, these statistics have dimension {self.dim}")
        self._require_sums("update")
        self.n += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer += _gram(x)
        return self

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Add another accumulator's sums into this one (e.g. the statistics of another process)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into dimension {self.dim}")
        self._require_sums("merge")
        other._require_sums("merge")
        self.n += other.n
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum.device)
        return self

    def all_reduce(self) -> FeatureStatistics:
        """Sum the statistics over all processes of the default ``torch.distributed`` group, in place.

        Works under ``torchrun`` and ``accelerate launch`` (which initialise that group); a no-op in a single
        process. Every process must call it. Samples that a distributed sampler duplicated to even out the
        last batch are counted twice: drop them first (``accelerator.gather_for_metrics`` on the features,
        then ``update`` on one process) when the dataset size is not a multiple of the world size.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        self._require_sums("all_reduce")
        packed = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device),
                            self.sum, self.sum_outer.flatten()])
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
        self.n = int(round(packed[0].item()))
        self.sum = packed[1:1 + self.dim].clone()
        self.sum_outer = packed[1 + self.dim:].view(self.dim, self.dim).clone()
        return self

    # ------------------------------------------------------------------------------------ moments
    @property
    def mean(self) -> torch.Tensor:
        """Mean feature ``[D]`` (float64)."""
        if self._fixed is not None:
            return self._fixed[0]
        self._require_samples(1)
        return self.sum / self.n

    @property
    def covariance(self) -> torch.Tensor:
        """Unbiased covariance ``[D, D]`` (float64): ``(sum x x^T - n mu mu^T) / (n - 1)``."""
        if self._fixed is not None:
            return self._fixed[1]
        self._require_samples(2)
        mu = self.sum / self.n
        cov = (self.sum_outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2  # exact symmetry, which the eigen-decompositions downstream rely on

    # ----------------------------------------------------------------------------------- save/load
    def save(self, path: str | os.PathLike, **extra_arrays: np.ndarray) -> Path:
        """Write the statistics to ``path`` (``.npz``) atomically; returns the path.

        The file holds ``n``, ``sum``, ``sum_outer`` and, for other tools, ``mu`` and ``sigma``, plus any
        ``extra_arrays`` (e.g. the features themselves, which KID and precision/recall need).
        """
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"statistics are saved as .npz, got {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {_MEAN: self.mean.cpu().numpy(), _COV: self.covariance.cpu().numpy()}
        if self._fixed is None:
            arrays.update({_COUNT: np.array(self.n), _SUM: self.sum.cpu().numpy(),
                           _SUM_OUTER: self.sum_outer.cpu().numpy()})
        else:
            arrays[_COUNT] = np.array(self.n)
        clashes = set(extra_arrays) & {_SUM, _SUM_OUTER, _COUNT, _MEAN, _COV}
        if clashes:
            raise ValueError(f"extra arrays may not use the statistics' names: {sorted(clashes)}")
        arrays.update(extra_arrays)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.npz")
        os.close(fd)
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = "cpu") -> FeatureStatistics:
        """Read statistics written by :meth:`save`, or a pytorch-fid / clean-fid ``mu``/``sigma`` ``.npz``.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file holds neither the sums nor ``mu`` and ``sigma``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {str(path)!r} does not exist")
        try:
            data = np.load(path, allow_pickle=False)
            if not hasattr(data, "files"):
                raise ValueError("it holds one array, not named arrays")
        except (ValueError, OSError, EOFError) as err:  # not a zip, truncated, pickled objects (refused)
            raise ValueError(f"statistics file {str(path)!r} is not an .npz of named arrays "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        with data:
            keys = set(data.files)
            if {_SUM, _SUM_OUTER, _COUNT} <= keys:
                stats = cls(int(data[_SUM].shape[0]), device=device)
                stats.n = int(data[_COUNT])
                stats.sum = torch.from_numpy(data[_SUM].astype(np.float64)).to(device)
                stats.sum_outer = torch.from_numpy(data[_SUM_OUTER].astype(np.float64)).to(device)
                return stats
            if {_MEAN, _COV} <= keys:
                mu = torch.from_numpy(data[_MEAN].astype(np.float64)).to(device)
                sigma = torch.from_numpy(np.atleast_2d(data[_COV]).astype(np.float64)).to(device)
                stats = cls(int(mu.shape[0]), device=device)
                stats.n = int(data[_COUNT]) if _COUNT in keys else 0  # 0: unknown
                stats._fixed = (mu, sigma)
                return stats
        raise ValueError(f"{path} holds neither n/sum/sum_outer nor mu/sigma arrays (found: {sorted(keys)})")

    @classmethod
    def from_features(cls, features, device: str | torch.device | None = "cpu") -> FeatureStatistics:
        """Statistics of a whole ``[N, D]`` feature matrix at once."""
        x = _as_float64_matrix(features)
        return cls(x.shape[1], device=device).update(x)

    def fingerprint(self) -> str:
        """Short sha256 of the statistics, to tell reference sets apart in a report."""
        digest = hashlib.sha256(self.mean.cpu().numpy().tobytes())
        digest.update(self.covariance.cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"FeatureStatistics(dim={self.dim}, n={self.n})"

    # ------------------------------------------------------------------------------------ helpers
    def _require_sums(self, action: str) -> None:
        if self._fixed is not None:
            raise ValueError(f"cannot {action}: these statistics were loaded as mean/covariance only, without sums")

    def _require_samples(self, minimum: int) -> None:
        if self.n < minimum:
            raise ValueError(f"statistics need at least {minimum} sample(s), have {self.n}")
