"""faiss retrieval against a brute-force float64 reference; tau filter, fallback order, group draws, stats."""
import numpy as np
import pytest

from gd.data.embedders import build_embedder, l2_normalize
from gd.data.grouping import (ExactSearch, build_index, draw_group, group_stats, hash_uniform, index_plan,
                             load_index, measure_scan_rate, order_candidates, retrieval_estimate, save_index,
                             search_neighbours)


def _reference_knn(x: np.ndarray, k: int):
    x = x.astype(np.float64)
    nbrs, sims = [], []
    for i in range(len(x)):
        s = [(float(np.dot(x[i], x[j])), j) for j in range(len(x)) if j != i]
        s.sort(key=lambda t: -t[0])
        nbrs.append([j for _, j in s[:k]])
        sims.append([v for v, _ in s[:k]])
    return np.array(nbrs), np.array(sims)


@pytest.mark.parametrize("kind", ["flat", "ivf", "exact-gpu"])
def test_search_matches_brute_force(kind, tmp_path):
    """Each searcher (faiss flat and IVF through a saved, memory-mapped index; the exact torch search the builder
    runs on GPUs, here on the CPU) against an explicit float64 loop; queries given in two halves, as two ranks
    would search their own chunks, with the embeddings stored as several chunks."""
    x = l2_normalize(np.random.default_rng(0).standard_normal((120, 16))).astype(np.float32)
    chunks = [x[:50], x[50:]]
    plan = index_plan(120, 16, kind, nlist=4, nprobe=4)      # nprobe = nlist: IVF is exact too
    if kind == "exact-gpu":
        index = ExactSearch(chunks, "cpu", block=32)
    else:
        save_index(build_index(chunks, plan), tmp_path / "index.faiss")
        index = load_index(tmp_path / "index.faiss", plan.nprobe)
    halves = [np.arange(0, 60), np.arange(60, 120)]
    found = [search_neighbours(index, x[rows], rows, 5) for rows in halves]
    nbr, sim = np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
    ref_n, ref_s = _reference_knn(x, 5)
    np.testing.assert_allclose(sim, ref_s, atol=1e-5)
    assert (nbr == ref_n).mean() > 0.99                      # ties aside, the same neighbours
    assert not (nbr == np.arange(120)[:, None]).any()


def test_index_plan_picks_exact_ivf_or_gpu_and_estimates_the_cost():
    """The auto rule and the arithmetic the printed estimate rests on (ImageNet: 1.28M x 768)."""
    m, d = 1_281_167, 768
    assert index_plan(150_000, d, use_gpu=False).kind == "flat"
    ivf = index_plan(m, d, use_gpu=False)
    assert (ivf.kind, ivf.nlist, ivf.nprobe, ivf.train_points) == ("ivf", 4527, 32, 64 * 4527)
    assert index_plan(m, d, use_gpu=True).kind == "exact-gpu"
    assert ivf.index_bytes == 4 * m * d
    build, search = ivf.flops(1000)
    assert build == 2.0 * 64 * 4527 * 4527 * d * 10 + 2.0 * m * 4527 * d
    assert search == pytest.approx(2.0 * 1000 * (4527 + 32 / 4527 * m) * d)
    exact = index_plan(m, d, "exact-gpu")
    assert exact.flops(m) == (0.0, 2.0 * m * m * d)
    text = retrieval_estimate(ivf, 32, 1e11)
    assert "ivf, nlist 4527, nprobe 32" in text and "(3.7 GiB)" in text and "~40,037 queries" in text
    # An IVF search reads each scanned list from memory: 4 bytes x d per stored vector of its nprobe lists.
    assert ivf.scan_bytes(1000) == pytest.approx(4.0 * 1000 * 32 / 4527 * m * d)
    assert exact.scan_bytes(1000) == 0.0
    build_s, search_s = ivf.seconds(1000, 1e11, 1e10)
    assert build_s == pytest.approx(build / 1e11)
    assert search_s == pytest.approx(2.0 * 1000 * 4527 * d / 1e11 + 4.0 * 1000 * 32 / 4527 * m * d / 1e10)
    assert ivf.seconds(1000, 1e11) == pytest.approx((build / 1e11, search / 1e11))
    text = retrieval_estimate(ivf, 32, 1e11, 1e10)
    assert "list scans at 10.0 GB/s" in text and f"in ~{ivf.seconds(40037, 1e11, 1e10)[1] / 60:.1f} min" in text


def test_scan_rate_is_measured_as_bytes_per_second_of_this_machine():
    rate = measure_scan_rate(64)
    assert 1e8 < rate < 1e13  # 0.1 GB/s to 10 TB/s: bytes, not FLOPs or vectors


def test_tau_filter_and_class_fallback_order():
    nbr = np.array([[1, 2, 3, 4]])
    sim = np.array([[0.9, 0.6, 0.5, 0.4]], np.float32)
    labels = np.array([0, 1, 1, 0, 0])
    n, s, c = order_candidates(nbr, sim, labels, labels[[0]], 0.7, "topk")
    assert c.tolist() == [1] and n.tolist() == [[1, 2, 3, 4]]
    n, s, c = order_candidates(nbr, sim, labels, labels[[0]], 0.7, "class")
    assert c.tolist() == [1] and n.tolist() == [[1, 3, 4, 2]] and s.tolist()[0][:2] == pytest.approx([0.9, 0.5])


def test_draw_group_uses_only_passing_or_flags_fallback():
    seen = np.zeros(5)
    for i in range(2000):
        slots, fb = draw_group(5, 8, 4, hash_uniform(0, 1, i, 5))
        assert not fb and len(set(slots.tolist())) == 3 and slots.max() < 5
        seen[slots] += 1
    np.testing.assert_allclose(seen / 2000, 3 / 5, atol=0.04)       # uniform over the passing candidates
    slots, fb = draw_group(1, 8, 4, hash_uniform(0, 0, 0, 1))
    assert fb and slots.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="larger k"):
        draw_group(0, 2, 4, hash_uniform(0, 0, 0, 1))


def test_hash_uniform_is_deterministic_and_uniform():
    u = np.concatenate([hash_uniform(3, e, i, 4) for e in range(2) for i in range(2000)])
    assert ((u >= 0) & (u < 1)).all() and abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003
    np.testing.assert_array_equal(hash_uniform(3, 1, 7, 4), hash_uniform(3, 1, 7, 4))
    assert not np.array_equal(hash_uniform(3, 1, 7, 4), hash_uniform(3, 2, 7, 4))


def test_stats():
    count = np.array([0, 3, 3, 5])
    sim = np.array([[0.5, 0.1], [0.9, 0.8], [0.75, 0.72], [0.99, 0.98]], np.float32)
    st = group_stats(count, sim, k=5, n_max=4, tau=0.7)
    assert st["neighbour_count_hist"] == [1, 0, 0, 2, 0, 1]
    assert st["fallback_rate"] == 0.25
    assert st["mean_similarity_passing"] == pytest.approx(np.mean([0.9, 0.8, 0.75, 0.72, 0.99, 0.98]), abs=1e-6)


def test_embedders_are_unit_norm_and_ablations_behave():
    imgs = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    labels, ids = np.array([0, 0, 1, 1, 2, 2]), np.arange(6)
    for name in ("pixels", "class", "random"):
        e = build_embedder(name, num_classes=3).embed(imgs, labels, ids)
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    e = build_embedder("class", num_classes=3).embed(imgs, labels, ids)
    assert e[0] @ e[1] > 0.9 and abs(e[0] @ e[2]) < 0.2


def test_model_embedders_fail_fast_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="open_clip checkpoint"):
        build_embedder("clip", checkpoint=str(tmp_path / "clip.bin"))
    with pytest.raises(FileNotFoundError, match="hubconf.py"):
        build_embedder("dinov2", repo=str(tmp_path))


def _purity_by_enumeration(same: np.ndarray, count: int, n: int) -> float:
    """The loader's partners written out: every (N-1)-subset of the passing candidates, equally likely, when enough
    pass; else the first N-1 in rank order."""
    from itertools import combinations

    if count >= n - 1:
        subsets = list(combinations(range(count), n - 1))
        return float(np.mean([np.mean([same[i] for i in s]) for s in subsets]))
    return float(np.mean(same[:n - 1]))


def test_partner_class_purity_matches_enumerated_draws():
    """Catches a purity that averages over all K candidates (not the ones a group can draw), that ignores the
    fallback to the first N-1 when fewer pass, or that is off by one at count == N-1."""
    from gd.data.grouping import partner_class_purity

    rng = np.random.default_rng(3)
    same = rng.random((60, 6)) < 0.5
    count = rng.integers(0, 7, 60)
    count[:4] = [0, 2, 3, 6]                                  # below, at and above N-1 = 3
    for n in (2, 4, 6):
        got = partner_class_purity(same, count, n)
        want = [_purity_by_enumeration(same[i].astype(float), int(count[i]), n) for i in range(60)]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="group_size 8 needs 7"):
        partner_class_purity(same, count, 8)
