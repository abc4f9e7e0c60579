"""Shard sets are untrusted input: meta.json and index.json are checked before streaming acts on them.

A tampered copy of a real shard set (built by the session fixtures) gets one bad field at a time; each must be
refused with an error naming that field, before any shard is downloaded or any cache folder is made.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from gd.data.loader import build_loaders, check_dataset
from gd.data.validate_shards import MAX_SAMPLES, ShardSetError, validate_index, validate_meta
from gd.io import UntrustedPathError


def _load(root: Path, stream: str) -> dict:
    return json.loads((root / stream / "index.json").read_text())


def _tamper(root: Path, dest: Path, stream: str, edit) -> Path:
    shutil.copytree(root, dest)
    index = _load(dest, stream)
    edit(index["shards"][0])
    (dest / stream / "index.json").write_text(json.dumps(index))
    return dest


@pytest.mark.parametrize("basename", ["../../../victim/escaped.mds.zstd", "/etc/escaped.mds.zstd",
                                      "part-00000/../../x.mds.zstd", "part-00000\\shard.mds.zstd", "./a.mds.zstd",
                                      "part-00000/shard.00000.sh"])
def test_shard_names_outside_the_folder_are_refused(local_shards, basename):
    """Fails before the fix: streaming joined any basename to its cache folder (reading, writing and evicting
    there)."""
    root, meta = local_shards
    index = copy.deepcopy(_load(root, "group"))
    index["shards"][0]["zip_data"]["basename"] = basename
    with pytest.raises(ShardSetError, match=r"group/index\.json: shards\[0\]: zip_data\.basename="):
        validate_index(index, "group", meta, str(root))


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s["column_encodings"].__setitem__(0, "pkl"), r"columns .* differ from what gd writes"),
    (lambda s: s.__setitem__("column_sizes", [8] * len(s["column_sizes"])), r"column_sizes="),
    (lambda s: s.__setitem__("samples", 10**12), rf"samples=1000000000000, expected an integer in \[1, {MAX_SAMPLES}\]"),
    (lambda s: s.__setitem__("compression", "bz2"), r"compression='bz2'"),
    (lambda s: s.__setitem__("hashes", ["os.system"]), r"hashes=\['os.system'\]"),
    (lambda s: s["raw_data"].__setitem__("bytes", -1), r"raw_data\.bytes=-1"),
])
def test_index_fields_streaming_trusts_are_checked(local_shards, edit, needle):
    """Fails before the fix: a pickle column (code execution on read), wrong sizes or a 10**12-sample claim
    ("Unable to allocate 7.28 TiB") reached streaming unchecked."""
    root, meta = local_shards
    index = copy.deepcopy(_load(root, "group"))
    edit(index["shards"][0])
    with pytest.raises(ShardSetError, match=needle):
        validate_index(index, "group", meta, str(root))


@pytest.mark.parametrize("key,value,needle", [
    ("build_id", "../../victim", r"build_id='\.\./\.\./victim': expected 16 lowercase hex digits"),
    ("num_records", 2 * 10**9, r"num_records=2000000000"),
    ("latent_shape", [4, 10**6, 10**6], r"latent_shape=\[4, 1000000, 1000000\]"),
    ("n_max", 100, r"n_max=100: expected an integer in \[1, k \+ 1"),
])
def test_meta_fields_are_checked(local_shards, key, value, needle):
    """Fails before the fix: build_id went unchecked into the cache path, and counts sized allocations."""
    root, meta = local_shards
    with pytest.raises(ShardSetError, match=needle):
        validate_meta({**meta, key: value}, str(root))


def test_local_set_with_a_pickle_column_fails_in_check_dataset(local_shards, tmp_path):
    """check_dataset (called by build_loaders and by the launcher) runs the validation on local roots."""
    root = _tamper(local_shards[0], tmp_path / "set", "plain", lambda s: s["column_encodings"].__setitem__(0, "pkl"))
    with pytest.raises(ShardSetError, match=r"plain/index\.json: shards\[0\]: columns"):
        check_dataset(str(root))


def _copy_prefix(client, bucket: str, src: str, dst: str) -> None:
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=src + "/")["Contents"]:
        client.copy_object(Bucket=bucket, Key=dst + obj["Key"][len(src):],
                           CopySource={"Bucket": bucket, "Key": obj["Key"]})


def test_traversal_shard_set_on_s3_is_refused_before_anything_is_written(s3_shards, tmp_path):
    """Fails before the fix: build_loaders accepted the set, and streaming joins a planted name to its cache folder
    (with a local remote that wrote <cache>/../victim/escaped.mds); now nothing under or beside the cache is made."""
    import os

    import boto3

    from gd.data import storage

    root, meta = s3_shards
    client = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    bucket, prefix = storage.split_s3(root)
    evil = prefix.rsplit("/", 1)[0] + "/evil"
    _copy_prefix(client, bucket, prefix, evil)
    index = json.loads(client.get_object(Bucket=bucket, Key=f"{evil}/group/index.json")["Body"].read())
    good = index["shards"][0]["zip_data"]["basename"]
    index["shards"][0]["zip_data"]["basename"] = "../../../victim/escaped.mds.zstd"
    client.put_object(Bucket=bucket, Key=f"{evil}/group/index.json", Body=json.dumps(index).encode())
    shard = client.get_object(Bucket=bucket, Key=f"{evil}/group/{good}")["Body"].read()
    for key in (f"{evil}/group/../../../victim/escaped.mds.zstd", "victim/escaped.mds.zstd"):
        client.put_object(Bucket=bucket, Key=key, Body=shard)  # so a download of the planted name would succeed

    cache = tmp_path / "cache"
    data = {"root": f"s3://{bucket}/{evil}", "cache": str(cache), "shuffle": False, "num_workers": 0}
    with pytest.raises(ShardSetError, match=r"zip_data\.basename='\.\./\.\./\.\./victim/escaped\.mds\.zstd'"):
        plain, group = build_loaders(data, group_size=2, micro_batch=4, seed=0, rank=0, world_size=1)
        next(iter(group))
    assert not (tmp_path / "victim").exists(), "a shard was written outside data.cache"
    assert not cache.exists(), "the cache was touched before the shard set was validated"


def test_shared_cache_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    """Fails before the fix: data.cache defaulted to /tmp/gd-cache/<run>, which any local user could create first and
    fill with an index.json that streaming trusts."""
    import os

    from gd.data.validate_shards import cached_stream

    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    cache = tmp_path / "gd-cache"
    cache.mkdir()
    os.chown(cache, 65534, 65534)
    meta = {"version": 1, "build_id": "0123456789abcdef", "latent_shape": [1, 8, 8], "k": 4, "n_max": 4,
            "flip": False, "num_records": 1}
    with pytest.raises(UntrustedPathError, match=rf"{cache} \(above .*\) is owned by .*uid 65534"):
        cached_stream(str(cache), "s3://unused/x", "plain", meta)
