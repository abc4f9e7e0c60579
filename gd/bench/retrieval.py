"""Retrieval at ImageNet scale: the shard builder's index (gd.data.grouping) on synthetic embeddings.

    python -m gd.bench.retrieval                                 # 1,281,167 x 768, IVF as the builder plans it
    python -m gd.bench.retrieval num=200000 sample=1000 kind=flat

The embeddings are L2-normalised draws around 1,000 class centres, each with 20 sub-cluster centres (with the default
``noise`` 0.45: cosine ~0.66 within a class, ~0.87 within a sub-cluster, ~0 across classes; ``noise=1`` spreads
them to ~0.43 and ~0.57, a harder case for IVF), written as 25,000-row chunk files and memory-mapped,
as the builder reads its embed stage. Reported: the time to build (train + add) and to search, as wall time and
as CPU time of this process (on a shared machine the CPU time says more), the peak resident memory of this
process, and recall@k of the index against exact search on a sample of queries (the fraction of the true k nearest
neighbours, self excluded, that the index returns). Real CLIP/DINOv2 embeddings are structured
differently, so recall on them should be checked once on the real set (a sample suffices).
"""
from __future__ import annotations

import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

DEFAULTS = {
    "num": 1_281_167, "dim": 768, "classes": 1000, "subclusters": 20, "chunk": 25_000, "k": 32,
    "noise": 0.45,              # weight of each image's own direction (class centre 1, sub-cluster 0.55)
    "sample": 2000,             # queries whose recall is measured against exact search
    "kind": "auto",             # as conf/build_shards.yaml's index.kind (auto: ivf above 200k on a CPU)
    "nlist": None, "nprobe": 32, "train_per_list": 64, "niter": 10, "ranks": 32, "seed": 0,
    "dir": None,                # where the chunk files go (default: a temp folder under /var/tmp, removed after)
}


def write_embeddings(folder: Path, cfg) -> list[np.ndarray]:
    """The synthetic embeddings as memory-mapped chunk files in ``folder``."""
    rng = np.random.default_rng(cfg.seed)
    d = int(cfg.dim)

    def unit(n: int) -> np.ndarray:
        v = rng.standard_normal((n, d)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    classes, subs = unit(cfg.classes), unit(cfg.classes * cfg.subclusters)
    chunks = []
    for i, lo in enumerate(range(0, cfg.num, cfg.chunk)):
        n = min(cfg.chunk, cfg.num - lo)
        cls = rng.integers(0, cfg.classes, n)
        sub = cls * cfg.subclusters + rng.integers(0, cfg.subclusters, n)
        x = classes[cls] + 0.55 * subs[sub] + float(cfg.noise) * unit(n)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        path = folder / f"chunk-{i:05d}.emb.npy"
        np.save(path, x.astype(np.float32))
        chunks.append(np.load(path, mmap_mode="r"))
    return chunks


def exact_neighbours(chunks: list[np.ndarray], queries: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The true k nearest rows of each query (self excluded) by a plain numpy scan over the chunks, keeping a
    running top-k: the reference recall is measured against (independent of faiss, little memory)."""
    best_s = np.full((len(queries), k + 1), -np.inf, np.float32)
    best_i = np.full((len(queries), k + 1), -1, np.int64)
    offset = 0
    for c in chunks:
        s = queries @ np.asarray(c).T
        s[rows[:, None] == offset + np.arange(len(c))[None, :]] = -np.inf
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(offset + np.arange(len(c)), s.shape)], axis=1)
        top = np.argpartition(-cand_s, k, axis=1)[:, :k + 1]
        best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
        offset += len(c)
    order = np.argsort(-best_s, axis=1)[:, :k]
    return np.take_along_axis(best_i, order, 1)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    from gd.data import grouping

    cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_cli())
    folder = Path(cfg.dir) if cfg.dir else Path(tempfile.mkdtemp(prefix="gd-bench-retrieval-", dir="/var/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        chunks = write_embeddings(folder, cfg)
        print(f"wrote {cfg.num:,} x {cfg.dim} embeddings in {time.perf_counter() - t0:.0f} s to {folder}", flush=True)
        plan = grouping.index_plan(cfg.num, cfg.dim, cfg.kind, nlist=cfg.nlist, nprobe=cfg.nprobe, use_gpu=False,
                                   train_per_list=cfg.train_per_list, niter=cfg.niter)
        flops = grouping.measure_flops("cpu", cfg.dim)
        scan = grouping.measure_scan_rate(cfg.dim) if plan.kind == "ivf" else None
        print(grouping.retrieval_estimate(plan, cfg.ranks, flops, scan), flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        phases: dict = {}
        grouping.save_index(grouping.build_index(chunks, plan, seed=cfg.seed, timings=phases), folder / "index.faiss")
        build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
        parts = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in phases.items())
        print(f"built and saved the {plan.kind} index in {build_s:.0f} s ({parts}; {build_cpu:.0f} CPU s); peak RSS "
              f"so far {peak_rss_gib():.2f} GiB", flush=True)
        index = grouping.load_index(folder / "index.faiss", plan.nprobe or None)
        rows = np.sort(np.random.default_rng(cfg.seed + 1).choice(cfg.num, cfg.sample, replace=False))
        queries = grouping._rows_of(chunks, rows)
        t0, c0 = time.perf_counter(), time.process_time()
        got, _ = grouping.search_neighbours(index, queries, rows, cfg.k)
        search_s, search_cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = peak_rss_gib()
        t0, c0 = time.perf_counter(), time.process_time()
        want = exact_neighbours(chunks, queries, rows, cfg.k)
        exact_s, exact_cpu = time.perf_counter() - t0, time.process_time() - c0
        recall = np.mean([len(set(g) & set(w)) / cfg.k for g, w in zip(got, want)])
        per_query, per_query_exact = search_s / cfg.sample, exact_s / cfg.sample
        print(f"{plan.kind}: build {build_s:.0f} s ({build_cpu:.0f} CPU s), search {per_query * 1e3:.2f} ms/query "
              f"({search_cpu / cfg.sample * 1e3:.2f} CPU ms; all {cfg.num:,} queries: "
              f"{per_query * cfg.num / 3600:.2f} h on one process, {per_query * cfg.num / cfg.ranks / 60:.1f} min "
              f"each over {cfg.ranks} ranks), peak RSS {peak:.2f} GiB while building and searching")
        print(f"exact (numpy scan): {per_query_exact * 1e3:.1f} ms/query ({exact_cpu / cfg.sample * 1e3:.1f} CPU ms; "
              f"all queries: {per_query_exact * cfg.num / 3600:.1f} h on one process)")
        print(f"recall@{cfg.k} of {plan.kind} vs exact on {cfg.sample} queries: {recall:.4f}", flush=True)
    finally:
        if not cfg.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
