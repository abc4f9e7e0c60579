"""gd.evaluate end to end with the offline fid-helper Inception against real Fashion-MNIST images."""
import json

import numpy as np
import pytest
from PIL import Image

from gd.evaluate import evaluate
from gd.metrics.fid import frechet_distance, reference_features
from gd.metrics.inception import FID_HELPER_LABEL, build_inception
from tests.sample.conftest import compose_cfg, fashion_mnist_images, sample_overrides


@pytest.mark.slow
def test_fid_real_halves_beat_generated_noise(tiny_ckpt, tmp_path, fashion_mnist_dir):
    real = fashion_mnist_images(fashion_mnist_dir, 80)
    half_a = tmp_path / "real_a"
    half_a.mkdir()
    for i, img in enumerate(real[:40]):
        Image.fromarray(img).save(half_a / f"{i:03d}.png")
    half_b = tmp_path / "real_b.npz"
    np.savez(half_b, arr_0=np.repeat(real[40:, :, :, None], 3, axis=-1))
    cache = tmp_path / "cache"
    overrides = sample_overrides(tiny_ckpt, tmp_path / "gen", num_images=40, batch_groups=5) + [
        f"metrics.reference={half_a}", "metrics.inception=fid_helper", f"metrics.cache_dir={cache}",
        "metrics.batch_size=20", "metrics.device=cpu"]
    result = evaluate(compose_cfg(overrides))

    written = json.loads(open(result["json"]).read())
    assert written["inception"]["label"] == FID_HELPER_LABEL and FID_HELPER_LABEL in written["fid_label"]
    assert written["ckpt"] == str(tiny_ckpt) and len(written["ckpt_sha256"]) == 64
    assert written["sampler"]["method"] == "sde" and written["num_images"] == 40
    assert written["inception_score"] is None and "output layer" in written["inception_score_note"]
    assert 0.0 <= written["precision"] <= 1.0 and 0.0 <= written["recall"] <= 1.0
    assert len(written["config_hash"]) == 16

    extractor = build_inception("fid_helper", "clean")
    a = reference_features(str(half_a), extractor, cache_dir=cache)  # cached by evaluate
    b = reference_features(str(half_b), extractor, batch_size=20)
    fid_real = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    print(f"FID(real A, real B) = {fid_real:.1f}, FID(real A, generated) = {written['fid']:.1f}")
    assert 0.0 < fid_real < written["fid"], (fid_real, written["fid"])


def test_missing_reference_fails_before_sampling(tiny_ckpt, tmp_path):
    cfg = compose_cfg(sample_overrides(tiny_ckpt, tmp_path / "gen") + [f"metrics.reference={tmp_path}/nope"])
    with pytest.raises(FileNotFoundError, match="nope"):
        evaluate(cfg)
    assert not (tmp_path / "gen").exists()
