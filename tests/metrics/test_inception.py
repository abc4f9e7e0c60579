"""Inception extractor: offline fid-helper source, resize modes, clean-fid file handling."""
import numpy as np
import pytest
import torch

from gd.metrics import inception as inc


def tf1_resize_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False), explicit loops, float64."""
    c, h, w = img.shape
    out = np.zeros((c, size, size))
    for i in range(size):
        sy = i * h / size
        y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); fy = sy - y0
        for j in range(size):
            sx = j * w / size
            x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); fx = sx - x0
            top = img[:, y0, x0] * (1 - fx) + img[:, y0, x1] * fx
            bot = img[:, y1, x0] * (1 - fx) + img[:, y1, x1] * fx
            out[:, i, j] = top * (1 - fy) + bot * fy
    return out


def test_tf_bilinear_resize_matches_tf1_definition():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, size=(3, 7, 5))
    ours = inc.tf_bilinear_resize(torch.tensor(img[None], dtype=torch.float64), size=13)[0].numpy()
    np.testing.assert_allclose(ours, tf1_resize_bilinear(img, 13), atol=1e-9)


@pytest.fixture(scope="module")
def fid_helper_clean():
    return inc.build_inception("fid_helper", "clean")


def test_fid_helper_loads_offline_and_is_labelled(fid_helper_clean):
    ex = fid_helper_clean
    assert ex.source == "fid_helper" and ex.label == inc.FID_HELPER_LABEL and not ex.has_logits
    import hashlib
    assert hashlib.sha1(ex.weights_path.read_bytes()).hexdigest() == inc.FID_HELPER_SHA1
    # the TF graph's pool_3 trunk: 94 conv+BN layers (weight, beta, mean, var; no gamma) = 21.8M numbers
    sd = ex.trunk.state_dict()
    assert len(sd) == 4 * 94 and sum(v.numel() for v in sd.values()) == 21_802_784


def test_features_clean_and_legacy_modes(fid_helper_clean):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(2, 28, 28, 1), dtype=np.uint8)
    f_clean = fid_helper_clean.images_features(gray, batch_size=2)
    legacy = inc.build_inception("fid_helper", "legacy_tensorflow")
    f_legacy = legacy.images_features(gray, batch_size=2)
    assert f_clean.shape == f_legacy.shape == (2, 2048) and np.isfinite(f_clean).all()
    assert (f_clean >= 0).all()  # average of ReLU outputs
    assert not np.allclose(f_clean, f_legacy)  # different resize filters
    # grayscale is expanded to three equal channels
    np.testing.assert_array_equal(f_clean, fid_helper_clean.images_features(np.repeat(gray, 3, -1), batch_size=2))


def test_bad_inputs_fail_clearly(fid_helper_clean, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        fid_helper_clean.images_features(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="metrics.inception"):
        inc.build_inception("torchvision")
    if inc.find_cleanfid_inception(tmp_path) is None:
        with pytest.raises(FileNotFoundError, match=r"/tmp/inception-2015-12-05\.pt"):
            inc.build_inception("cleanfid", path=tmp_path)


def test_auto_fallback_says_which_file_to_put_where(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GD_INCEPTION_PATH", raising=False)
    if inc.find_cleanfid_inception(tmp_path) is not None:
        pytest.skip("clean-fid's inception-2015-12-05.pt is here: auto does not fall back")
    with pytest.warns(UserWarning, match=r"falling back to fid-helper.*/tmp/inception-2015-12-05\.pt"):
        ex = inc.build_inception("auto", path=tmp_path)
    assert ex.source == "fid_helper" and ex.label == inc.FID_HELPER_LABEL
    err = capsys.readouterr().err
    assert "WARNING: metrics.inception=auto" in err and str(tmp_path / inc.CLEANFID_FILE) in err


@pytest.mark.skipif(inc.find_cleanfid_inception() is None, reason="clean-fid's inception-2015-12-05.pt not here")
def test_fid_helper_equals_cleanfid_weights():
    report = inc.compare_with_cleanfid()
    assert report["identical"], report
