"""Class-balanced group layout and per-index noise."""
import numpy as np
import pytest
import torch

from gd.sample import Layout, slot_noise, write_npz


@pytest.mark.parametrize("num_images,classes,n,bg", [(40, 10, 4, 2), (60, 10, 4, 3), (50000, 1000, 16, 16)])
def test_layout_is_class_balanced_in_groups(num_images, classes, n, bg):
    lay = Layout(num_images, classes, n, bg)
    slots = np.arange(lay.num_slots)
    labels, kept = lay.slot_labels(slots), lay.slot_kept(slots)
    assert kept.sum() == num_images
    assert np.bincount(labels[kept], minlength=classes).tolist() == [num_images // classes] * classes
    assert (labels.reshape(-1, n) == labels.reshape(-1, n)[:, :1]).all()  # a group shares one class
    idx = lay.output_index(slots[kept])
    assert sorted(idx.tolist()) == list(range(num_images))
    chunks = np.concatenate([lay.chunk_slots(c) for c in range(lay.num_chunks)])
    np.testing.assert_array_equal(chunks, slots)
    owned = sorted(sum((lay.rank_chunks(r, 3) for r in range(3)), []))
    assert owned == list(range(lay.num_chunks))


def test_layout_rejects_unbalanced_counts():
    with pytest.raises(ValueError, match="num_images=45 is not a multiple of num_classes=10"):
        Layout(45, 10, 4, 2)


def test_noise_depends_only_on_seed_and_index():
    a = slot_noise(7, np.array([3, 4, 5]), (1, 4, 4))
    b = slot_noise(7, np.array([5, 9, 3]), (1, 4, 4))
    assert torch.equal(a[0], b[2]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], slot_noise(8, np.array([3]), (1, 4, 4))[0])


def test_npz_writer_is_adm_compatible_and_reproducible(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    write_npz(tmp_path / "a.npz", {"arr_0": ((5, 4, 4, 3), np.uint8, [imgs[:2], imgs[2:]]), "arr_1": np.arange(5)})
    write_npz(tmp_path / "b.npz", {"arr_0": imgs, "arr_1": np.arange(5)})
    with np.load(tmp_path / "a.npz") as d:
        np.testing.assert_array_equal(d["arr_0"], imgs)
        assert d["arr_0"].dtype == np.uint8 and d["arr_1"].tolist() == list(range(5))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
