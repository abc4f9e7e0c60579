"""Streaming loaders over the shards of tools/build_shards.py: a plain stream and a group stream.

`build_loaders` returns two `StreamingDataLoader`s. The plain one serves the conditional steps (one latent per
sample); the group one serves group steps: each sample is an anchor plus N-1 of its K stored candidates, drawn by a
generator seeded with (seed, epoch, sample index), so the groups are reproducible and survive a mid-epoch resume.
Each rank sees distinct samples (streaming partitions by RANK/WORLD_SIZE or torch.distributed), and both loaders
resume exactly from `state_dict()` / `load_state_dict()`. Roots are a local folder or `s3://` (S3_ENDPOINT_URL
honoured, credentials from the environment / AWS config only); either way shards are copied into and decompressed
in the node-local `cache/<build_id>/`, so a rebuilt dataset never reuses a stale cached index and nodes sharing
the root never write the same files.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.world import World

from gd.data import shards, storage
from gd.data.validate_shards import cached_stream, validate_shard_set
from gd.diffusion.plan import check_groups
from gd.rng import hash_uniform


def check_dataset(root: str) -> dict:
    """Fail fast (before any streaming machinery starts) when the endpoint, bucket or shards are missing, or when
    meta.json / index.json are not a shard set gd wrote (gd.data.validate_shards).

    Returns meta.json. Raises ConnectionError (endpoint/bucket), FileNotFoundError (shards) or ShardSetError."""
    client = None
    if storage.is_remote(root):
        client = storage.s3_client()
        storage.check_bucket(root, client)
    hint = f"build them with `python tools/build_shards.py out={root}` or fix data.root"
    for rel in ("meta.json", "plain/index.json", "group/index.json"):
        url = storage.join(root, rel)
        try:
            found = storage.exists(url, client)
        except Exception as exc:
            raise ConnectionError(storage.describe_s3_error(exc, url)) from storage.redacted(exc)
        if not found:
            raise FileNotFoundError(f"no shards at {root}: {url} is missing; {hint}")
    return validate_shard_set(root, client=client)


def clean_stale_streaming(cache: str | os.PathLike, shm_dir: str = "/dev/shm") -> list[str]:
    """Remove what streaming left in this node's shared memory (and its /tmp file locks) for datasets cached under
    ``cache``, by ranks that were killed (SIGKILL, a lost job step) before they could clean up; returns the names.

    Streaming registers each dataset under the first free prefix ``NNNNNN_`` and refuses to start when a registered
    prefix lists the same local folder with a remote ("Reused local directory"): a requeued job on the same node
    would fail at its first batch. Unlike ``streaming.base.util.clean_stale_shared_memory``, which removes every
    prefix, this removes only the prefixes whose folders lie under ``cache`` (this run's node-local cache, so another
    job's live datasets on a shared node are left alone). Call it once per node (local rank 0) before any loader of
    this run starts, and let the node's other ranks wait for it.
    """
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path, _unpack_locals

    under = os.path.realpath(cache) + os.sep
    removed: list[str] = []
    locks = (BARRIER_FILELOCK, CACHE_FILELOCK)
    for prefix in range(100_000):
        registry = Path(shm_dir) / _get_path(prefix, LOCALS)
        lock_files = [Path(tempfile.gettempdir()) / _get_path(prefix, name) for name in locks]
        if not registry.exists():
            if any(f.exists() for f in lock_files):
                continue  # streaming skips such a prefix and looks further, and so do we
            break
        try:
            folders, _ = _unpack_locals(registry.read_bytes())
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if not any(os.path.realpath(f).startswith(under) for f in folders if f):
            continue
        for name in SHM_TO_CLEAN:
            path = Path(shm_dir) / _get_path(prefix, name)
            if path.exists():
                path.unlink(missing_ok=True)
                removed.append(path.name)
        for path in lock_files:
            if path.exists():
                path.unlink(missing_ok=True)
                removed.append(path.name)
    return removed


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack numpy fields batch-wise and cast latents to float32 once per batch (cheaper than per sample)."""
    out = {}
    for key in samples[0]:
        arr = np.stack([s[key] for s in samples])
        # numpy's cast, not torch's: torch's multi-threaded half->float stalls when the main process shares cores.
        out[key] = torch.from_numpy(arr.astype(np.float32) if key == "latent" else arr)
    return out


PREFIX_LOCK = "gd_streaming_prefix.lock"


@contextlib.contextmanager
def registration_lock(take: bool, lock_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """Hold this node's lock on streaming's shared-memory registry while a dataset registers (``take`` = this
    process is its job's local leader; the others only look the prefix up, so they must not wait here).

    Streaming picks the first free prefix ``NNNNNN_`` and only then creates ``NNNNNN_locals``: two jobs whose
    datasets start at once on one node (two runs of the method benchmark, two SLURM jobs sharing a node) pick the
    same prefix and the second dies with ``FileExistsError: '/NNNNNN_locals'``. The lock makes find-then-create
    one step across processes; it is an flock, so a killed holder releases it. It lives beside the registry, in
    /dev/shm, which is node-local even where /tmp is not (a lock shared by several nodes would deadlock a job whose
    node leaders meet in streaming's barrier)."""
    if not take:
        yield
        return
    path = Path(lock_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())) / PREFIX_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file: a read-only descriptor can hold an flock too
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class _EpochAware(StreamingDataset):
    """Remembers the epoch streaming assigns at the start of each __iter__ (resumed epochs included), and registers
    in shared memory under the node's registration lock."""

    epoch = 0

    def __init__(self, **kwargs: Any) -> None:
        with registration_lock(World.detect().is_local_leader):
            super().__init__(**kwargs)

    def _resume_incr_epoch(self) -> tuple[int, int]:
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self.epoch = epoch
        return epoch, sample_in_epoch


class PlainDataset(_EpochAware):
    """Samples {"latent": float16 (C,H,W), "label", "id"} as numpy (collate casts to float32 per batch); with
    flip=True a seeded coin picks the flipped latent."""

    def __init__(self, *, seed: int = 0, flip: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed, self.flip = int(seed), bool(flip)

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        rec = super().get_item(sample_id, retry)
        flip = self.flip and "latent_flip" in rec and hash_uniform(self.seed, self.epoch, sample_id, 1)[0] < 0.5
        return shards.decode_plain(rec, flip)


class GroupDataset(_EpochAware):
    """Samples of N members (anchor first), numpy: "latent" float16 (N,C,H,W), "label"/"id" int64 (N,), "sim" (N,)
    (anchor 1.0), "fallback" bool (True when fewer than N-1 candidates passed tau and next-ranked ones were used)."""

    def __init__(self, *, group_size: int, seed: int = 0, flip: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if group_size < 1:
            raise ValueError(f"group_size={group_size}: expected >= 1")
        self.group_size, self.seed, self.flip = int(group_size), int(seed), bool(flip)

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        rec = super().get_item(sample_id, retry)
        u = shards.group_draws(self.seed, self.epoch, sample_id, rec)
        return shards.decode_group(rec, self.group_size, u, self.flip and u[int(rec["count"])] < 0.5)


def _get(cfg: Mapping | Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _locations(root: str, cache: str, stream: str, meta: dict) -> dict[str, str]:
    """streaming's remote and node-local folders of ``<root>/<stream>``. A local root is a remote too: streaming
    decompresses zstd shards next to its `local` copy, and a folder several nodes mount (NFS, Lustre) would have
    every node writing the same files."""
    remote = storage.join(root, stream) if storage.is_remote(root) else str(Path(root).resolve() / stream)
    return {"remote": remote, "local": cached_stream(cache, root, stream, meta)}


def plain_records(root: str, cache: str) -> PlainDataset:
    """Random access (``ds.get_item(i)``, in index order, no flip) to the plain records of the shards at ``root``,
    cached in ``cache`` (a folder of its own: streaming refuses a local folder another open dataset uses). Reading
    record i gives the same record on every rank (streaming's partition applies to iteration only)."""
    meta = check_dataset(root)
    return PlainDataset(seed=0, flip=False, batch_size=1, shuffle=False, download_timeout=120,
                        **_locations(root, cache, "plain", meta))


def build_loaders(data_cfg: Mapping | Any, *, group_size: int, micro_batch: int, seed: int, rank: int,
                  world_size: int, replication: int = 1,
                  meta: dict | None = None) -> tuple[StreamingDataLoader, StreamingDataLoader]:
    """(plain_loader, group_loader) over `data_cfg.root` (local dir or s3://bucket/prefix).

    Plain batch: {"latent": float32 (B,C,H,W), "label": long (B,), "id": long (B,)} with B = micro_batch.
    Group batch: {"latent": float32 (B//N,N,C,H,W), "label"/"id": long (B//N,N), "sim": float32 (B//N,N),
    "fallback": bool (B//N,)}, group-major, anchor first. data_cfg keys: root, cache, cache_limit, shuffle,
    num_workers, and optionally flip, drop_last (default true), predownload, shuffle_block_size,
    num_canonical_nodes.

    ``cache`` is where this node's ranks copy and decompress the shards of ``root`` (local or s3://): it must be
    node-local (gd.train.nodes refuses one that several nodes share) and private (gd.io.private_dir).

    ``replication`` P (group parallelism): P consecutive ranks get the same batches (streaming's ``replication``,
    which also counts their shared samples once in ``state_dict``); ``micro_batch`` is then the batch the P ranks
    share. ``meta``: what :func:`check_dataset` returned for this root, when the caller checked it already."""
    root = str(_get(data_cfg, "root"))
    check_groups(micro_batch, group_size, f"micro_batch={micro_batch}")
    world = World.detect()
    if (world.rank, world.num_ranks) != (int(rank), int(world_size)):
        raise ValueError(f"rank/world_size ({rank}/{world_size}) differ from what streaming detects "
                         f"({world.rank}/{world.num_ranks} from RANK/WORLD_SIZE/LOCAL_WORLD_SIZE or "
                         "torch.distributed): set those environment variables or init torch.distributed first")
    meta = check_dataset(root) if meta is None else meta
    if group_size > int(meta["n_max"]):
        raise ValueError(f"group_size={group_size} exceeds the shards' n_max={meta['n_max']} (k={meta['k']}): "
                         "rebuild them with a larger n_max/k")
    common = dict(
        shuffle=bool(_get(data_cfg, "shuffle", True)), shuffle_seed=int(seed),
        cache_limit=_get(data_cfg, "cache_limit"), predownload=_get(data_cfg, "predownload"),
        shuffle_block_size=_get(data_cfg, "shuffle_block_size"), download_timeout=120,
        num_canonical_nodes=_get(data_cfg, "num_canonical_nodes"),
        replication=int(replication) if int(replication) > 1 else None,
    )
    flip = bool(_get(data_cfg, "flip", False)) and bool(meta.get("flip"))

    cache = _get(data_cfg, "cache")
    if not cache:
        raise ValueError(f"data.cache is required (a node-local folder the shards of {root} are copied and "
                         "decompressed into)")

    def locations(stream: str) -> dict[str, str | None]:
        return _locations(root, str(cache), stream, meta)

    n_groups = micro_batch // group_size
    plain = PlainDataset(seed=seed, flip=flip, batch_size=micro_batch, **locations("plain"), **common)
    group = GroupDataset(group_size=group_size, seed=seed, flip=flip, batch_size=n_groups, **locations("group"),
                         **common)
    workers = int(_get(data_cfg, "num_workers", 0) or 0)
    drop_last = bool(_get(data_cfg, "drop_last", True))
    loader_kw = dict(num_workers=workers, drop_last=drop_last, persistent_workers=workers > 0, collate_fn=collate,
                     pin_memory=torch.cuda.is_available())
    return (StreamingDataLoader(plain, batch_size=micro_batch, **loader_kw),
            StreamingDataLoader(group, batch_size=n_groups, **loader_kw))
