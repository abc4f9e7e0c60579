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
from typing import Any

import numpy as np
from streaming import MDSWriter

from gd.data import storage
from gd.data.grouping import draw_group
from gd.rng import hash_uniform

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


# ---- records: the writer's encode_* and the reader's decode_* side by side -------------------------------------
def encode_plain(latent: np.ndarray, label: int, image_id: int, latent_flip: np.ndarray | None = None) -> dict:
    """A plain record (the columns of :func:`plain_columns`)."""
    rec = {"latent": np.asarray(latent), "label": int(label), "id": int(image_id)}
    if latent_flip is not None:
        rec["latent_flip"] = np.asarray(latent_flip)
    return rec


def decode_plain(rec: dict[str, Any], use_flip: bool) -> dict[str, Any]:
    """A plain record as a sample: {"latent" float16 (C,H,W), "label", "id" int64}; the flipped latent when asked
    and stored."""
    lat = rec["latent_flip"] if use_flip and "latent_flip" in rec else rec["latent"]
    return {"latent": lat, "label": np.int64(rec["label"]), "id": np.int64(rec["id"])}


def encode_group(latent: np.ndarray, label: int, image_id: int, cand_latent: np.ndarray, cand_label: np.ndarray,
                 cand_id: np.ndarray, cand_sim: np.ndarray, count: int, latent_flip: np.ndarray | None = None,
                 cand_latent_flip: np.ndarray | None = None) -> dict:
    """A group record (the columns of :func:`group_columns`): the anchor, its K candidates ordered so that the
    ``count`` with cosine >= tau come first, missing candidates as label/id -1 and cosine -1."""
    cand_id = np.asarray(cand_id, np.int64)
    rec = {"latent": np.asarray(latent), "label": int(label), "id": int(image_id),
           "cand_latent": np.asarray(cand_latent), "cand_label": np.asarray(cand_label, np.int64), "cand_id": cand_id,
           "cand_sim": np.asarray(cand_sim, np.float32), "count": int(count), "num_cand": int((cand_id >= 0).sum())}
    if latent_flip is not None:
        rec["latent_flip"] = np.asarray(latent_flip)
        rec["cand_latent_flip"] = np.asarray(cand_latent_flip)
    return rec


def decode_group(rec: dict[str, Any], group_size: int, u: np.ndarray, use_flip: bool) -> dict[str, Any]:
    """A group record as a group of ``group_size`` (anchor first): the partners drawn by ``u`` (uniforms, at least
    ``count`` of them) among the passing candidates (:func:`gd.data.grouping.draw_group`). Returns "latent" float16
    (N,C,H,W), "label"/"id" int64 (N,), "sim" float32 (N,) (anchor 1.0), "fallback" (too few passed tau)."""
    slots, fallback = draw_group(int(rec["count"]), int(rec["num_cand"]), group_size, u)
    flip = use_flip and "latent_flip" in rec
    anchor, cands = (rec["latent_flip"], rec["cand_latent_flip"]) if flip else (rec["latent"], rec["cand_latent"])
    return {
        "latent": np.concatenate([anchor[None], cands[slots]]),
        "label": np.concatenate([[rec["label"]], rec["cand_label"][slots]]).astype(np.int64),
        "id": np.concatenate([[rec["id"]], rec["cand_id"][slots]]).astype(np.int64),
        "sim": np.concatenate([[1.0], rec["cand_sim"][slots]]).astype(np.float32),
        "fallback": np.bool_(fallback),
    }


def group_draws(seed: int, epoch: int, sample_id: int, rec: dict[str, Any]) -> np.ndarray:
    """The uniforms a group record's sample draws from: ``count`` for its partners, one more for its flip coin."""
    return hash_uniform(seed, epoch, sample_id, int(rec["count"]) + 1)


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
