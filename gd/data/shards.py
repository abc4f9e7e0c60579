"""MDS layout of a grouped latent dataset and its writer.

    <out>/plain/index.json, plain/part-XXXXX/shard.*.mds.zstd   one latent per record (90% of steps read this)
    <out>/group/index.json, group/part-XXXXX/shard.*.mds.zstd   anchor + K candidates per record (group steps)
    <out>/meta.json                                             shapes, encoder, grouping parameters, stats

Why two streams: a group record is (K+1) latents; reading it on a plain conditional step would cost (K+1)x the
bytes. Why K candidates inline instead of ids only: group steps then need one sequential read per group, with no
random access across shards. Each build chunk is written as its own MDS partition (`part-XXXXX`) so a killed write
stage redoes at most one partition; the merged index.json lists every partition's shards, as
`streaming.base.util.merge_index` would.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from streaming import MDSWriter

from gd.data import storage

META_VERSION = 1


def plain_columns(latent_shape: tuple[int, ...], flip: bool = False) -> dict[str, str]:
    shape = ",".join(map(str, latent_shape))
    cols = {"latent": f"ndarray:float16:{shape}", "label": "int64", "id": "int64"}
    if flip:
        cols["latent_flip"] = f"ndarray:float16:{shape}"
    return cols


def group_columns(latent_shape: tuple[int, ...], k: int, flip: bool = False) -> dict[str, str]:
    shape = ",".join(map(str, latent_shape))
    cols = {
        "latent": f"ndarray:float16:{shape}", "label": "int64", "id": "int64",
        "cand_latent": f"ndarray:float16:{k},{shape}", "cand_label": f"ndarray:int64:{k}",
        "cand_id": f"ndarray:int64:{k}", "cand_sim": f"ndarray:float32:{k}",
        "count": "int64", "num_cand": "int64",
    }
    if flip:
        cols["latent_flip"] = f"ndarray:float16:{shape}"
        cols["cand_latent_flip"] = f"ndarray:float16:{k},{shape}"
    return cols


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def write_part(out: str, stream: str, part: int, columns: dict[str, str], records: Iterable[dict],
               staging: str | Path, size_limit: str | int = "64mb") -> list[dict]:
    """Write one MDS partition `<out>/<stream>/part-XXXXX` (zstd) and return its shard descriptors.

    Re-writing a partition is idempotent: local leftovers are removed first, remote objects are overwritten by the
    same names (the same records give the same shards)."""
    dest = storage.join(out, stream, part_name(part))
    if storage.is_remote(out):
        target = (str(Path(staging) / stream / part_name(part)), dest)
        kw = dict(keep_local=False)
    else:
        target, kw = dest, {}
    with MDSWriter(out=target, columns=columns, compression="zstd", size_limit=size_limit, exist_ok=True,
                   **kw) as writer:
        for rec in records:
            writer.write(rec)
    return [dict(s) for s in writer.shards]


def shard_bytes(shards: list[dict]) -> int:
    """Stored bytes of a list of shard descriptors (compressed size when zstd, else raw)."""
    return int(sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in shards))


def write_index(out: str, stream: str, parts: list[tuple[int, list[dict]]]) -> None:
    """Merged `<out>/<stream>/index.json` listing all partitions' shards, basenames prefixed by the part folder."""
    shards = []
    for part, descs in sorted(parts, key=lambda p: p[0]):
        for d in descs:
            d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if d.get(key):
                    d[key]["basename"] = f"{part_name(part)}/{d[key]['basename']}"
            shards.append(d)
    storage.write_json(storage.join(out, stream, "index.json"), {"version": 2, "shards": shards})
