"""The FID reference cache is private: a ref_*.npy planted in a shared folder never becomes the reference."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from gd.io import UntrustedPathError
from gd.metrics import fid


class _Extractor:
    """Stands in for Inception (the cache logic only needs its provenance); counts feature computations."""

    calls = 0

    def describe(self) -> dict:
        return {"label": "test", "source": "test", "mode": "clean", "weights": "none"}

    def images_features(self, images: np.ndarray, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        self.calls += 1
        return images.reshape(len(images), -1)[:, :4].astype(np.float32)


@pytest.fixture
def reference(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8))
    return path


def test_cache_in_a_folder_of_another_user_is_refused(reference, tmp_path):
    """Fails before the fix: the default cache was /tmp/.cache/gd-fid when HOME was unset, and a planted
    ref_<key>.npy there was loaded as the reference features."""
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    shared = tmp_path / "shared"
    shared.mkdir()
    extractor = _Extractor()
    planted = fid._cache_path(shared, reference, extractor, "npz:None")
    np.save(planted, np.zeros((6, 4), np.float32))
    os.chown(shared, 65534, 65534)
    with pytest.raises(UntrustedPathError, match=rf"{shared} is owned by .*uid 65534"):
        fid.reference_features(str(reference), extractor, cache_dir=shared)
    assert extractor.calls == 0


def test_private_cache_is_made_0700_and_reused(reference, tmp_path):
    """The cache folder is created 0700 and a second evaluation reads the stored features instead of recomputing."""
    cache = tmp_path / "home" / ".cache" / "gd-fid"
    extractor = _Extractor()
    first = fid.reference_features(str(reference), extractor, cache_dir=cache)
    second = fid.reference_features(str(reference), extractor, cache_dir=cache)
    assert extractor.calls == 1 and np.array_equal(first.mu, second.mu)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
