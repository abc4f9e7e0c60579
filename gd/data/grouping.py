"""Retrieval of group candidates with faiss, the tau filter and its fallback, and grouping statistics.

Each anchor keeps its K nearest neighbours by cosine similarity (self excluded), ordered so that the `count`
candidates with cosine >= tau come first. When fewer than N-1 pass tau the record is a *fallback*: the loader fills
the group with the next-ranked candidates regardless of tau ("topk", default), or, with fallback="class", the
non-passing candidates are re-ranked so that same-class neighbours come first. Either way the record is flagged
and the fallback rate is reported, so a bad tau or embedder shows up in meta.json rather than in FID.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from gd.rng import hash_uniform  # noqa: F401  (re-exported: the loader's draws)

FALLBACKS = ("topk", "class")


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines about AVX variants are noise
    import faiss
    return faiss


def faiss_num_gpus() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def build_index(db: np.ndarray, kind: str = "auto", *, ivf_threshold: int = 200_000, nlist: int | None = None,
                nprobe: int = 32, use_gpu: bool | str = "auto", seed: int = 0):
    """Inner-product index over L2-normalised rows: exact `IndexFlatIP` for small sets, `IVFFlat` for large ones
    (nlist ~ 4 sqrt(M), trained on up to 256 points per list), moved to all GPUs when faiss sees any."""
    faiss = _faiss()
    db = np.ascontiguousarray(db, dtype=np.float32)
    m, d = db.shape
    if kind not in ("auto", "flat", "ivf"):
        raise ValueError(f"index kind {kind!r}: expected auto, flat or ivf")
    if kind == "auto":
        kind = "flat" if m <= ivf_threshold else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        nlist = nlist or max(1, int(4 * math.sqrt(m)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = db[np.sort(rng.choice(m, size=min(m, 256 * nlist), replace=False))]
        index.train(train)
        index.nprobe = min(nprobe, nlist)
    if use_gpu is True or (use_gpu == "auto" and faiss_num_gpus() > 0):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(db)
    return index


def search_neighbours(index, db: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """K nearest rows of `db` for the query rows `rows`, self excluded: (neighbour rows int64 (Q, k), cosine (Q, k)),
    sorted by decreasing similarity; missing neighbours are -1 with similarity -inf."""
    q = np.ascontiguousarray(db[rows], dtype=np.float32)
    sims, nbrs = index.search(q, k + 1)
    out_n = np.full((len(rows), k), -1, np.int64)
    out_s = np.full((len(rows), k), -np.inf, np.float32)
    for i, r in enumerate(rows):
        keep = (nbrs[i] != r) & (nbrs[i] >= 0)
        n, s = nbrs[i][keep][:k], sims[i][keep][:k]
        out_n[i, :len(n)], out_s[i, :len(s)] = n, s
    return out_n, out_s


def order_candidates(nbrs: np.ndarray, sims: np.ndarray, labels: np.ndarray, anchor_labels: np.ndarray,
                     tau: float, fallback: str = "topk") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder each row so candidates with cosine >= tau come first (by similarity), then the fallback order.

    Returns (neighbour rows, similarities, count = number of candidates with cosine >= tau)."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback {fallback!r}: expected one of {FALLBACKS}")
    valid = nbrs >= 0
    passing = valid & (sims >= tau)
    count = passing.sum(1).astype(np.int64)
    if fallback == "topk":
        return nbrs, sims, count
    same = valid & (labels[np.where(valid, nbrs, 0)] == anchor_labels[:, None])
    # Sort key (stable): passing first, then same-class, then other valid, then padding; ties keep similarity order.
    key = np.where(passing, 0, np.where(same, 1, np.where(valid, 2, 3)))
    order = np.argsort(key, axis=1, kind="stable")
    return np.take_along_axis(nbrs, order, 1), np.take_along_axis(sims, order, 1), count


def group_stats(count: np.ndarray, sims: np.ndarray, k: int, n_max: int, tau: float) -> dict:
    """Neighbour-count histogram (how many of the K pass tau), mean similarities and the fallback rate at N_max."""
    passing = np.isfinite(sims) & (sims >= tau)
    top1 = sims[:, 0][np.isfinite(sims[:, 0])] if sims.shape[1] else np.zeros(0)
    hist = np.bincount(count, minlength=k + 1)[:k + 1]
    return {
        "num_anchors": int(len(count)),
        "neighbour_count_hist": [int(h) for h in hist],
        "mean_count": float(count.mean()) if len(count) else 0.0,
        "mean_similarity_passing": float(sims[passing].mean()) if passing.any() else float("nan"),
        "mean_similarity_top1": float(top1.mean()) if len(top1) else float("nan"),
        "mean_similarity_topk": float(sims[np.isfinite(sims)].mean()) if np.isfinite(sims).any() else float("nan"),
        "fallback_rate": float((count < n_max - 1).mean()) if len(count) else 0.0,
    }


def partner_class_purity(same_class: np.ndarray, count: np.ndarray, group_size: int) -> np.ndarray:
    """Per anchor, the expected fraction of its N-1 partners that share its class, under the loader's rule
    (:func:`draw_group`): a uniform draw among the ``count`` passing candidates when at least N-1 pass, else the
    first N-1 in rank order. ``same_class``: bool (A, K), candidate k has the anchor's class (rank order, passing
    first)."""
    need = int(group_size) - 1
    if need < 1:
        raise ValueError(f"group_size={group_size}: purity needs groups of at least 2")
    same = np.asarray(same_class, np.float64)
    if same.shape[1] < need:
        raise ValueError(f"{same.shape[1]} candidates per anchor; group_size {group_size} needs {need}")
    csum = np.concatenate([np.zeros((len(same), 1)), np.cumsum(same, 1)], 1)
    count = np.asarray(count, np.int64)
    pool = np.where(count >= need, count, need)
    return csum[np.arange(len(same)), pool] / pool


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def draw_group(count: int, k_valid: int, group_size: int, u: np.ndarray) -> tuple[np.ndarray, bool]:
    """Pick N-1 candidate slots given uniforms `u` (len >= count): uniformly without replacement among the `count`
    passing ones, or, if too few pass, all passing ones plus the next-ranked (fallback). Returns (slots, fallback)."""
    need = group_size - 1
    if need <= 0:
        return np.zeros(0, np.int64), False
    if count >= need:
        return np.sort(np.argsort(u[:count], kind="stable")[:need]).astype(np.int64), False
    if k_valid < need:
        raise ValueError(f"record has {k_valid} candidates, group_size {group_size} needs {need}: rebuild the shards "
                         "with a larger k / n_max")
    return np.arange(need, dtype=np.int64), True
