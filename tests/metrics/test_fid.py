"""FID / IS / precision-recall against independent float64 references on constructed data."""
import numpy as np
import pytest
import scipy.linalg

from gd.metrics.fid import feature_stats, frechet_distance, inception_score, precision_recall, reference_features
from gd.metrics.inception import build_inception


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook FID with explicit loops for the moments and scipy's sqrtm, all float64."""
    def moments(x):
        n, d = x.shape
        mu = np.zeros(d)
        for row in x:
            mu += row
        mu /= n
        cov = np.zeros((d, d))
        for row in x:
            c = row - mu
            cov += np.outer(c, c)
        return mu, cov / (n - 1)

    mu1, s1 = moments(a.astype(np.float64))
    mu2, s2 = moments(b.astype(np.float64))
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n,d,shift", [(200, 16, 0.0), (300, 32, 0.5), (64, 48, 2.0)])
def test_fid_matches_scipy_sqrtm(n, d, shift):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
    b = rng.normal(size=(n, d)) * 1.3 + shift
    sa, sb = feature_stats(a.astype(np.float32)), feature_stats(b.astype(np.float32))
    ours = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    ref = reference_fid(a.astype(np.float32), b.astype(np.float32))
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-8)


def test_fid_of_identical_sets_is_zero_and_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 1
    s, t = feature_stats(a), feature_stats(b)
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-9
    assert frechet_distance(s.mu, s.sigma, t.mu, t.sigma) == pytest.approx(frechet_distance(t.mu, t.sigma, s.mu, s.sigma))


def test_fid_rejects_mismatched_stats():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_on_constructed_logits():
    k = 10
    confident_uniform = np.full((1000, k), -50.0)
    confident_uniform[np.arange(1000), np.arange(1000) % k] = 50.0
    assert inception_score(confident_uniform, splits=10)[0] == pytest.approx(k, rel=1e-6)
    one_class = np.zeros((1000, k))
    one_class[:, 3] = 50.0
    assert inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)
    blurry = np.zeros((1000, k))
    assert inception_score(blurry)[0] == pytest.approx(1.0, abs=1e-9)


def test_precision_recall_on_constructed_manifolds():
    rng = np.random.default_rng(0)
    centres = np.eye(4) * 100
    real = np.concatenate([c + rng.normal(size=(100, 4)) for c in centres])
    same = np.concatenate([c + rng.normal(size=(100, 4)) for c in centres])
    p, r = precision_recall(real, same, k=3)
    assert p > 0.9 and r > 0.9
    one_mode = centres[0] + rng.normal(size=(400, 4))  # mode collapse: precise, no recall
    p, r = precision_recall(real, one_mode, k=3)
    assert p > 0.9 and 0.2 < r < 0.3
    far = rng.normal(size=(400, 4)) + 1000.0
    assert precision_recall(real, far, k=3) == (0.0, 0.0)


def test_precomputed_adm_stats_warn_outside_legacy_mode(tmp_path, recwarn, capsys):
    """ADM's mu/sigma come from the TF pipeline: using them with clean-mode features warns, legacy mode does not."""
    ref = tmp_path / "adm_ref.npz"
    mu, sigma = np.zeros(2048, np.float64), np.eye(2048)
    np.savez(ref, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma)
    with pytest.warns(UserWarning, match="not comparable with clean-mode"):
        stats = reference_features(str(ref), build_inception("fid_helper", "clean"), use_precomputed=True)
    assert np.array_equal(stats.mu, mu) and "WARNING: metrics.use_precomputed=true" in capsys.readouterr().err
    recwarn.clear()
    reference_features(str(ref), build_inception("fid_helper", "legacy_tensorflow"), use_precomputed=True)
    assert not [w for w in recwarn if "not comparable" in str(w.message)]
