"""Our FID pieces against clean-fid's own: its frechet_distance on the same statistics (n > d and n < d), the
legacy TensorFlow mode's resize inside our extractor, and clean-fid's precomputed `cleanfid:` references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from cleanfid.fid import frechet_distance as cleanfid_frechet

from gd.metrics import inception as inc
from gd.metrics.fid import feature_stats, frechet_distance, reference_features
from tests.metrics.test_inception import tf1_resize_bilinear


@pytest.mark.parametrize("n,d", [(400, 32), (24, 48)])
def test_frechet_distance_equals_cleanfid(n: int, d: int) -> None:
    """The same statistics through ours and clean-fid's function: equal for well-conditioned covariances, and for
    n < d (rank-deficient, where clean-fid falls back to a 1e-6 diagonal offset) equal to that offset's order.
    Catches a wrong trace term, a mean term squared wrongly, or a covariance normalised by n instead of n - 1
    (feature_stats' sigma is compared with numpy's np.cov, what clean-fid's get_folder/get_files stats use)."""
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.2
    b = rng.normal(size=(n, d)) * 1.1 + 0.3
    sa, sb = feature_stats(a), feature_stats(b)
    np.testing.assert_allclose(sa.sigma, np.cov(a, rowvar=False), rtol=1e-12)
    ours = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    theirs = float(cleanfid_frechet(sa.mu, sa.sigma, sb.mu, sb.sigma))
    assert ours == pytest.approx(theirs, rel=1e-6 if n > d else 1e-3)


def test_legacy_mode_resizes_inside_with_tensorflow_bilinear() -> None:
    """legacy_tensorflow features = the network on the image resized by TF1 resize_bilinear (written out in the
    Inception tests) to 299, no resize outside; catches clean-fid's PIL resize applied in legacy mode, or a
    half-pixel-centre bilinear."""
    ex = inc.build_inception("fid_helper", "legacy_tensorflow")
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(1, 20, 20, 3), dtype=np.uint8)
    got = ex.images_features(img, batch_size=1)
    resized = tf1_resize_bilinear(img[0].transpose(2, 0, 1).astype(np.float64), inc.INPUT_SIZE)
    with torch.no_grad():
        want = ex.trunk((torch.tensor(resized[None], dtype=torch.float32) - 128.0) / 128.0)
    np.testing.assert_allclose(got, want.reshape(1, -1).numpy(), rtol=1e-3, atol=1e-4)


def test_cleanfid_reference_statistics_are_used_as_given(tmp_path, monkeypatch) -> None:
    """A `cleanfid:<name>:<res>:<split>` reference reads clean-fid's statistics file for the extractor's mode and
    scores against it exactly as clean-fid's frechet_distance does; a missing file names its URL and place."""
    ex = inc.build_inception("fid_helper", "clean")
    monkeypatch.setenv("GD_CLEANFID_STATS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"(?s)toy_clean_train_32.npz.*cs.cmu.edu/~clean-fid/stats"):
        reference_features("cleanfid:toy:32:train", ex)
    rng = np.random.default_rng(0)
    mu, feats = rng.normal(size=16), rng.normal(size=(64, 16))
    sigma = np.cov(feats, rowvar=False)
    np.savez(tmp_path / "toy_clean_train_32.npz", mu=mu, sigma=sigma)
    ref = reference_features("cleanfid:toy:32:train", ex)
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    gen = feature_stats(rng.normal(size=(80, 16)) + 0.5)
    assert frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma) == pytest.approx(
        float(cleanfid_frechet(gen.mu, gen.sigma, mu, sigma)), rel=1e-6)
