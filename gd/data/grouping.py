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
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gd.rng import hash_uniform  # noqa: F401  (re-exported: the loader's draws)

FALLBACKS = ("topk", "class")


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines about AVX variants are noise
    import faiss
    return faiss


@dataclass(frozen=True)
class IndexPlan:
    """How the K nearest neighbours of ``num`` embeddings of dimension ``dim`` are found.

    ``exact-gpu``: every rank holds all embeddings on its own GPU and multiplies its queries against them (exact,
    and on a GPU the cheapest: 2.5 PFLOP for ImageNet's 1.28M x 768, about a minute of one H100 in fp32);
    ``flat``: faiss's exact CPU index (small sets); ``ivf``: faiss IVFFlat trained on ``train_points`` samples, each
    query scanning ``nprobe`` of ``nlist`` lists. The CPU indexes are built once, by rank 0, and read by every rank
    through a memory map (one copy per node in the page cache).
    """

    kind: str
    num: int
    dim: int
    nlist: int = 0
    nprobe: int = 0
    train_points: int = 0
    niter: int = 0

    @property
    def index_bytes(self) -> int:
        return 4 * self.num * self.dim  # IVFFlat and Flat store every vector once (ids: 8 B each for IVF)

    def flops(self, queries: int) -> tuple[float, float]:
        """(building the index, searching ``queries`` queries): multiply-adds x 2."""
        d, m = self.dim, self.num
        if self.kind != "ivf":
            return 0.0, 2.0 * queries * m * d
        build = 2.0 * self.train_points * self.nlist * d * self.niter + 2.0 * m * self.nlist * d
        scanned = min(1.0, self.nprobe / self.nlist) * m
        return build, 2.0 * queries * (self.nlist + scanned) * d

    def scan_bytes(self, queries: int) -> float:
        """Bytes an IVF search of ``queries`` queries streams from memory: each reads the ``nprobe`` lists it scans,
        one dot product per stored vector (bound by memory bandwidth, not by matrix-multiply FLOPs)."""
        if self.kind != "ivf":
            return 0.0
        return 4.0 * queries * min(1.0, self.nprobe / self.nlist) * self.num * self.dim

    def seconds(self, queries: int, flops: float, scan_rate: float | None = None) -> tuple[float, float]:
        """(building, searching ``queries`` queries) in seconds at ``flops`` FLOP/s; an IVF search's list scans at
        ``scan_rate`` bytes/s (:func:`measure_scan_rate`), its coarse assignment at ``flops``."""
        build, search = self.flops(queries)
        if self.kind == "ivf" and scan_rate:
            return build / flops, 2.0 * queries * self.nlist * self.dim / flops + self.scan_bytes(queries) / scan_rate
        return build / flops, search / flops


def index_plan(num: int, dim: int, kind: str = "auto", *, ivf_threshold: int = 200_000, nlist: int | None = None,
               nprobe: int = 32, use_gpu: bool | str = "auto", train_per_list: int = 64, niter: int = 10,
               seed: int = 0) -> IndexPlan:
    """The :class:`IndexPlan` for ``conf/build_shards.yaml``'s ``index`` settings. ``auto``: ``exact-gpu`` when torch
    sees a GPU (``use_gpu``), else ``flat`` up to ``ivf_threshold`` embeddings, else ``ivf`` with nlist ~ 4 sqrt(M)."""
    del seed  # accepted so the whole `index` block can be passed; used by build_index
    if kind not in ("auto", "flat", "ivf", "exact-gpu"):
        raise ValueError(f"index kind {kind!r}: expected auto, flat, ivf or exact-gpu")
    if kind == "auto":
        gpu = use_gpu is True or (use_gpu == "auto" and _cuda_available())
        kind = "exact-gpu" if gpu else ("flat" if num <= ivf_threshold else "ivf")
    if kind != "ivf":
        return IndexPlan(kind, num, dim)
    lists = max(1, min(num, int(nlist or 4 * math.sqrt(num))))
    return IndexPlan("ivf", num, dim, lists, min(int(nprobe), lists), min(num, int(train_per_list) * lists),
                     int(niter))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _rows_of(chunks: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted global row numbers) of the embeddings stored as ``chunks`` (concatenated order)."""
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])])
    out = np.empty((len(rows), chunks[0].shape[1]), np.float32)
    for i, c in enumerate(chunks):
        lo, hi = np.searchsorted(rows, [offsets[i], offsets[i + 1]])
        if hi > lo:
            out[lo:hi] = c[rows[lo:hi] - offsets[i]]
    return out


def build_index(chunks: Sequence[np.ndarray] | np.ndarray, plan: IndexPlan, seed: int = 0,
                timings: dict | None = None):
    """The faiss index of ``plan`` (``flat`` or ``ivf``) over L2-normalised embeddings given as ``chunks`` (a list of
    (n_i, d) arrays, e.g. memory-mapped per-chunk files, added one at a time: no concatenated copy). ``timings``, if
    given, receives the seconds spent gathering the training sample, training (k-means) and adding."""
    faiss = _faiss()
    timings = {} if timings is None else timings
    started = time.perf_counter()
    chunks = [chunks] if isinstance(chunks, np.ndarray) else list(chunks)
    if plan.kind == "flat":
        index = faiss.IndexFlatIP(plan.dim)
    elif plan.kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(plan.dim), plan.dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = plan.niter
        index.cp.max_points_per_centroid = max(1, plan.train_points // plan.nlist)
        picked = np.sort(np.random.default_rng(seed).choice(plan.num, size=plan.train_points, replace=False))
        sample = _rows_of(chunks, picked)
        timings["gather_s"] = time.perf_counter() - started
        index.train(sample)
        timings["train_s"] = time.perf_counter() - started - timings["gather_s"]
        index.nprobe = plan.nprobe
    else:
        raise ValueError(f"build_index makes faiss indexes (flat, ivf), not {plan.kind!r}")
    added = time.perf_counter()
    for c in chunks:
        if len(c):
            index.add(np.ascontiguousarray(c, dtype=np.float32))
    timings["add_s"] = time.perf_counter() - added
    return index


def save_index(index, path: str | os.PathLike) -> None:
    """Write a faiss index atomically (temp file beside it, then rename)."""
    from gd.io import atomic_path

    with atomic_path(path) as tmp:
        _faiss().write_index(index, str(tmp))


def load_index(path: str | os.PathLike, nprobe: int | None = None):
    """A saved faiss index, memory-mapped: ranks of one node share its pages instead of each holding a copy."""
    faiss = _faiss()
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = int(nprobe)
    return index


class ExactSearch:
    """Exact inner-product search on a torch device (a GPU in practice): all embeddings on the device, queries in
    blocks, float32 matmul (TF32 off) and top-k. Same interface as a faiss index's ``search``."""

    def __init__(self, chunks: Sequence[np.ndarray] | np.ndarray, device: Any, block: int = 4096) -> None:
        import torch

        chunks = [chunks] if isinstance(chunks, np.ndarray) else list(chunks)
        self.device, self.block = torch.device(device), int(block)
        self.db = torch.cat([torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)).to(self.device)
                             for c in chunks if len(c)])
        self.ntotal = len(self.db)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        k = min(k, self.ntotal)
        sims, ids = [], []
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            for lo in range(0, len(queries), self.block):
                q = torch.from_numpy(np.ascontiguousarray(queries[lo:lo + self.block], np.float32)).to(self.device)
                s, i = torch.topk(q @ self.db.T, k, dim=1)
                sims.append(s.cpu().numpy())
                ids.append(i.cpu().numpy())
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return np.concatenate(sims), np.concatenate(ids).astype(np.int64)


def measure_flops(device: str = "cpu", dim: int = 768) -> float:
    """Float32 multiply-add throughput (x 2, FLOP/s) of the kernel retrieval will spend its time in, measured in about
    a second: what :func:`retrieval_estimate` divides by. On a GPU, a search-shaped torch matmul (:class:`ExactSearch`);
    on the CPU, faiss's own flat search for the nearest of 16,384 vectors: the kernel the IVF's k-means and its
    ``add`` run (torch's matmul is the fallback when faiss is missing)."""
    if device == "cpu":
        try:
            faiss = _faiss()
        except ImportError:
            faiss = None
        if faiss is not None:
            rng = np.random.default_rng(0)
            db = rng.standard_normal((16384, dim), dtype=np.float32)
            q = rng.standard_normal((1024, dim), dtype=np.float32)
            index = faiss.IndexFlatIP(dim)
            index.add(db)
            index.search(q[:256], 1)  # warm-up (threads, first allocation)
            started, reps = time.perf_counter(), 0
            while reps < 2 or time.perf_counter() - started < 0.5:
                index.search(q, 1)
                reps += 1
            return 2.0 * len(q) * len(db) * dim * reps / (time.perf_counter() - started)
    import torch

    q, db = torch.randn(256, dim, device=device), torch.randn(dim, 16384, device=device)
    (q @ db).sum().item()  # warm-up (kernel choice, first allocation)
    started, reps = time.perf_counter(), 0
    while reps < 3 or time.perf_counter() - started < 0.2:
        (q @ db).sum().item()
        reps += 1
    return 2.0 * 256 * dim * 16384 * reps / (time.perf_counter() - started)


def measure_scan_rate(dim: int = 768) -> float:
    """Bytes/s at which this process scans stored vectors one dot product each (an IVF list scan), measured in about
    a second: faiss's flat search of 16 queries (below its BLAS threshold, so the same kernel and the same threads
    as an IVF search) over 120 MB, more than a CPU cache holds."""
    rng = np.random.default_rng(0)
    db = rng.standard_normal((max(1, (120 << 20) // (4 * dim)), dim), dtype=np.float32)
    q = rng.standard_normal((16, dim), dtype=np.float32)
    index = _faiss().IndexFlatIP(dim)  # only IVF plans are timed by it, and they need faiss anyway
    index.add(db)
    index.search(q, 1)
    started, reps = time.perf_counter(), 0
    while reps < 2 or time.perf_counter() - started < 0.5:
        index.search(q, 1)
        reps += 1
    return len(q) * db.nbytes * reps / (time.perf_counter() - started)


def retrieval_estimate(plan: IndexPlan, ranks: int, flops: float, scan_rate: float | None = None) -> str:
    """What retrieval will cost (time at ``flops`` and, for IVF, ``scan_rate`` per process; memory), printed before
    it starts."""
    per_rank = -(-plan.num // max(1, ranks))
    build, search = plan.seconds(per_rank, flops, scan_rate)
    gib = plan.index_bytes / 2**30
    if plan.kind == "exact-gpu":
        where = f"all {plan.num:,} x {plan.dim} embeddings on each rank's GPU ({gib:.1f} GiB of GPU memory)"
    else:
        train = f", trained on {plan.train_points:,} of them ({plan.train_points * plan.dim * 4 / 2**30:.1f} GiB)" \
            if plan.kind == "ivf" else ""
        where = (f"one faiss {plan.kind} index of {plan.num:,} x {plan.dim} ({gib:.1f} GiB) built by rank 0{train}, "
                 "memory-mapped by every rank (one copy per node in the page cache)")
    lists = f", nlist {plan.nlist}, nprobe {plan.nprobe}" if plan.kind == "ivf" else ""
    rate = f" and list scans at {scan_rate / 1e9:.1f} GB/s" if plan.kind == "ivf" and scan_rate else ""
    return (f"retrieve: {plan.kind}{lists}: {where}; building ~{build / 60:.1f} min, then each of {ranks} "
            f"rank(s) searches ~{per_rank:,} queries in ~{search / 60:.1f} min "
            f"(at {flops / 1e9:.0f} GFLOP/s{rate} measured here)")


def search_neighbours(index, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """K nearest neighbours of the embeddings ``queries`` (whose own row numbers are ``rows``), self excluded:
    (neighbour rows int64 (Q, k), cosine (Q, k)), sorted by decreasing similarity; missing neighbours are -1 with
    similarity -inf. ``index``: a faiss index or an :class:`ExactSearch`."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
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
