"""Feature-space figures of two sets and their bootstrap intervals: FID, KID, precision/recall, density/coverage.

- FID: ||mu_x - mu_y||^2 + tr(S_x) + tr(S_y) - 2 tr sqrt(S_x S_y). The reported figure is MONAI's
  ``FIDMetric`` (a d x d matrix square root). The bootstrap replicates need hundreds of FIDs, too
  many square roots at d = 2048 on a CPU, so they use ``frechet_distance``, the same quantity in
  closed form: with a, b the centred features over sqrt(n - 1), tr sqrt(S_x S_y) is the nuclear norm
  of a b^T (the square roots of the eigenvalues of S_x S_y are its singular values), an n x n problem,
  exact and always real even for the singular covariances of n < d. The tests check it equals
  MONAI's figure (to 1e-6) and the closed form of two Gaussians.
- KID: torchmetrics' unbiased polynomial-kernel MMD (``poly_kernel`` + ``maximum_mean_discrepancy``,
  what ``poly_mmd`` composes), mean and std over random subsets exactly like
  ``KernelInceptionDistance.compute``; the kernel matrix is computed once and the subsets index it.
- precision, recall, density, coverage: Naeem et al. 2020 (``prdc``), k-nearest-neighbour balls
  from one ``torch.cdist`` matrix.

``compare(x, y, ...)`` gives every figure and, with ``bootstrap`` > 0, a 95% interval (``<name>_ci``)
from ``scipy.stats.bootstrap`` resampling both sets with replacement (percentile by default). The
distance and kernel matrices are computed once; a replicate indexes them. In a replicate a sample
drawn twice is not its own neighbour (its copies are left out of its k-NN ball) and a KID subset
holds each drawn sample once, so copies do not shrink the balls or bias the unbiased MMD.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from sonosynth.launch.quality.config import MetricsConfig

FIGURES = ("fid", "kid_mean", "precision", "recall", "density", "coverage")
SMALL = 1024
"""Up to this many samples in a comparison, its many small tensor operations run on one thread:
starting the intra-op threads costs more than the work (about 10x slower on a busy machine)."""


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _kid_functions():
    from sonosynth.launch.quality.features import torch_fidelity_importable

    torch_fidelity_importable()  # torchmetrics imports torch-fidelity when it is installed
    from torchmetrics.image.kid import maximum_mean_discrepancy, poly_kernel

    return poly_kernel, maximum_mean_discrepancy


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """FID of two feature sets [n, d] (float64; never negative, never NaN for n >= 2)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    mu_x, mu_y = x.mean(0), y.mean(0)
    a = (x - mu_x) / max(len(x) - 1, 1) ** 0.5
    b = (y - mu_y) / max(len(y) - 1, 1) ** 0.5
    d = x.shape[1]
    fa = a if len(a) <= d else torch.linalg.qr(a, mode="r").R  # same singular values of fa fb^T, smaller
    fb = b if len(b) <= d else torch.linalg.qr(b, mode="r").R
    cross = torch.linalg.matrix_norm(fa @ fb.T, ord="nuc")
    fid = (mu_x - mu_y).square().sum() + a.square().sum() + b.square().sum() - 2 * cross
    return max(float(fid), 0.0)


def library_fid(x: torch.Tensor, y: torch.Tensor) -> float:
    """MONAI's ``FIDMetric`` of two feature sets [n, d] (``frechet_distance`` if its matrix square
    root does not give a finite figure)."""
    from monai.metrics import FIDMetric

    value = float(FIDMetric()(torch.as_tensor(y, dtype=torch.float64), torch.as_tensor(x, dtype=torch.float64)))
    return max(value, 0.0) if np.isfinite(value) else frechet_distance(x, y)


def _kth_radius(dist: torch.Tensor, origin: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other sample (copies of the same sample left out;
    with fewer than k others, the farthest one)."""
    dist = dist.masked_fill(origin[:, None] == origin[None, :], float("inf"))
    ordered = dist.sort(dim=1).values
    others = torch.isfinite(ordered).sum(1).clamp(min=1)
    return ordered.gather(1, (torch.clamp(others, max=k) - 1)[:, None])[:, 0]


def prdc(dist: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor, k: int) -> dict[str, float]:
    """Precision, recall, density, coverage of fake rows ``ib`` against real rows ``ia`` of the
    pairwise distance matrix ``dist`` (Naeem et al. 2020; an index drawn twice is one sample)."""
    r_real = _kth_radius(dist[ia][:, ia], ia, k)
    r_fake = _kth_radius(dist[ib][:, ib], ib, k)
    d_rf = dist[ia][:, ib]
    inside = d_rf < r_real[:, None]
    return {"precision": float(inside.any(0).double().mean()),
            "recall": float((d_rf < r_fake[None, :]).any(1).double().mean()),
            "density": float(inside.sum(0).double().mean() / k),
            "coverage": float((d_rf.min(1).values < r_real).double().mean())}


def kid(kernel: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor, subsets: int, subset_size: int,
        generator: torch.Generator) -> tuple[float, float]:
    """KID (mean, std over ``subsets``) of rows ``ib`` against ``ia`` of a kernel matrix, like
    ``KernelInceptionDistance.compute``; a subset takes each distinct index once."""
    _, mmd = _kid_functions()
    ua, ub = torch.unique(ia), torch.unique(ib)
    size = min(subset_size, len(ua), len(ub))
    scores = []
    for _ in range(subsets):
        fa = ua[torch.randperm(len(ua), generator=generator)[:size]]
        fb = ub[torch.randperm(len(ub), generator=generator)[:size]]
        scores.append(mmd(kernel[fa][:, fa], kernel[fa][:, fb], kernel[fb][:, fb]))
    values = torch.stack(scores)
    return float(values.mean()), float(values.std(unbiased=False))


def _interval(result, index: int | None = None) -> list[float] | None:
    """[low, high] of a ``scipy.stats.bootstrap`` result (of one output of a multi-output statistic)."""
    low, high = result.confidence_interval.low, result.confidence_interval.high
    if index is not None:
        low, high = low[index], high[index]
    return [float(low), float(high)] if np.isfinite(low) and np.isfinite(high) else None


def _bootstrap(data: tuple[np.ndarray, ...], statistic, replicates: int, seed: int, method: str):
    """``scipy.stats.bootstrap``: each sample resampled with replacement, independently; 95% interval."""
    import warnings

    from scipy.stats import bootstrap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a degenerate figure (all replicates equal) is fine
        return bootstrap(data, statistic, n_resamples=replicates, vectorized=False, paired=False,
                         confidence_level=0.95, method=method, rng=np.random.default_rng(seed))


def compare(x: np.ndarray, y: np.ndarray, metrics: MetricsConfig, *, bootstrap: int = 0, seed: int = 0,
            method: str = "percentile") -> dict[str, Any]:
    """Every figure of the fake set ``y`` against the real set ``x`` (features [n, d]), ``kid_std``
    over the KID subsets, and each figure's 95% bootstrap interval (``<figure>_ci``; null without
    bootstrap; ``method``: scipy.stats.bootstrap's percentile, basic or BCa)."""
    poly_kernel, _ = _kid_functions()
    z = torch.as_tensor(np.concatenate([x, y]), dtype=torch.float64)
    n_x, n_y = len(x), len(y)
    if min(n_x, n_y) < 2:
        raise ValueError(f"compare needs at least 2 samples on each side, got {n_x} and {n_y}")
    dist = torch.cdist(z, z)
    kernel = poly_kernel(z, z, metrics.kid_degree, metrics.kid_gamma, metrics.kid_coef)
    k = min(metrics.nearest_k, min(n_x, n_y) - 1)
    generator = torch.Generator().manual_seed(seed)

    def figures(ia: torch.Tensor, ib: torch.Tensor, subsets: int) -> dict[str, float]:
        out = {"fid": frechet_distance(z[ia], z[ib])}
        out["kid_mean"], out["kid_std"] = kid(kernel, ia, ib, subsets, metrics.kid_subset_size, generator)
        out.update(prdc(dist, ia, ib, k))
        return out

    def replicate(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
        one = figures(torch.as_tensor(ra), torch.as_tensor(rb), metrics.bootstrap_kid_subsets)
        return np.array([one[name] for name in FIGURES])

    ia, ib = np.arange(n_x), np.arange(n_x, n_x + n_y)
    with _threads(1 if n_x + n_y <= SMALL else None):
        result: dict[str, Any] = figures(torch.as_tensor(ia), torch.as_tensor(ib), metrics.kid_subsets)
        result["fid"] = library_fid(z[:n_x], z[n_x:])
        boot = _bootstrap((ia, ib), replicate, bootstrap, seed, method) if bootstrap else None
    result["nearest_k"] = k
    for i, name in enumerate(FIGURES):
        result[f"{name.removesuffix('_mean')}_ci"] = _interval(boot, i) if boot is not None else None
    return result


def bootstrap_mean(values: list[float], replicates: int, seed: int,
                   method: str = "percentile") -> tuple[float | None, list[float] | None]:
    """The mean of ``values`` and its 95% bootstrap interval (None without two values or replicates)."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return None, None
    if not replicates or len(v) < 2:
        return float(v.mean()), None
    if np.all(v == v[0]):  # every resample has this mean (scipy would call the data degenerate)
        return float(v[0]), [float(v[0]), float(v[0])]
    return float(v.mean()), _interval(_bootstrap((v,), np.mean, replicates, seed, method))
