"""Image sources: robust decoding of odd files, ADM center crop, Fashion-MNIST idx reader."""
import gzip

import numpy as np
import pytest
from PIL import Image

from gd.data.sources import FashionMNISTSource, ImageFolderSource, center_crop_arr, load_image, read_idx_gz
from tests.data.conftest import NUM_FASHION, PLANTED


def test_folder_source_skips_bad_and_converts_odd_files(image_tree):
    src = ImageFolderSource(image_tree, 28)
    assert len(src) == NUM_FASHION + len(PLANTED)          # notes.txt is not listed
    assert src.num_classes == 10 and src.class_names[0] == "class00"
    outcome = {}
    for i in range(len(src)):
        img, label, info = src.read(i)
        name = info.split(":")[0].rsplit("/", 1)[-1]
        outcome[name] = "skip" if img is None else "ok"
        if img is not None:
            assert img.shape == (28, 28, 3) and img.dtype == np.uint8
    assert {k: outcome[k] for k in PLANTED} == PLANTED


def test_rgba_is_composited_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "t.png")
    img, _ = load_image(tmp_path / "t.png", 8)
    assert (img == 255).all()


def test_center_crop_matches_reference_loop():
    """Reference: crop window of the resized image computed by hand (short side -> 16, then central 16x16)."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    out = center_crop_arr(Image.fromarray(arr), 16)
    # 40x70 >= 2*16 -> BOX-halve to 20x35, then bicubic to 16x28, then crop columns 6..22.
    ref = Image.fromarray(arr).resize((35, 20), resample=Image.BOX).resize((28, 16), resample=Image.BICUBIC)
    ref = np.array(ref)[0:16, 6:22]
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, ref)


def test_fashion_mnist_source(fashion_mnist_dir):
    src = FashionMNISTSource(fashion_mnist_dir, "test", image_size=28, limit=50)
    raw = read_idx_gz(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")
    img, label, _ = src.read(7)
    np.testing.assert_array_equal(img[:, :, 0], raw[7])
    assert np.array_equal(img[:, :, 0], img[:, :, 2]) and 0 <= label < 10 and len(src) == 50


def test_idx_reader_rejects_non_idx(tmp_path):
    p = tmp_path / "bad.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\x01\x02\x08\x01" + b"\0" * 8)
    with pytest.raises(ValueError, match="not an idx"):
        read_idx_gz(p)


def test_missing_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNISTSource(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope", 32)
