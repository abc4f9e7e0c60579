"""gd.evaluate end to end with the offline fid-helper Inception against real Fashion-MNIST images."""
import hashlib
import json

import numpy as np
import pytest
from cleanfid.fid import frechet_distance as cleanfid_frechet
from PIL import Image

from gd.evaluate import evaluate
from gd.metrics.fid import frechet_distance, reference_features
from gd.metrics.inception import FID_HELPER_LABEL, build_inception
from tests.sample.conftest import compose_cfg, fashion_mnist_images, sample_overrides


def loop_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al.) with explicit loops in float64: a point is covered by a set
    when it lies within some set member's distance to that member's k-th nearest neighbour (itself excluded)."""
    def radii(x):
        out = []
        for i in range(len(x)):
            d = sorted(float(np.sqrt(((x[i] - x[j]) ** 2).sum())) for j in range(len(x)) if j != i)
            out.append(d[k - 1])
        return out

    def covered(points, centres, r):
        hits = 0
        for p in points:
            hits += any(float(np.sqrt(((p - c) ** 2).sum())) <= rc for c, rc in zip(centres, r))
        return hits / len(points)

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


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
    assert written["ckpt"] == str(tiny_ckpt)
    assert written["ckpt_sha256"] == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    assert written["sampler"]["method"] == "sde" and written["num_images"] == 40
    assert written["inception_score"] is None and "output layer" in written["inception_score_note"]
    assert len(written["config_hash"]) == 16

    # The numbers again, independently: features of the written samples and of the reference images through the
    # network, statistics with numpy, FID with clean-fid's own function, precision/recall with explicit loops.
    extractor = build_inception("fid_helper", "clean")
    with np.load(written["samples"]) as npz:
        gen = extractor.images_features(npz["arr_0"], batch_size=20).astype(np.float64)
    ref = extractor.images_features(np.stack([np.asarray(Image.open(p)) for p in sorted(half_a.iterdir())])[..., None],
                                    batch_size=20).astype(np.float64)
    fid = cleanfid_frechet(gen.mean(0), np.cov(gen, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False))
    assert written["fid"] == pytest.approx(float(fid), rel=1e-4)
    p_ref, r_ref = loop_precision_recall(ref, gen, k=3)
    assert (written["precision"], written["recall"]) == pytest.approx((p_ref, r_ref), abs=1e-9)

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
