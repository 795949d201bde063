"""diffusion_jax.metrics.frechet: FID, IS and statistics files against closed forms and scipy."""

import numpy as np
import pytest
import scipy.linalg

from diffusion_jax.metrics.frechet import (
    compute_statistics,
    frechet_distance,
    inception_score,
    load_statistics,
    save_statistics,
)


def _scipy_fid(mu1, sigma1, mu2, sigma2):
    """The pytorch-fid/TTUR reference: scipy sqrtm of S1 S2, eps offset if not finite."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _features(rng, n, d, shift=0.0, scale=1.0):
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    return (rng.standard_normal((n, d)) @ mixing) * scale + shift


def test_statistics_match_numpy():
    x = _features(np.random.default_rng(0), 300, 16).astype(np.float32)
    mu, sigma = compute_statistics(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)


def test_fid_of_a_set_with_itself_is_zero():
    mu, sigma = compute_statistics(_features(np.random.default_rng(1), 500, 32))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fid_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(2)
    d = 20
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    # commuting covariances: tr((S1 S2)^(1/2)) = sum sqrt(v1 v2), so the FID is explicit
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(want, rel=1e-12)


def test_fid_closed_form_for_rotated_gaussians():
    rng = np.random.default_rng(3)
    d = 12
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    v1, v2 = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
    s1 = rotation @ np.diag(v1) @ rotation.T
    s2 = rotation @ np.diag(v2) @ rotation.T
    want = np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(np.zeros(d), s1, np.zeros(d), s2) == pytest.approx(want, rel=1e-10)


def test_fid_matches_scipy_reference_on_random_features():
    rng = np.random.default_rng(4)
    mu1, s1 = compute_statistics(_features(rng, 400, 48))
    mu2, s2 = compute_statistics(_features(rng, 400, 48, shift=0.3, scale=1.5))
    want = _scipy_fid(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-9)
    assert got > 1.0


def test_fid_with_near_singular_covariance_stays_finite():
    rng = np.random.default_rng(5)
    d = 64
    # N < D: both covariances have rank <= 39 and are singular
    mu1, s1 = compute_statistics(_features(rng, 40, d))
    mu2, s2 = compute_statistics(_features(rng, 40, d, shift=0.1))
    assert np.linalg.matrix_rank(s1) < d
    got = frechet_distance(mu1, s1, mu2, s2)
    want = _scipy_fid(mu1, s1, mu2, s2)
    assert np.isfinite(got)
    assert got == pytest.approx(want, rel=1e-4)
    # a set with itself stays ~0 even when singular
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * np.trace(s1)


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_identical_predictions_is_one():
    logits = np.tile(np.random.default_rng(6).standard_normal(1008), (100, 1))
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 7, 10])
def test_inception_score_of_k_equally_used_one_hot_classes_is_k(k):
    splits, per_class = 5, 4
    labels = np.tile(np.arange(k), splits * per_class)  # every split uses each class equally
    logits = np.full((labels.size, 1008), -1e4)
    logits[np.arange(labels.size), labels] = 1e4  # one-hot softmax (exact 0 and 1)
    mean, std = inception_score(logits, splits=splits)
    assert mean == pytest.approx(k, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_reference_formula():
    rng = np.random.default_rng(7)
    logits = 3 * rng.standard_normal((103, 20))
    preds = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(4):  # improved-gan's loop, uneven split sizes included
        part = preds[i * 103 // 4 : (i + 1) * 103 // 4]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    mean, std = inception_score(logits, splits=4)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-9)


def test_statistics_npz_round_trip(tmp_path):
    mu, sigma = compute_statistics(_features(np.random.default_rng(8), 50, 6))
    path = tmp_path / "stats.npz"
    save_statistics(path, mu, sigma)
    with np.load(path) as data:  # the pytorch-fid / TTUR layout
        assert sorted(data.files) == ["mu", "sigma"]
    mu2, sigma2 = load_statistics(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # a float32 file as some tools write it loads as float64
    np.savez(tmp_path / "f32.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    mu3, _ = load_statistics(tmp_path / "f32.npz")
    assert mu3.dtype == np.float64
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(KeyError, match="mu"):
        load_statistics(tmp_path / "bad.npz")
