"""Validation of a shard set's ``meta.json`` and ``index.json`` before streaming reads them.

mosaicml-streaming joins every shard basename of ``index.json`` to its local cache folder without checking it,
downloads there and, with ``cache_limit``, deletes there; ``meta["build_id"]`` becomes part of the cache path;
sample counts size the arrays each rank allocates. A planted ``../../victim/file.mds`` would therefore be written
(or evicted) outside the cache, and a set claiming 10**12 samples ends in an out-of-memory. Everything streaming
will act on is checked here first, with an error naming the file and the bad field:

- shard file names: relative paths of plain components (no ``..``, no absolute path, no backslash), ending in
  ``.mds`` / ``.mds.zstd``, each used once;
- columns: exactly the names, encodings and sizes gd.data.shards writes for the set's latent shape, k and flip;
- format ``mds``, compression ``zstd`` or none, known hash names;
- ``build_id`` of the form the builder writes (16 hex digits), meta version, latent shape, k, n_max;
- sample and byte counts within :data:`MAX_SAMPLES` / :data:`MAX_SHARD_BYTES`, and the per-shard samples summing
  to meta's ``num_records``.

For a remote set, :func:`cached_stream` writes the validated ``index.json`` into the (private) cache itself, so the
bytes streaming then reads are the bytes checked here, not a second download.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gd.data import storage
from gd.io import atomic_write_bytes, private_dir

STREAMS = ("plain", "group")
# ImageNet-21k has 14M images; a set claiming 10**8+ records is a mistake or an attack (streaming allocates several
# int64 arrays of that length per rank before the first batch).
MAX_SAMPLES = 10**8
MAX_SHARD_BYTES = 2**34
MAX_SHARDS = 10**6
MAX_LATENT_ELEMENTS = 2**24
BUILD_ID = re.compile(r"^[0-9a-f]{16}$")
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DTYPE_BYTES = {"float16": 2, "float32": 4, "float64": 8, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}


class ShardSetError(ValueError):
    """meta.json or index.json of a shard set that streaming must not be given."""


def _int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def validate_meta(meta: Any, where: str) -> None:
    """Raise ShardSetError unless ``meta`` (meta.json of ``where``) has the fields streaming paths and sizes use."""
    from gd.data.shards import META_VERSION

    if not isinstance(meta, dict):
        raise ShardSetError(f"{where}: meta.json is a {type(meta).__name__}, expected an object")
    problems = []
    if meta.get("version", META_VERSION) != META_VERSION:
        problems.append(f"version={meta.get('version')!r}: expected {META_VERSION}")
    if not isinstance(meta.get("build_id"), str) or not BUILD_ID.match(meta["build_id"]):
        problems.append(f"build_id={meta.get('build_id')!r}: expected 16 lowercase hex digits (it names the cache "
                        "folder)")
    shape = meta.get("latent_shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 4 and all(_int(d, 1, 4096) for d in shape)):
        problems.append(f"latent_shape={shape!r}: expected 1 to 4 dimensions in [1, 4096]")
    else:
        elements = 1
        for d in shape:
            elements *= d
        if elements > MAX_LATENT_ELEMENTS:
            problems.append(f"latent_shape={shape}: {elements} elements per latent, more than {MAX_LATENT_ELEMENTS}")
    if not _int(meta.get("k"), 1, 4096):
        problems.append(f"k={meta.get('k')!r}: expected an integer in [1, 4096]")
    elif not _int(meta.get("n_max"), 1, meta["k"] + 1):
        problems.append(f"n_max={meta.get('n_max')!r}: expected an integer in [1, k + 1 = {meta['k'] + 1}]")
    if not isinstance(meta.get("flip", False), bool):
        problems.append(f"flip={meta.get('flip')!r}: expected true or false")
    if not _int(meta.get("num_records"), 1, MAX_SAMPLES):
        problems.append(f"num_records={meta.get('num_records')!r}: expected an integer in [1, {MAX_SAMPLES}]")
    if problems:
        raise ShardSetError(f"{where}/meta.json is not a shard set gd can read:\n  " + "\n  ".join(problems))


def expected_columns(stream: str, meta: dict) -> dict[str, str]:
    """Column name -> MDS encoding that gd.data.shards writes for ``stream`` of a set described by ``meta``."""
    from gd.data import shards

    shape, flip = tuple(meta["latent_shape"]), bool(meta.get("flip", False))
    if stream == "plain":
        return shards.plain_columns(shape, flip)
    return shards.group_columns(shape, int(meta["k"]), flip)


def _encoding_bytes(encoding: str) -> int | None:
    """Bytes per sample of a fixed-size MDS encoding (``int64``, ``ndarray:<dtype>:<shape>``)."""
    if encoding in _DTYPE_BYTES:
        return _DTYPE_BYTES[encoding]
    parts = encoding.split(":")
    if len(parts) == 3 and parts[0] == "ndarray" and parts[1] in _DTYPE_BYTES:
        size = _DTYPE_BYTES[parts[1]]
        for d in parts[2].split(","):
            size *= int(d)
        return size
    return None


def safe_basename(name: Any) -> bool:
    """A relative path of at most 4 plain components (letters, digits, ``._-``; never ``.`` or ``..``)."""
    if not isinstance(name, str) or not name or len(name) > 512 or "\\" in name or name.startswith("/"):
        return False
    parts = name.split("/")
    return len(parts) <= 4 and all(_COMPONENT.match(p) for p in parts)


def validate_index(index: Any, stream: str, meta: dict, where: str) -> None:
    """Raise ShardSetError unless ``index`` (``<where>/<stream>/index.json``) lists only shards gd wrote."""
    from streaming.base.hashing import get_hashes

    path = f"{where}/{stream}/index.json"
    if not isinstance(index, dict) or index.get("version") != 2 or not isinstance(index.get("shards"), list):
        raise ShardSetError(f"{path}: expected {{\"version\": 2, \"shards\": [...]}}")
    shards = index["shards"]
    if not 1 <= len(shards) <= MAX_SHARDS:
        raise ShardSetError(f"{path}: {len(shards)} shards, expected 1 to {MAX_SHARDS}")
    want = expected_columns(stream, meta)
    sizes = {name: _encoding_bytes(enc) for name, enc in want.items()}
    hashes = set(get_hashes())
    seen: set[str] = set()
    total = 0
    for i, shard in enumerate(shards):
        at = f"{path}: shards[{i}]"
        if not isinstance(shard, dict):
            raise ShardSetError(f"{at} is a {type(shard).__name__}, expected an object")
        if shard.get("format") != "mds" or shard.get("version") != 2:
            raise ShardSetError(f"{at}: format={shard.get('format')!r} version={shard.get('version')!r}, expected "
                                "'mds' version 2")
        if shard.get("compression") not in (None, "zstd"):
            raise ShardSetError(f"{at}: compression={shard.get('compression')!r}, expected 'zstd' or null")
        names, encodings = shard.get("column_names"), shard.get("column_encodings")
        if not (isinstance(names, list) and isinstance(encodings, list) and len(names) == len(encodings)
                and dict(zip(names, encodings)) == want and len(set(names)) == len(names)):
            raise ShardSetError(f"{at}: columns {dict(zip(names or [], encodings or []))} differ from what gd writes "
                                f"for this set ({want}; latent_shape, k and flip from meta.json)")
        if shard.get("column_sizes") != [sizes[n] for n in names]:
            raise ShardSetError(f"{at}: column_sizes={shard.get('column_sizes')!r}, expected "
                                f"{[sizes[n] for n in names]} for columns {names}")
        if not isinstance(shard.get("hashes"), list) or not set(shard["hashes"]) <= hashes:
            raise ShardSetError(f"{at}: hashes={shard.get('hashes')!r}, expected names among {sorted(hashes)}")
        if not _int(shard.get("samples"), 1, MAX_SAMPLES):
            raise ShardSetError(f"{at}: samples={shard.get('samples')!r}, expected an integer in [1, {MAX_SAMPLES}]")
        total += shard["samples"]
        for key, suffix in (("raw_data", ".mds"), ("zip_data", ".mds.zstd")):
            info = shard.get(key)
            if info is None and key == "zip_data" and shard.get("compression") is None:
                continue
            if not isinstance(info, dict):
                raise ShardSetError(f"{at}: {key}={info!r}, expected an object with basename and bytes")
            name = info.get("basename")
            if not safe_basename(name) or not name.endswith(suffix):
                raise ShardSetError(f"{at}: {key}.basename={name!r} is not a relative path of plain names ending "
                                    f"in {suffix!r} (no '..', no absolute path): it would be read, written or "
                                    f"evicted outside the shard folder")
            if name in seen:
                raise ShardSetError(f"{at}: {key}.basename={name!r} is listed twice")
            seen.add(name)
            if not _int(info.get("bytes"), 0, MAX_SHARD_BYTES):
                raise ShardSetError(f"{at}: {key}.bytes={info.get('bytes')!r}, expected an integer in "
                                    f"[0, {MAX_SHARD_BYTES}]")
        for key in ("raw_meta", "zip_meta"):
            if shard.get(key) is not None:
                raise ShardSetError(f"{at}: {key} is set; MDS shards have no separate meta file")
    if total != meta["num_records"]:
        raise ShardSetError(f"{path}: its shards hold {total} samples, but meta.json says num_records="
                            f"{meta['num_records']}")


def validate_shard_set(root: str, meta: Any = None, client: Any = None, streams: tuple[str, ...] = STREAMS) -> dict:
    """Validate ``<root>/meta.json`` (read unless given) and each stream's ``index.json``; returns meta.

    Local paths and ``s3://`` roots; nothing is downloaded except those JSON files. Raises ShardSetError."""
    if meta is None:
        meta = storage.read_json(storage.join(root, "meta.json"), client)
    validate_meta(meta, root)
    for stream in streams:
        validate_index(_read_index(storage.join(root, stream, "index.json"), client), stream, meta, root)
    return meta


def _read_index(url: str, client: Any = None) -> Any:
    try:
        return json.loads(storage.read_bytes(url, client))
    except json.JSONDecodeError as err:
        raise ShardSetError(f"{url} is not JSON: {err}") from err


def cached_stream(cache: str, root: str, stream: str, meta: dict, client: Any = None) -> str:
    """The local folder streaming should cache ``<root>/<stream>`` in: ``<cache>/<build_id>/<stream>``, a private
    directory (:func:`gd.io.private_dir`) holding the validated ``index.json`` (fetched, checked, then written here,
    so streaming never downloads an unchecked index)."""
    validate_meta(meta, root)
    local = private_dir(Path(cache) / meta["build_id"] / stream)
    raw = storage.read_bytes(storage.join(root, stream, "index.json"), client)
    try:
        index = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ShardSetError(f"{storage.join(root, stream, 'index.json')} is not JSON: {err}") from err
    validate_index(index, stream, meta, root)
    target = local / "index.json"
    if not target.is_file() or target.read_bytes() != raw:
        atomic_write_bytes(target, raw)
    return str(local)
