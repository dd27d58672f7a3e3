"""The quality stage's feature-space figures (launch/quality/distances.py) against closed forms and libraries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sonosynth.launch.quality.config import MetricsConfig
from sonosynth.launch.quality.distances import bootstrap_mean, compare, frechet_distance, prdc

FAST = MetricsConfig(kid_subsets=20, kid_subset_size=50, bootstrap_kid_subsets=4)


def test_fid_matches_the_closed_form_of_gaussians():
    rng = np.random.default_rng(0)
    d, n = 6, 20000
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)  # diagonal covariances
    x = mu1 + rng.normal(size=(n, d)) * np.sqrt(s1)
    y = mu2 + rng.normal(size=(n, d)) * np.sqrt(s2)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(torch.tensor(x), torch.tensor(y)) == pytest.approx(closed, rel=0.03)


@pytest.mark.parametrize("n,d", [(12, 40), (60, 8), (30, 30)])
def test_fid_equals_monai_including_singular_covariances(n, d):
    from monai.metrics import FIDMetric

    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n + 5, d)) * 1.5 + 0.3
    ours = frechet_distance(torch.tensor(x), torch.tensor(y))
    assert np.isfinite(ours) and ours == pytest.approx(float(FIDMetric()(torch.tensor(y), torch.tensor(x))), rel=1e-6)


def test_identical_sets_score_zero_distance_and_full_overlap():
    x = np.random.default_rng(1).normal(size=(40, 16))
    r = compare(x, x.copy(), FAST, bootstrap=30, seed=0)
    assert r["fid"] < 1e-9
    # KID's unbiased MMD of a set against itself is slightly below 0 (the diagonal counts across sets)
    assert -0.5 < r["kid_mean"] < 1e-6
    assert r["precision"] == r["recall"] == r["coverage"] == 1.0 and 0.7 < r["density"] < 1.3
    assert all(len(r[f"{name}_ci"]) == 2 for name in ("fid", "kid", "precision", "recall", "density", "coverage"))


def test_two_samples_of_one_distribution_have_kid_near_zero_within_the_interval():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))
    r = compare(x, y, FAST, bootstrap=60, seed=0)
    assert r["kid_ci"][0] <= 0.0 <= r["kid_ci"][1]
    far = compare(x, y + 3.0, FAST, bootstrap=30, seed=0)
    assert far["fid_ci"][0] > r["fid_ci"][1] and far["kid_ci"][0] > r["kid_ci"][1]


def test_far_disjoint_sets_have_no_overlap():
    rng = np.random.default_rng(3)
    r = compare(rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) + 50, FAST, bootstrap=20, seed=0)
    assert r["precision"] == r["recall"] == r["density"] == r["coverage"] == 0.0
    assert r["precision_ci"] == [0.0, 0.0] and r["fid"] > 8 * 50**2 * 0.9


def test_kid_is_torchmetrics_kernel_inception_distance():
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 5)), rng.normal(size=(20, 5)) + 0.5
    # one subset of everything: the subset draw cannot matter
    r = compare(x, y, MetricsConfig(kid_subsets=1, kid_subset_size=20), bootstrap=0)
    want = float(poly_mmd(torch.tensor(x), torch.tensor(y)))
    assert r["kid_mean"] == pytest.approx(want, rel=1e-9) and r["kid_std"] == 0.0 and r["kid_ci"] is None


def test_prdc_leaves_copies_of_a_sample_out_of_its_neighbourhood():
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0]], dtype=torch.float64)
    z = torch.cat([x, x + 0.1])
    dist = torch.cdist(z, z)
    # sample 0 drawn twice: its second copy is not its nearest neighbour, sample 1 is (distance 1)
    ia, ib = torch.tensor([0, 0, 1, 2]), torch.tensor([4, 5, 6, 7])
    r = prdc(dist, ia, ib, k=1)
    assert r["precision"] == 0.75  # 10.1 lies in no real ball; 0.1, 1.1 and 3.1 do
    # a copy as its own neighbour would give both copies of sample 0 a ball of radius 0: coverage 0.5
    assert r["coverage"] == 1.0 and r["recall"] == 1.0
    assert r["density"] == 1.5  # 0.1 lies in 3 balls, 1.1 in 2, 3.1 in 1, 10.1 in none; over 4 fakes, k = 1


def test_bootstrap_mean_interval():
    mean, ci = bootstrap_mean([1.0, 1.0, 1.0], 50, seed=0)
    assert mean == 1.0 and ci == [1.0, 1.0]
    mean, ci = bootstrap_mean([0.0, 1.0] * 20, 200, seed=0)
    assert mean == 0.5 and ci[0] < 0.5 < ci[1]
    assert bootstrap_mean([], 10, 0) == (None, None) and bootstrap_mean([2.0], 0, 0) == (2.0, None)


def test_the_reported_fid_is_monais_and_the_replicates_use_the_same_quantity():
    from monai.metrics import FIDMetric

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(20, 12)), rng.normal(size=(20, 12)) + 0.5
    r = compare(x, y, FAST, bootstrap=20, seed=0)
    assert r["fid"] == pytest.approx(float(FIDMetric()(torch.tensor(y), torch.tensor(x))), rel=1e-9)
    assert r["fid"] == pytest.approx(frechet_distance(torch.tensor(x), torch.tensor(y)), rel=1e-6)
