"""End to end: folder tree -> shards on the moto S3 endpoint -> 2 real reader processes; fail-fast errors."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gd.data.encoders import build_encoder
from gd.data.loader import build_loaders, check_dataset
from gd.data.sources import ImageFolderSource
from tests.data.conftest import BUILD_KW, NUM_FASHION, PLANTED

REPO = Path(__file__).resolve().parents[2]


def test_meta_lists_skipped_files_and_stats(s3_shards):
    _, meta = s3_shards
    n_skip = sum(v == "skip" for v in PLANTED.values())
    assert meta["num_records"] == NUM_FASHION + len(PLANTED) - n_skip
    st = meta["stats"]
    assert st["num_skipped"] == n_skip
    assert sorted(Path(s["error"].split(":")[0]).name for s in st["skipped"]) == sorted(
        k for k, v in PLANTED.items() if v == "skip")
    assert sum(st["neighbour_count_hist"]) == meta["num_records"] and 0 < st["fallback_rate"] < 1
    assert meta["latent_shape"] == [3, 28, 28] and meta["num_classes"] == 10 and meta["k"] == BUILD_KW["k"]
    assert st["bytes_per_image_plain"] > 0 and st["bytes_per_image_group"] > st["bytes_per_image_plain"]
    assert "testing" not in str(meta)                      # no credential leaks into meta.json


def test_two_ranks_read_every_record_once_with_valid_groups(s3_shards, image_tree, tmp_path):
    root, meta = s3_shards
    procs = []
    with socket.socket() as s:                  # streaming rendezvous over torch.distributed on this port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.data.read_worker", root, str(tmp_path / "cache"),
                                       str(tmp_path / f"rank{rank}.npz"), "4"], env=env, cwd=REPO,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    out = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]

    src = ImageFolderSource(image_tree, 28)
    enc = build_encoder("pixels", channels=3)
    n = meta["num_records"]
    for prefix in ("plain", "group"):
        ids = [o[f"{prefix}_id"] if prefix == "plain" else o["group_id"][:, 0] for o in out]
        assert not set(ids[0].tolist()) & set(ids[1].tolist())          # distinct data per rank
        assert len(ids[0]) + len(ids[1]) == n and len(set(np.concatenate(ids).tolist())) == n
        assert abs(len(ids[0]) - len(ids[1])) <= 8

    lat = np.concatenate([o["plain_latent"] for o in out])
    ids = np.concatenate([o["plain_id"] for o in out])
    labels = np.concatenate([o["plain_label"] for o in out])
    decoded = enc.decode(__import__("torch").from_numpy(lat)).numpy()
    for j, i in enumerate(ids):
        img, label, _ = src.read(int(i))
        np.testing.assert_array_equal(decoded[j], img)
        assert labels[j] == label

    g = {k: np.concatenate([o[f"group_{k}"] for o in out]) for k in ("latent", "label", "id", "sim", "fallback")}
    assert g["latent"].shape == (n, 4, 3, 28, 28)
    by_id = {int(i): j for j, i in enumerate(ids)}
    for gi in range(n):
        members = g["id"][gi]
        assert len(set(members.tolist())) == 4                          # anchor + 3 distinct candidates
        for m in range(4):
            np.testing.assert_array_equal(g["latent"][gi, m], lat[by_id[int(members[m])]])
            assert g["label"][gi, m] == labels[by_id[int(members[m])]]
        if not g["fallback"][gi]:
            assert (g["sim"][gi, 1:] >= BUILD_KW["tau"]).all()
    assert 0 < g["fallback"].mean() < 1


def test_missing_bucket_fails_fast(s3_endpoint):
    with pytest.raises(ConnectionError, match="bucket 'no-such-bucket' does not exist"):
        check_dataset("s3://no-such-bucket/x")


def test_missing_shards_fail_fast(s3_bucket):
    with pytest.raises(FileNotFoundError, match="tools/build_shards.py"):
        build_loaders({"root": f"s3://{s3_bucket}/nothing", "cache": "/tmp/unused"}, group_size=4, micro_batch=8,
                      seed=0, rank=0, world_size=1)


def test_wrong_endpoint_fails_fast(s3_shards, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectionError, match="cannot reach the S3 endpoint"):
        check_dataset(s3_shards[0])


def test_group_size_larger_than_shards_allow(local_shards):
    with pytest.raises(ValueError, match="n_max"):
        build_loaders({"root": str(local_shards[0])}, group_size=8, micro_batch=16, seed=0, rank=0, world_size=1)


def test_build_to_missing_bucket_fails_before_any_work(s3_endpoint, tmp_path):
    from gd.data.build import BuildConfig, Builder
    with pytest.raises(ConnectionError, match="bucket 'absent-bucket' does not exist"):
        Builder(BuildConfig(out="s3://absent-bucket/x", work_dir=str(tmp_path / "w"), limit=10, progress=False))
    assert not (tmp_path / "w").exists()
