"""Metrics against independent references: closed-form Gaussians, clean-fid, scipy, float64 recomputation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmvae_study import metrics as M


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    # Diagonal covariances commute, so (S1 S2)^{1/2} = diag(sqrt(v1 v2)).
    exact = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    got = M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("d", [3, 64])
def test_frechet_distance_matches_cleanfid(d):
    from cleanfid.fid import frechet_distance as cleanfid_fd
    rng = np.random.default_rng(d)
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _spd(rng, d), _spd(rng, d)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(float(cleanfid_fd(mu1, s1, mu2, s2)), rel=1e-6)


def test_fid_of_gaussian_samples_matches_true_parameters():
    rng = np.random.default_rng(1)
    d, n = 6, 40_000
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d) + 1.0, _spd(rng, d), _spd(rng, d)
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    true = M.frechet_distance(mu1, s1, mu2, s2)
    # Sampling error of the moment estimates is O(d / sqrt(n)) on quantities of order one.
    assert M.fid_from_features(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(true, rel=0.03)
    assert M.fid_from_features(x[: n // 2], x[n // 2:]) < 0.01


def test_compute_fid_pipeline_equals_features_route():
    """clean-fid plumbing (batching, wrap-around, [-1,1] -> [0,255]) with a cheap known extractor."""
    torch.manual_seed(0)

    def feat(x255: torch.Tensor) -> torch.Tensor:  # (B, 3, 8, 8) in [0, 255] -> (B, 6)
        x = x255 / 255.0
        return torch.cat([x.mean((2, 3)), x.pow(2).mean((2, 3))], 1)

    ex = M.FIDExtractor("toy", 8, feat)
    a = torch.rand(37, 3, 8, 8) * 2 - 1
    b = (torch.rand(29, 3, 8, 8) * 2 - 1) * 0.5
    expect = M.fid_from_features(feat((a + 1) * 127.5), feat((b + 1) * 127.5))
    assert M.compute_fid(a, b, ex, batch_size=16) == pytest.approx(expect, rel=1e-5)
    # callable source with num_gen, and precomputed reference statistics
    it = iter(torch.split(a, 10))
    got = M.compute_fid(lambda k: next(it)[:k], M.feature_stats(feat((b + 1) * 127.5)), ex, batch_size=10, num_gen=37)
    assert got == pytest.approx(M.fid_from_features(feat((a + 1) * 127.5), feat((b + 1) * 127.5)), rel=1e-5)


def test_lite0_features_and_is_run_offline():
    """The real offline extractor end to end on a few images (CPU-slow: keep it to two passes)."""
    ex = M.fid_extractor("lite0")
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    f = M.extract_features(x, ex, batch_size=4)
    assert f.shape == (4, 1280) and np.isfinite(f).all()
    is_mean, _ = M.compute_inception_score(x, ex, batch_size=4, splits=1)
    assert 1.0 <= is_mean <= 4.0
    # One trunk pass for both (the evaluation stage's path) equals the two separate passes.
    img = torch.rand(2, 3, 224, 224) * 255
    feats, probs = ex.features_and_probs(img)
    torch.testing.assert_close(feats, ex(img), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, ex.probs(img), rtol=1e-5, atol=1e-6)
    assert M.metric_name("gfid", "lite0") == "gfid_lite0" and M.metric_name("rfid", "inception") == "rfid_inception"


def test_psnr_known_mse():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 0.5 + 0.25
    sign = torch.randint(0, 2, x.shape).double() * 2 - 1
    y = x + 0.1 * sign                                     # MSE = 0.01 exactly for every image
    assert M.psnr(x, y, data_range=1.0).item() == pytest.approx(10 * math.log10(1 / 0.01), rel=1e-9)
    assert M.psnr(2 * x - 1, 2 * y - 1, data_range=2.0).item() == pytest.approx(20.0, rel=1e-9)
    assert M.psnr(x, y, 1.0, reduction="none").shape == (4,)


def test_inception_score_closed_forms():
    assert M.inception_score(logits=torch.zeros(50, 10))[0] == pytest.approx(1.0, abs=1e-12)
    for k in (1, 3, 7):
        logits = torch.eye(k).repeat(4, 1) * 200.0       # confident, evenly spread over k classes
        logits = torch.cat([logits, torch.zeros(len(logits), 5)], 1)  # extra never-predicted classes
        assert M.inception_score(logits=logits)[0] == pytest.approx(k, rel=1e-9)
    probs = torch.eye(4).repeat(10, 1)
    mean, std = M.inception_score(probs=probs, splits=5)
    assert mean == pytest.approx(4.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_sliced_wasserstein_1d_exact_and_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 1)), rng.normal(1.5, 2.0, size=(500, 1))
    w2 = np.sqrt(np.mean((np.sort(a[:, 0]) - np.sort(b[:, 0])) ** 2))
    assert M.sliced_wasserstein(a, b, n_proj=16) == pytest.approx(w2, rel=1e-12)
    # a pure translation by m: every projection moves by <m, theta>, E<m, theta>^2 = |m|^2 / D
    x = torch.randn(2000, 8, dtype=torch.float64)
    m = torch.full((8,), 0.5, dtype=torch.float64)
    assert M.sliced_wasserstein(x, x + m, n_proj=2048) == pytest.approx(m.norm().item() / math.sqrt(8), rel=0.05)
    same = M.sliced_wasserstein(torch.randn(2000, 8), torch.randn(2000, 8))
    assert same < 0.1 < M.sliced_wasserstein(torch.randn(2000, 8), torch.randn(2000, 8) + 1.0)
    # unequal set sizes go through quantile interpolation and still see the shift
    assert M.sliced_wasserstein(torch.randn(300, 2), torch.randn(700, 2) + 2) > 1.0


def test_mmd_matches_float64_recomputation_and_detects_shift():
    torch.manual_seed(0)
    x, y = torch.randn(120, 3, dtype=torch.float64), torch.randn(90, 3, dtype=torch.float64) + 0.7
    hs = [0.5, 2.0]
    k = lambda a, b: sum(torch.exp(-torch.cdist(a, b) ** 2 / (2 * h * h)) for h in hs)  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    ref = ((kxx.sum() - kxx.diag().sum()) / (120 * 119) + (kyy.sum() - kyy.diag().sum()) / (90 * 89)
           - 2 * k(x, y).mean()).item()
    assert M.mmd_rbf(x, y, hs) == pytest.approx(ref, rel=1e-10)
    same = M.mmd_rbf(torch.randn(400, 3), torch.randn(400, 3))
    assert abs(same) < 0.01 < M.mmd_rbf(torch.randn(400, 3), torch.randn(400, 3) + 1.0)


def test_energy_distance_matches_scipy_and_detects_shift():
    from scipy.stats import energy_distance as scipy_ed
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.normal(0.5, 1.3, size=200)
    v_stat = M.energy_distance(a[:, None], b[:, None], unbiased=False)
    assert math.sqrt(v_stat) == pytest.approx(scipy_ed(a, b), rel=1e-9)
    same = M.energy_distance(torch.randn(500, 2), torch.randn(500, 2))
    assert abs(same) < 0.02 < M.energy_distance(torch.randn(500, 2), torch.randn(500, 2) + 1.0)


def test_diversity_closed_forms():
    e = torch.eye(4)
    assert M.diversity(e, [0, 0, 0, 0]) == pytest.approx(1.0)       # orthogonal: cos 0
    assert M.diversity(torch.ones(5, 3), None) == pytest.approx(0.0, abs=1e-12)  # identical: cos 1
    feats = torch.cat([torch.ones(3, 2), e[:3, :2] * 0 + torch.tensor([[1.0, 0], [0, 1], [1, 0]])])
    labels = [0, 0, 0, 1, 1, 1]
    # class 1 pairs: (a,b)=0, (a,c)=1, (b,c)=0 -> mean cos 1/3; class 0 -> 1; diversity = mean(0, 2/3)
    assert M.diversity(feats, labels) == pytest.approx((0 + 2 / 3) / 2)



def _fid_mp(x, y, dps=40):
    """FID of two sample sets in 40-digit arithmetic (mpmath): np.cov statistics, S1^{1/2} by `eigsy`,
    tr (S1^{1/2} S2 S1^{1/2})^{1/2}, as `frechet_distance` defines it."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = dps
    d = x.shape[1]

    def stats(f):
        n = len(f)
        mu = [mp.fsum(mp.mpf(f[i, j]) for i in range(n)) / n for j in range(d)]
        s = mp.matrix(d, d)
        for a in range(d):
            for b in range(a, d):
                s[a, b] = s[b, a] = mp.fsum((f[i, a] - mu[a]) * (f[i, b] - mu[b]) for i in range(n)) / (n - 1)
        return mu, s

    (m1, s1), (m2, s2) = stats(x), stats(y)
    e, q = mp.eigsy(s1)
    root = q * mp.diag([mp.sqrt(max(v, 0)) for v in e]) * q.T
    e2, _ = mp.eigsy(root * s2 * root)
    tr = mp.fsum(mp.sqrt(max(v, 0)) for v in e2)
    return float(mp.fsum((m1[j] - m2[j]) ** 2 for j in range(d)) + mp.fsum(s1[j, j] + s2[j, j] for j in range(d))
                 - 2 * tr)


@pytest.mark.parametrize("n1,n2", [(8, 8), (8, 50), (30, 12), (2, 60)])
def test_small_sample_fid_matches_a_40_digit_computation(n1, n2):
    """With no more samples than dimensions (D = 24) fid_from_features and fid_features_vs_stats take
    the N x N sample-space route; it equals FID computed in 40-digit arithmetic to float64 round-off.
    (The D x D route is off by ~1e-8 relative there: square roots of eigenvalues that are zero up to
    round-off.)"""
    rng = np.random.default_rng(n1 * 1000 + n2)
    d = 24
    x = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d)) / 4
    y = rng.normal(size=(n2, d)) * rng.uniform(0.5, 2, d) + 0.3
    exact = _fid_mp(x, y)
    assert M.fid_from_features(x, y) == pytest.approx(exact, rel=1e-11)
    assert M.fid_from_features(torch.from_numpy(y), torch.from_numpy(x)) == pytest.approx(exact, rel=1e-11)
    for f, g in ((x, y), (y, x)):
        # sample-space route when f has <= D samples; else the D x D route (stats of g may be rank < D)
        tol = 1e-11 if len(f) <= d else 1e-6
        assert M.fid_features_vs_stats(f, *M.feature_stats(g)) == pytest.approx(exact, rel=tol)
    full = M.frechet_distance(*M.feature_stats(x), *M.feature_stats(y))  # the D x D route: same value
    assert full == pytest.approx(exact, rel=1e-6)
