"""Streaming loaders over the shards of tools/build_shards.py: a plain stream and a group stream.

`build_loaders` returns two `StreamingDataLoader`s. The plain one serves the conditional steps (one latent per
sample); the group one serves group steps: each sample is an anchor plus N-1 of its K stored candidates, drawn by a
generator seeded with (seed, epoch, sample index), so the groups are reproducible and survive a mid-epoch resume.
Each rank sees distinct samples (streaming partitions by RANK/WORLD_SIZE or torch.distributed), and both loaders
resume exactly from `state_dict()` / `load_state_dict()`. Remote roots are `s3://` (S3_ENDPOINT_URL honoured,
credentials from the environment / AWS config only); shards are cached under `cache/<build_id>/` so a rebuilt
dataset never reuses a stale cached index.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

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


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack numpy fields batch-wise and cast latents to float32 once per batch (cheaper than per sample)."""
    out = {}
    for key in samples[0]:
        arr = np.stack([s[key] for s in samples])
        # numpy's cast, not torch's: torch's multi-threaded half->float stalls when the main process shares cores.
        out[key] = torch.from_numpy(arr.astype(np.float32) if key == "latent" else arr)
    return out


class _EpochAware(StreamingDataset):
    """Remembers the epoch streaming assigns at the start of each __iter__ (resumed epochs included)."""

    epoch = 0

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


def build_loaders(data_cfg: Mapping | Any, *, group_size: int, micro_batch: int, seed: int, rank: int,
                  world_size: int, replication: int = 1) -> tuple[StreamingDataLoader, StreamingDataLoader]:
    """(plain_loader, group_loader) over `data_cfg.root` (local dir or s3://bucket/prefix).

    Plain batch: {"latent": float32 (B,C,H,W), "label": long (B,), "id": long (B,)} with B = micro_batch.
    Group batch: {"latent": float32 (B//N,N,C,H,W), "label"/"id": long (B//N,N), "sim": float32 (B//N,N),
    "fallback": bool (B//N,)}, group-major, anchor first. data_cfg keys: root, cache, cache_limit, shuffle,
    num_workers, and optionally flip, drop_last (default true), predownload, shuffle_block_size.

    ``replication`` P (group parallelism): P consecutive ranks get the same batches (streaming's ``replication``,
    which also counts their shared samples once in ``state_dict``); ``micro_batch`` is then the batch the P ranks
    share."""
    root = str(_get(data_cfg, "root"))
    check_groups(micro_batch, group_size, f"micro_batch={micro_batch}")
    world = World.detect()
    if (world.rank, world.num_ranks) != (int(rank), int(world_size)):
        raise ValueError(f"rank/world_size ({rank}/{world_size}) differ from what streaming detects "
                         f"({world.rank}/{world.num_ranks} from RANK/WORLD_SIZE/LOCAL_WORLD_SIZE or "
                         "torch.distributed): set those environment variables or init torch.distributed first")
    meta = check_dataset(root)
    if group_size > int(meta["n_max"]):
        raise ValueError(f"group_size={group_size} exceeds the shards' n_max={meta['n_max']} (k={meta['k']}): "
                         "rebuild them with a larger n_max/k")
    common = dict(
        shuffle=bool(_get(data_cfg, "shuffle", True)), shuffle_seed=int(seed),
        cache_limit=_get(data_cfg, "cache_limit"), predownload=_get(data_cfg, "predownload"),
        shuffle_block_size=_get(data_cfg, "shuffle_block_size"), download_timeout=120,
        replication=int(replication) if int(replication) > 1 else None,
    )
    flip = bool(_get(data_cfg, "flip", False)) and bool(meta.get("flip"))

    def locations(stream: str) -> dict[str, str | None]:
        if storage.is_remote(root):
            cache = _get(data_cfg, "cache")
            if not cache:
                raise ValueError(f"data.cache (local cache directory) is required for remote root {root}")
            return {"remote": storage.join(root, stream), "local": cached_stream(cache, root, stream, meta)}
        return {"remote": None, "local": str(Path(root) / stream)}

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
