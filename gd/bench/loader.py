"""Loader throughput: groups/s, images/s and MB/s from an S3 endpoint (cold cache) and from the local cache.

    python -m gd.bench.loader                                  # starts moto_server, synthetic 4x32x32 shards
    python -m gd.bench.loader root=s3://bucket/prefix          # existing shards on S3_ENDPOINT_URL / AWS
    python -m gd.bench.loader records=8192 num_workers=2 group_size=16 k=16 n_max=16

Synthetic records are random fp16 latents of ImageNet-256 SD-VAE shape (zstd cannot shrink them, like real VAE
latents). Target: >= 10x what one GPU consumes (~550 img/s for SiT-XL/2 on an H200), i.e. >= 5,500 img/s.
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
import uuid

import numpy as np
from omegaconf import OmegaConf

DEFAULTS = {
    "root": None,              # existing shards (local or s3://); null = write synthetic shards to a moto server
    "records": 4096, "latent_shape": [4, 32, 32], "k": 8, "n_max": 4,
    "group_size": 4, "micro_batch": 64, "num_workers": 0, "passes": 1, "target_img_s": 5500,
}


def write_synthetic(root: str, records: int, shape: list[int], k: int, n_max: int, part_size: int = 1024) -> dict:
    """Random-latent shards with the layout of tools/build_shards.py (candidate ids are random other records)."""
    from gd.data import shards, storage
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((records, *shape)).astype(np.float16)
    labels = rng.integers(0, 1000, records)
    parts = {"plain": [], "group": []}
    staging = tempfile.mkdtemp(prefix="gd-bench-staging-")
    for p, start in enumerate(range(0, records, part_size)):
        rows = range(start, min(records, start + part_size))
        cands = [(rng.choice(records - 1, k, replace=False) + r + 1) % records for r in rows]
        plain = (shards.encode_plain(lat[r], labels[r], r) for r in rows)
        group = (shards.encode_group(lat[r], labels[r], r, lat[c], labels[c], c, np.full(k, 0.8, np.float32), k)
                 for r, c in zip(rows, cands))
        parts["plain"].append((p, shards.write_part(root, "plain", p, shards.plain_columns(shape), plain, staging)))
        parts["group"].append((p, shards.write_part(root, "group", p, shards.group_columns(shape, k), group, staging)))
    shutil.rmtree(staging, ignore_errors=True)
    for stream, ps in parts.items():
        shards.write_index(root, stream, ps)
    meta = {"num_records": records, "latent_shape": shape, "k": k, "n_max": n_max, "flip": False,
            "build_id": uuid.uuid4().hex[:16], "num_classes": 1000, "scale": 0.18215,
            "streams": {s: {"bytes": sum(shards.shard_bytes(d) for _, d in ps)} for s, ps in parts.items()}}
    storage.write_json(storage.join(root, "meta.json"), meta)
    return meta


def time_epoch(root: str, cache: str, cfg, which: str) -> tuple[int, int, float]:
    """One epoch of the plain or group loader: (samples, images, seconds)."""
    from streaming.base.util import clean_stale_shared_memory

    from gd.data.loader import build_loaders
    clean_stale_shared_memory()
    data = {"root": root, "cache": cache, "shuffle": True, "num_workers": cfg.num_workers, "drop_last": False}
    loaders = list(build_loaders(data, group_size=cfg.group_size, micro_batch=cfg.micro_batch, seed=0, rank=0,
                                 world_size=1))
    loader = loaders[0 if which == "plain" else 1]
    t0 = time.perf_counter()
    samples = images = 0
    for batch in loader:
        samples += batch["latent"].shape[0]
        images += batch["latent"].shape[0] * (batch["latent"].shape[1] if which == "group" else 1)
    dt = time.perf_counter() - t0
    del loader, loaders
    gc.collect()
    return samples, images, dt


def main() -> None:
    cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_cli())
    proc = None
    root = cfg.root
    if root is None:
        from gd.data.moto import S3_ENV, start_moto_server
        if not os.environ.get("S3_ENDPOINT_URL"):
            proc, url = start_moto_server()
            os.environ.update(S3_ENV)
            os.environ["S3_ENDPOINT_URL"] = url
        import boto3
        boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"]).create_bucket(Bucket="gd-bench")
        root = f"s3://gd-bench/{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        write_synthetic(root, cfg.records, list(cfg.latent_shape), cfg.k, cfg.n_max)
        print(f"wrote {cfg.records} synthetic records to {root} on {os.environ['S3_ENDPOINT_URL']} "
              f"in {time.perf_counter() - t0:.1f} s")
    from gd.data.loader import check_dataset
    meta = check_dataset(root)
    cache = tempfile.mkdtemp(prefix="gd-bench-cache-")
    try:
        print(f"{'stream':6} {'source':12} {'samples/s':>10} {'img/s':>9} {'MB/s stored':>12} {'MB/s fp32':>10}")
        lat_mb = 4 * float(np.prod(meta["latent_shape"])) / 1e6
        for which in ("group", "plain"):
            stored = meta["streams"][which]["bytes"] / 1e6
            for label in ("s3 (cold)", "local cache"):
                for _ in range(cfg.passes if label == "local cache" else 1):
                    n, imgs, dt = time_epoch(root, cache, cfg, which)
                    print(f"{which:6} {label:12} {n / dt:10.0f} {imgs / dt:9.0f} {stored / dt:12.1f} "
                          f"{imgs * lat_mb / dt:10.1f}")
        print(f"target: >= {cfg.target_img_s} img/s (10x ~550 img/s SiT-XL/2 on one H200)")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if proc is not None:
            from gd.data.moto import stop_process
            stop_process(proc)


if __name__ == "__main__":
    main()
