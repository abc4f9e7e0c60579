"""The shard-building pipeline behind gd.build_shards (and tools/build_shards.py): read -> encode -> embed ->
retrieve -> write.

Work is cut into fixed chunks of `chunk_size` source images (chunk c = dataset ids [c*S, (c+1)*S)). Every stage
writes, per chunk, its arrays to `<work_dir>/<stage>/chunk-XXXXX.*.npy` (temp file + os.replace) and then a
`chunk-XXXXX.done` marker, so a killed stage resumes at the first chunk without a marker: nothing is lost or
duplicated, and an interrupted build yields the same shards as an uninterrupted one. Chunk c belongs to rank
c % world, so read/encode/embed (and retrieve/write) split over processes, GPUs, array tasks or machines that
share `work_dir` (ranks from `resolve_rank_world`: explicit, job arrays, torchrun or srun). retrieve needs every
embed chunk and write needs every encode/retrieve chunk; a rank that finds them missing waits up to
`wait_timeout_s` (6 h by default when there are several ranks) for the other ranks, then stops with the list of
missing chunks. Retrieval splits the queries, never the index: on GPUs each rank searches its chunks exactly
against every embedding on its own GPU; on CPUs rank 0 builds one faiss index into the work dir and every rank
memory-maps it (see gd.data.grouping.IndexPlan; rank 0 prints the time and memory it will take before starting).
The rank that completes the last write partition writes index.json and meta.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gd.data import grouping, shards, storage
from gd.data.embedders import build_embedder, embedding_dim
from gd.data.encoders import build_encoder
from gd.data.sources import build_source
from gd.distributed import env as _env
from gd.distributed.env import local_device
from gd.io import atomic_save_npy

STAGES = ("read", "encode", "embed", "retrieve", "write")
# Which settings each stage's outputs depend on (a change invalidates that stage and those after it).
STAGE_KEYS = {
    "read": ("source", "source_kw", "image_size", "limit", "chunk_size"),
    "encode": ("encoder", "encoder_kw", "flip"),
    "embed": ("embedder", "embedder_kw"),
    "retrieve": ("k", "tau", "fallback", "index", "n_max"),
    "write": ("out", "shard_size"),
}
SECRET_WORDS = ("key", "secret", "token", "password", "credential")


@dataclass
class BuildConfig:
    out: str
    work_dir: str
    source: str = "fashion_mnist"
    source_kw: dict | None = None
    image_size: int = 28
    limit: int | None = None
    encoder: str = "pixels"
    encoder_kw: dict | None = None
    flip: bool = False
    embedder: str = "pixels"
    embedder_kw: dict | None = None
    n_max: int = 4
    k: int = 8
    tau: float = 0.7
    fallback: str = "topk"
    index: dict | None = None
    chunk_size: int = 1024
    batch_size: int = 64
    shard_size: str = "64mb"
    stages: tuple[str, ...] = STAGES
    rank: int = 0
    world: int = 1
    chunk_delay_s: float = 0.0
    wait_timeout_s: float | None = None
    cleanup_images: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not self.out:
            raise ValueError("out is required: a local directory or s3://bucket/prefix")
        if storage.is_remote(self.out):
            storage.split_s3(self.out)
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stages {bad}: expected a subset of {list(STAGES)}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} / world {self.world}: expected 0 <= rank < world")
        if self.n_max < 1 or self.k < max(1, self.n_max - 1):
            raise ValueError(f"k={self.k}, n_max={self.n_max}: need n_max >= 1 and k >= n_max - 1 candidates")
        if self.chunk_size < 1 or self.batch_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size}, batch_size={self.batch_size}: expected >= 1")
        if self.fallback not in grouping.FALLBACKS:
            raise ValueError(f"fallback {self.fallback!r}: expected one of {grouping.FALLBACKS}")
        for name, kw in (("encoder", self.encoder_kw), ("embedder", self.embedder_kw), ("source", self.source_kw)):
            for key in (kw or {}):
                if any(w in key.lower() for w in SECRET_WORDS) and "path" not in key and "checkpoint" not in key:
                    raise ValueError(f"{name} option {key!r} looks like a credential: credentials come from the "
                                     "environment or ~/.aws, never from the config")


def _save_json(path: Path, obj: Any) -> None:
    storage.write_json(str(path), obj)


class Builder:
    """Runs the stages for one rank; see the module docstring for the work-dir protocol."""

    def __init__(self, cfg: BuildConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        if "write" in cfg.stages and storage.is_remote(cfg.out):
            storage.check_bucket(cfg.out)             # before hours of encoding, not after
        self.work = Path(cfg.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.source = build_source(cfg.source, image_size=cfg.image_size, limit=cfg.limit, **(cfg.source_kw or {}))
        self.num_chunks = max(1, -(-len(self.source) // cfg.chunk_size))
        self._check_fingerprints()
        self._encoder = None
        if "retrieve" in cfg.stages and cfg.rank == 0:
            self._print_estimate()

    def _print_estimate(self) -> None:
        """Before any work: what retrieval will cost for this dataset (the one stage that grows as M^2)."""
        dim = embedding_dim(self.cfg.embedder, dict(self.cfg.embedder_kw or {}), self.source.num_classes)
        if dim is None:
            print(f"build: {len(self.source):,} images over {self.cfg.world} rank(s); the retrieval estimate follows "
                  "once the embeddings' width is known", flush=True)
            return
        plan = self.index_plan(len(self.source), dim)
        print(f"build: {len(self.source):,} images over {self.cfg.world} rank(s); "
              f"{self._estimate(plan, dim)}", flush=True)

    def _estimate(self, plan: grouping.IndexPlan, dim: int) -> str:
        flops = grouping.measure_flops(self._search_device(plan), dim)
        scan = grouping.measure_scan_rate(dim) if plan.kind == "ivf" else None
        return grouping.retrieval_estimate(plan, self.cfg.world, flops, scan)

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def _fingerprint(self, stage: str) -> dict:
        fp = {}
        for s in STAGES[:STAGES.index(stage) + 1]:
            for key in STAGE_KEYS[s]:
                fp[key] = getattr(self.cfg, key)
        fp["num_source_images"] = len(self.source)
        return json.loads(json.dumps(fp, sort_keys=True, default=str))

    def _check_fingerprints(self) -> None:
        """Refuse to mix outputs made with different settings in one work dir (that would corrupt the shards)."""
        for stage in STAGES:
            path = self.work / stage / "settings.json"
            want = self._fingerprint(stage)
            if path.exists():
                have = json.loads(path.read_text())
                if have != want:
                    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                    raise ValueError(f"work dir {self.work} has {stage} outputs made with different settings "
                                     f"({', '.join(diff)}): delete {self.work / stage} and the later stages' "
                                     "folders, or use another work_dir")

    def _mark_settings(self, stage: str) -> None:
        path = self.work / stage / "settings.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _save_json(path, self._fingerprint(stage))

    def chunk_path(self, stage: str, c: int, what: str) -> Path:
        return self.work / stage / f"chunk-{c:05d}.{what}"

    def done(self, stage: str, c: int) -> bool:
        return self.chunk_path(stage, c, "done").exists()

    def _finish_chunk(self, stage: str, c: int) -> None:
        _save_json(self.chunk_path(stage, c, "done"), {"chunk": c})
        if self.cfg.chunk_delay_s:
            time.sleep(self.cfg.chunk_delay_s)

    def my_chunks(self) -> list[int]:
        return [c for c in range(self.num_chunks) if c % self.cfg.world == self.cfg.rank]

    def chunk_ids(self, c: int) -> range:
        return range(c * self.cfg.chunk_size, min(len(self.source), (c + 1) * self.cfg.chunk_size))

    @property
    def wait_timeout_s(self) -> float:
        """How long a rank waits for the others' outputs: as configured, else 0 alone and 6 h among several (the
        ranks of one job start together, but a slow node's chunks may take hours)."""
        if self.cfg.wait_timeout_s is not None:
            return float(self.cfg.wait_timeout_s)
        return 0.0 if self.cfg.world == 1 else 6 * 3600.0

    def _wait(self, missing: Callable[[], list], what: str) -> list:
        """Poll ``missing()`` until it is empty or ``wait_timeout_s`` passes (saying every 5 minutes what is still
        awaited); returns what is still missing."""
        deadline = time.monotonic() + self.wait_timeout_s
        said = time.monotonic()
        while True:
            left = missing()
            if not left or time.monotonic() >= deadline:
                return left
            if time.monotonic() - said > 300:
                print(f"rank {self.cfg.rank}: waiting for {what} ({len(left)} missing)", flush=True)
                said = time.monotonic()
            time.sleep(min(5.0, max(0.05, deadline - time.monotonic())))

    def _require(self, stage: str, needed: str) -> None:
        """All chunks of `needed` must exist; wait up to wait_timeout_s for other ranks to produce them."""
        missing = self._wait(lambda: [c for c in range(self.num_chunks) if not self.done(needed, c)],
                             f"{needed} chunks of other ranks")
        if missing:
            show = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            raise RuntimeError(f"stage {stage} needs every {needed} chunk, missing {len(missing)} of "
                               f"{self.num_chunks} ({show}) in {self.work}: finish stages up to {needed} on all "
                               f"ranks first (same work_dir), or let ranks wait longer (wait_timeout_s="
                               f"{self.wait_timeout_s:g})")

    def _bar(self, stage: str, chunks: list[int]):
        desc = f"{stage} [rank {self.cfg.rank}/{self.cfg.world}]"
        return tqdm(chunks, desc=desc, unit="chunk", disable=not self.cfg.progress, dynamic_ncols=True)

    def _load(self, stage: str, what: str, c: int, mmap: bool = False) -> np.ndarray:
        return np.load(self.chunk_path(stage, c, f"{what}.npy"), mmap_mode="r" if mmap else None)

    def _images(self, c: int) -> np.ndarray:
        path = self.chunk_path("read", c, "images.npy")
        if not path.exists():
            raise FileNotFoundError(f"{path} was removed (cleanup_images=true): delete {self.work / 'read'} to "
                                    "re-read the source")
        return np.load(path)

    # ---- stages ------------------------------------------------------------------------------------------------
    def run(self) -> dict | None:
        meta = None
        for stage in STAGES:
            if stage in self.cfg.stages:
                self._mark_settings(stage)
                meta = getattr(self, f"stage_{stage}")()
        return meta

    def stage_read(self) -> None:
        for c in self._bar("read", self.my_chunks()):
            if self.done("read", c):
                continue
            images, labels, ids, skipped = [], [], [], []
            for i in self.chunk_ids(c):
                img, label, info = self.source.read(i)
                if img is None:
                    skipped.append({"id": i, "error": info})
                    continue
                images.append(img)
                labels.append(label)
                ids.append(i)
            s = self.cfg.image_size
            atomic_save_npy(self.chunk_path("read", c, "images.npy"),
                      np.stack(images) if images else np.zeros((0, s, s, 3), np.uint8))
            atomic_save_npy(self.chunk_path("read", c, "labels.npy"), np.asarray(labels, np.int64))
            atomic_save_npy(self.chunk_path("read", c, "ids.npy"), np.asarray(ids, np.int64))
            _save_json(self.chunk_path("read", c, "skipped.json"), skipped)
            for sk in skipped:
                tqdm.write(f"skipped id {sk['id']}: {sk['error']}")
            self._finish_chunk("read", c)

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = build_encoder(self.cfg.encoder, **(self.cfg.encoder_kw or {}))
        return self._encoder

    def stage_encode(self) -> None:
        for c in self._bar("encode", self.my_chunks()):
            if self.done("encode", c):
                continue
            if not self.done("read", c):
                raise RuntimeError(f"encode chunk {c} needs read chunk {c}: run stage read first")
            images = self._images(c)
            lat, lat_flip = [], []
            for i in range(0, len(images), self.cfg.batch_size):
                batch = images[i:i + self.cfg.batch_size]
                lat.append(self.encoder.encode(batch).numpy().astype(np.float16))
                if self.cfg.flip:
                    lat_flip.append(self.encoder.encode(np.ascontiguousarray(batch[:, :, ::-1])).numpy()
                                    .astype(np.float16))
            shape = self.encoder.latent_shape(self.cfg.image_size)
            empty = np.zeros((0, *shape), np.float16)
            atomic_save_npy(self.chunk_path("encode", c, "latent.npy"), np.concatenate(lat) if lat else empty)
            if self.cfg.flip:
                atomic_save_npy(self.chunk_path("encode", c, "latent_flip.npy"), np.concatenate(lat_flip) if lat else empty)
            self._finish_chunk("encode", c)

    def stage_embed(self) -> None:
        embedder = None
        for c in self._bar("embed", self.my_chunks()):
            if self.done("embed", c):
                continue
            if not self.done("read", c):
                raise RuntimeError(f"embed chunk {c} needs read chunk {c}: run stage read first")
            if embedder is None:
                kw = dict(self.cfg.embedder_kw or {})
                if self.cfg.embedder in ("clip", "dinov2", "inception") and kw.get("device", "auto") == "auto":
                    kw["device"] = str(local_device("auto"))
                embedder = build_embedder(self.cfg.embedder, num_classes=self.source.num_classes, **kw)
            images = self._images(c)
            labels, ids = self._load("read", "labels", c), self._load("read", "ids", c)
            out = [embedder.embed(images[i:i + self.cfg.batch_size], labels[i:i + self.cfg.batch_size],
                                  ids[i:i + self.cfg.batch_size]) for i in range(0, len(images), self.cfg.batch_size)]
            emb = np.concatenate(out).astype(np.float32) if out else np.zeros((0, 1), np.float32)
            atomic_save_npy(self.chunk_path("embed", c, "emb.npy"), emb)
            self._finish_chunk("embed", c)

    def _rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global row layout: per-chunk row offsets, all labels and all dataset ids in row order."""
        counts = [len(self._load("read", "ids", c)) for c in range(self.num_chunks)]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        labels = np.concatenate([self._load("read", "labels", c) for c in range(self.num_chunks)])
        ids = np.concatenate([self._load("read", "ids", c) for c in range(self.num_chunks)])
        return offsets, labels, ids

    def index_plan(self, num: int, dim: int) -> grouping.IndexPlan:
        kw = {k: v for k, v in (self.cfg.index or {}).items() if v is not None}
        return grouping.index_plan(num, dim, **kw)

    def stage_retrieve(self) -> None:
        """Each rank searches the neighbours of its own chunks' embeddings (the queries are split, never the
        index). On a GPU every rank searches exactly against all embeddings on its own device; on CPUs rank 0 builds
        one faiss index into the work dir and every rank memory-maps it."""
        todo = [c for c in self.my_chunks() if not self.done("retrieve", c)]
        # Rank 0 builds the shared index whenever any rank still needs it, even with no chunk of its own left.
        builds = self.cfg.rank == 0 and any(not self.done("retrieve", c) for c in range(self.num_chunks))
        if not todo and not builds:
            return
        self._require("retrieve", "read")
        self._require("retrieve", "embed")
        offsets, labels, _ = self._rows()
        embs = [self._load("embed", "emb", c, mmap=True) for c in range(self.num_chunks)]
        num = int(offsets[-1])
        if num < self.cfg.n_max:
            raise ValueError(f"only {num} readable images; n_max={self.cfg.n_max} needs at least that many")
        dim = next(e.shape[1] for e in embs if len(e))
        plan = self.index_plan(num, dim)
        if self.cfg.rank == 0:
            print(self._estimate(plan, dim), flush=True)
        index = self._index(plan, embs, builds)
        for c in self._bar("retrieve", todo):
            rows = np.arange(offsets[c], offsets[c + 1])
            nbr, sim = grouping.search_neighbours(index, embs[c], rows, self.cfg.k)
            nbr, sim, count = grouping.order_candidates(nbr, sim, labels, labels[rows], self.cfg.tau,
                                                        self.cfg.fallback)
            atomic_save_npy(self.chunk_path("retrieve", c, "nbr.npy"), nbr)
            atomic_save_npy(self.chunk_path("retrieve", c, "sim.npy"), sim.astype(np.float32))
            atomic_save_npy(self.chunk_path("retrieve", c, "count.npy"), count)
            self._finish_chunk("retrieve", c)

    @staticmethod
    def _search_device(plan: grouping.IndexPlan) -> str:
        return str(local_device("cuda")) if plan.kind == "exact-gpu" else "cpu"

    def _index(self, plan: grouping.IndexPlan, embs: list[np.ndarray], build: bool):
        """The searcher of ``plan``: exact on this rank's GPU, or the work dir's faiss index (built here by rank 0,
        memory-mapped by everyone)."""
        if plan.kind == "exact-gpu":
            return grouping.ExactSearch(embs, self._search_device(plan))
        path = self.work / "retrieve" / "index.faiss"
        if build and not path.exists():
            started = time.monotonic()
            grouping.save_index(grouping.build_index(embs, plan, seed=int((self.cfg.index or {}).get("seed", 0))),
                                path)
            print(f"rank 0: built the {plan.kind} index of {plan.num} x {plan.dim} in "
                  f"{time.monotonic() - started:.0f} s: {path}", flush=True)
        if self._wait(lambda: [] if path.exists() else [path.name], f"the {plan.kind} index rank 0 builds"):
            raise RuntimeError(f"rank {self.cfg.rank}: {path} does not exist: rank 0 builds the retrieval index once "
                               f"for all ranks (run rank 0's retrieve stage, or let ranks wait longer: "
                               f"wait_timeout_s={self.wait_timeout_s:g})")
        return grouping.load_index(path, plan.nprobe or None)

    def stage_write(self) -> dict | None:
        todo = [c for c in self.my_chunks() if not self.chunk_path("write", c, "json").exists()]
        if todo:
            for need in ("read", "encode", "retrieve"):
                self._require("write", need)
            offsets, labels, ids = self._rows()
            lat = [self._load("encode", "latent", c, mmap=True) for c in range(self.num_chunks)]
            lat_flip = ([self._load("encode", "latent_flip", c, mmap=True) for c in range(self.num_chunks)]
                        if self.cfg.flip else None)
            shape = tuple(lat[0].shape[1:]) if len(lat) else ()
            shape = shape or tuple(self.encoder.latent_shape(self.cfg.image_size))
            pcols = shards.plain_columns(shape, self.cfg.flip)
            gcols = shards.group_columns(shape, self.cfg.k, self.cfg.flip)

            def gather(arrs: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
                out = np.zeros((len(rows), *shape), np.float16)
                for j, r in enumerate(rows):
                    if r >= 0:
                        c = int(np.searchsorted(offsets, r, side="right") - 1)
                        out[j] = arrs[c][r - offsets[c]]
                return out

            for c in self._bar("write", todo):
                nbr = self._load("retrieve", "nbr", c)
                sim = self._load("retrieve", "sim", c)
                count = self._load("retrieve", "count", c)
                rows = np.arange(offsets[c], offsets[c + 1])

                def plain_records():
                    for j, r in enumerate(rows):
                        yield shards.encode_plain(lat[c][j], labels[r], ids[r],
                                                  lat_flip[c][j] if lat_flip is not None else None)

                def group_records():
                    for j, r in enumerate(rows):
                        n = nbr[j]
                        valid = n >= 0
                        yield shards.encode_group(
                            lat[c][j], labels[r], ids[r], cand_latent=gather(lat, n),
                            cand_label=np.where(valid, labels[np.maximum(n, 0)], -1),
                            cand_id=np.where(valid, ids[np.maximum(n, 0)], -1), cand_sim=np.where(valid, sim[j], -1.0),
                            count=count[j], latent_flip=lat_flip[c][j] if lat_flip is not None else None,
                            cand_latent_flip=gather(lat_flip, n) if lat_flip is not None else None)

                staging = self.work / "write" / "staging"
                pdesc = shards.write_part(self.cfg.out, "plain", c, pcols, plain_records(), staging, self.cfg.shard_size)
                gdesc = shards.write_part(self.cfg.out, "group", c, gcols, group_records(), staging, self.cfg.shard_size)
                _save_json(self.chunk_path("write", c, "json"), {"plain": pdesc, "group": gdesc})
                self._finish_chunk("write", c)
        missing = [c for c in range(self.num_chunks) if not self.chunk_path("write", c, "json").exists()]
        if missing:
            print(f"rank {self.cfg.rank}: {len(missing)} write partitions still missing (other ranks); "
                  "index.json/meta.json are written by the rank that completes the last one")
            return None
        return self.finalize()

    def finalize(self) -> dict:
        """Merged index.json of both streams and meta.json (with grouping and storage statistics)."""
        parts = {c: json.loads(self.chunk_path("write", c, "json").read_text()) for c in range(self.num_chunks)}
        for stream in ("plain", "group"):
            shards.write_index(self.cfg.out, stream, [(c, p[stream]) for c, p in parts.items()])
        offsets, labels, ids = self._rows()
        counts = np.concatenate([self._load("retrieve", "count", c) for c in range(self.num_chunks)])
        sims = np.concatenate([self._load("retrieve", "sim", c) for c in range(self.num_chunks)])
        skipped = [s for c in range(self.num_chunks) for s in json.loads(self.chunk_path("read", c, "skipped.json")
                                                                         .read_text())]
        n = int(len(ids))
        plain_bytes = sum(shards.shard_bytes(p["plain"]) for p in parts.values())
        group_bytes = sum(shards.shard_bytes(p["group"]) for p in parts.values())
        lat0 = self._load("encode", "latent", 0, mmap=True)
        stats = grouping.group_stats(counts, sims, self.cfg.k, self.cfg.n_max, self.cfg.tau)
        stats.update({
            "num_images": n, "num_skipped": len(skipped), "skipped": skipped[:1000],
            "plain_bytes": int(plain_bytes), "group_bytes": int(group_bytes),
            "bytes_per_image_plain": plain_bytes / max(n, 1), "bytes_per_image_group": group_bytes / max(n, 1),
            "bytes_per_image_total": (plain_bytes + group_bytes) / max(n, 1),
        })
        enc_kw = {k: v for k, v in (self.cfg.encoder_kw or {}).items() if k not in ("device", "batch_size")}
        scale = float(enc_kw.get("scale", 0.18215 if self.cfg.encoder == "sdvae" else 1.0))
        meta = {
            "version": shards.META_VERSION,
            "num_records": n,
            "num_classes": int(self.source.num_classes),
            "class_names": list(self.source.class_names),
            "latent_shape": list(lat0.shape[1:]),
            "latent_dtype": "float16",
            "image_size": self.cfg.image_size,
            "encoder": {"name": self.cfg.encoder, **enc_kw},
            "scale": scale,
            "flip": bool(self.cfg.flip),
            "embedder": {"name": self.cfg.embedder,
                         **{k: v for k, v in (self.cfg.embedder_kw or {}).items() if k not in ("device", "batch_size")}},
            "n_max": self.cfg.n_max, "k": self.cfg.k, "tau": self.cfg.tau, "fallback": self.cfg.fallback,
            "source": {"name": self.cfg.source, **(self.cfg.source_kw or {}), "limit": self.cfg.limit},
            "streams": {"plain": {"num_samples": n, "bytes": int(plain_bytes)},
                        "group": {"num_samples": n, "bytes": int(group_bytes)}},
            "build_id": hashlib.sha256(json.dumps(self._fingerprint("write"), sort_keys=True).encode()).hexdigest()[:16],
            "stats": stats,
        }
        storage.write_json(storage.join(self.cfg.out, "meta.json"), meta)
        if self.cfg.cleanup_images:
            # Decoded crops are the bulk of the work dir (196 KB/image at 256 px); latents, embeddings and
            # candidates stay, so a rebuild with another tau/k/out redoes only retrieve/write.
            for c in range(self.num_chunks):
                self.chunk_path("read", c, "images.npy").unlink(missing_ok=True)
        print(f"wrote {n} records ({len(skipped)} skipped) to {self.cfg.out}: "
              f"{stats['bytes_per_image_plain']:.0f} B/image plain + {stats['bytes_per_image_group']:.0f} B/image "
              f"group; fallback rate {stats['fallback_rate']:.3f}, mean passing cosine "
              f"{stats['mean_similarity_passing']:.3f}")
        return meta


def resolve_rank_world(rank: int | None = None, world: int | None = None,
                       env: dict[str, str] | None = None) -> tuple[int, int]:
    """(rank, world) of this build process: explicit values win; otherwise the product of

    * a SLURM job array, whose task ids need not start at 0 (--array=1-8, --array=0-14:2): array rank
      (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) // STEP of SLURM_ARRAY_TASK_COUNT; and
    * the processes of one job, by :func:`gd.distributed.env.place` (torchrun's RANK / WORLD_SIZE, else the tasks
      of an srun step, SLURM_PROCID of SLURM_STEP_NUM_TASKS), the rule the trainer and sampling use;

    so rank = array rank x processes + process rank, world = array count x processes; 0 / 1 without any of them."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" in env:
        task, lo = int(env["SLURM_ARRAY_TASK_ID"]), int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
        count = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
        if (task - lo) % step or (task - lo) // step >= count:
            raise ValueError(f"SLURM_ARRAY_TASK_ID={task} (MIN={lo}, STEP={step}, COUNT={count}) does not map to a "
                             f"rank in [0, {count}): use a contiguous or evenly stepped --array, or set rank= world=")
        array_rank, arrays = (task - lo) // step, count
    else:
        array_rank, arrays = 0, 1
    process = _env.place(env)
    proc, procs = process.rank, process.world_size
    auto_rank, auto_world = array_rank * procs + proc, arrays * procs
    return (auto_rank if rank is None else int(rank)), (auto_world if world is None else int(world))


def config_from_dict(d: dict) -> BuildConfig:
    """BuildConfig from the hydra config of conf/build_shards.yaml (selected source/encoder/embedder kwargs)."""
    def sel(group: str, name: str) -> dict:
        table = d.get(group) or {}
        if name not in table:
            raise ValueError(f"{group[:-1]} {name!r} has no settings in {group}: expected one of {sorted(table)}")
        return dict(table[name] or {})
    rank, world = resolve_rank_world(d.get("rank"), d.get("world"))
    return BuildConfig(
        out=str(d["out"]), work_dir=str(d["work_dir"]),
        source=d["source"], source_kw=sel("sources", d["source"]), image_size=int(d["image_size"]),
        limit=d.get("limit"), encoder=d["encoder"], encoder_kw=sel("encoders", d["encoder"]), flip=bool(d["flip"]),
        embedder=d["embedder"], embedder_kw=sel("embedders", d["embedder"]), n_max=int(d["n_max"]), k=int(d["k"]),
        tau=float(d["tau"]), fallback=d["fallback"], index=dict(d.get("index") or {}),
        chunk_size=int(d["chunk_size"]), batch_size=int(d["batch_size"]), shard_size=str(d["shard_size"]),
        stages=tuple(d["stages"]), rank=rank, world=world,
        chunk_delay_s=float(d.get("chunk_delay_s") or 0.0),
        wait_timeout_s=None if d.get("wait_timeout_s") is None else float(d["wait_timeout_s"]),
        cleanup_images=bool(d.get("cleanup_images", False)), progress=bool(d.get("progress", True)),
    )
