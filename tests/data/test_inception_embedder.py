"""embedder=inception: fid-helper's Inception-v3 pool features as grouping embeddings (a handful of real images)."""
import numpy as np
import pytest
import torch

from gd.data.embedders import InceptionEmbedder, build_embedder
from gd.data.sources import FashionMNISTSource


def test_features_at_299_are_the_fid_networks_pool_features():
    """At 299 px (no resize on either side) the embedding is the L2-normalised output of the FID extractor itself.
    Catches a wrong input scaling ((x-128)/128), a pool taken over the wrong layer, or another network."""
    from gd.metrics.inception import build_inception

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    emb = InceptionEmbedder(image_size=299).embed(images, np.zeros(2, np.int64), np.arange(2))
    ref = build_inception("fid_helper", "legacy_tensorflow")(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    ref = ref.double().numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert emb.shape == (2, 2048) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, ref, atol=2e-5)


def test_small_inputs_group_fashion_mnist_by_class(fashion_mnist_dir):
    """Twelve real images of three classes (trouser, sneaker, bag) at 96 px: at least 9 of the 12 nearest neighbours
    share the image's class (chance: 3 of 11 each, ~3 of 12; measured: 10). Catches embeddings that ignore the image
    (a constant, a broken resize) or are not unit norm."""
    src = FashionMNISTSource(fashion_mnist_dir, split="test", limit=400)
    rows = np.concatenate([np.flatnonzero(src.labels == c)[:4] for c in (1, 7, 8)])
    images = np.stack([src.read(int(i))[0] for i in rows])
    emb = build_embedder("inception", image_size=96).embed(images, src.labels[rows], rows)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    nearest = sim.argmax(1)
    assert (src.labels[rows][nearest] == src.labels[rows]).sum() >= 9, sim.round(3)


def test_too_small_input_is_refused_before_loading():
    """Inception-v3 needs >= 75 px: a smaller image_size fails at once, naming the value."""
    with pytest.raises(ValueError, match="image_size=64"):
        build_embedder("inception", image_size=64)
