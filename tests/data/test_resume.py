"""Resumability: a build killed mid-stage (SIGKILL) and re-run gives the same shards; a loader stopped mid-epoch
and restored from its state_dict yields exactly the remaining samples (and the same groups)."""
import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gd.data.build import Builder, config_from_dict
from gd.data.loader import build_loaders
from tests.fixtures.shm import clean_streaming_shm

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = ["limit=240", "chunk_size=40", "progress=false", "k=6", "tau=0.9"]


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "meta.json"}


def _run_until(args: list[str], marker: Path, timeout: float = 120) -> None:
    """Start the CLI build and SIGKILL it as soon as `marker` appears (mid-stage: the delay keeps chunks slow)."""
    proc = subprocess.Popen([sys.executable, "tools/build_shards.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"build finished before {marker.name} could be interrupted: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "build too slow"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _build_in_process(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("build_shards", overrides=overrides)
    return Builder(config_from_dict(OmegaConf.to_container(cfg, resolve=True))).run()


def test_killed_build_resumes_to_identical_shards(tmp_path):
    _build_in_process([*OVERRIDES, f"out={tmp_path / 'ref'}", f"work_dir={tmp_path / 'ref_work'}"])

    out, work = tmp_path / "out", tmp_path / "work"
    args = [*OVERRIDES, f"out={out}", f"work_dir={work}"]
    _run_until([*args, "chunk_delay_s=0.25"], work / "encode" / "chunk-00002.done")
    assert not (work / "encode" / "chunk-00005.done").exists()
    _run_until([*args, "chunk_delay_s=0.1"], work / "write" / "chunk-00002.json")
    assert not (out / "meta.json").exists() and not (work / "write" / "chunk-00005.json").exists()
    _build_in_process(args)                                  # the third run completes what is left

    ref_hashes, hashes = _tree_hashes(tmp_path / "ref"), _tree_hashes(out)
    assert len(ref_hashes) > 4 and hashes == ref_hashes
    meta, ref_meta = (json.loads((d / "meta.json").read_text()) for d in (out, tmp_path / "ref"))
    meta.pop("build_id"), ref_meta.pop("build_id")
    assert meta == ref_meta and meta["num_records"] == 240


def test_changed_settings_in_same_work_dir_are_refused(tmp_path):
    common = ["limit=40", "progress=false", f"out={tmp_path}/o", f"work_dir={tmp_path}/w"]
    _build_in_process([*common, "stages=[read]"])
    with pytest.raises(ValueError, match="image_size"):
        _build_in_process([*common, "image_size=32"])


def _epoch(loaders, stop_after=None, state=None):
    """Iterate (plain, group) loaders; returns id batches and, if stopped early, their state dicts."""
    out, states = [], []
    for loader, st, n in zip(loaders, state or (None, None), stop_after or (None, None)):
        if st is not None:
            loader.load_state_dict(st)
        batches = []
        for i, b in enumerate(loader):
            batches.append(b["id"])
            if n is not None and i + 1 == n:
                break
        out.append(batches)
        states.append(loader.state_dict())
    return out, states


def test_loader_resumes_mid_epoch_exactly(local_shards, tmp_path):
    root, meta = local_shards
    cfg = {"root": str(root), "cache": str(tmp_path / "cache"), "shuffle": True, "num_workers": 0, "drop_last": False}

    def make():
        clean_streaming_shm(root)
        return build_loaders(cfg, group_size=4, micro_batch=8, seed=5, rank=0, world_size=1)

    def release(loaders):
        del loaders[:]
        gc.collect()

    loaders = list(make())
    (ref_plain, ref_group), _ = _epoch(loaders)
    release(loaders)
    loaders = list(make())
    (head_plain, head_group), states = _epoch(loaders, stop_after=(5, 3))
    release(loaders)
    loaders = list(make())
    (tail_plain, tail_group), _ = _epoch(loaders, state=states)
    release(loaders)

    n = meta["num_records"]
    full_plain = torch.cat(head_plain + tail_plain)
    assert len(head_plain) == 5 and torch.equal(full_plain, torch.cat(ref_plain))
    assert sorted(full_plain.tolist()) == sorted(set(full_plain.tolist())) and len(full_plain) == n
    assert len(head_group) == 3 and torch.equal(torch.cat(head_group + tail_group), torch.cat(ref_group))


def test_build_split_over_ranks_equals_single_build(tmp_path):
    common = ["limit=120", "chunk_size=25", "progress=false"]
    _build_in_process([*common, f"out={tmp_path}/single", f"work_dir={tmp_path}/w1"])
    split = [*common, f"out={tmp_path}/split", f"work_dir={tmp_path}/w2"]
    _build_in_process([*split, "rank=0", "world=2", "stages=[read,encode,embed]"])
    with pytest.raises(RuntimeError, match=r"missing 2 of 5 \(1, 3\)"):
        _build_in_process([*split, "rank=0", "world=2", "wait_timeout_s=0"])
    _build_in_process([*split, "rank=1", "world=2", "stages=[read,encode,embed]"])
    _build_in_process([*split, "rank=0", "world=2", "stages=[retrieve]"])
    assert _build_in_process([*split, "rank=1", "world=2", "stages=[retrieve,write]"]) is None   # rank 0 unwritten
    meta = _build_in_process([*split, "rank=0", "world=2", "stages=[write]"])                   # last one finalizes
    assert meta["num_records"] == 120
    assert _tree_hashes(tmp_path / "split") == _tree_hashes(tmp_path / "single")


def test_the_index_is_built_once_by_rank_0(tmp_path):
    """Fails before the fix: every rank loaded all embeddings and trained its own index (~15 GB and an IVF training
    per rank at ImageNet scale). Now rank 1 waits for rank 0's index and maps it, never building one itself."""
    args = ["limit=120", "chunk_size=25", "progress=false", f"out={tmp_path}/out", f"work_dir={tmp_path}/w", "world=2"]
    for rank in (0, 1):
        _build_in_process([*args, f"rank={rank}", "stages=[read,encode,embed]"])
    index = tmp_path / "w" / "retrieve" / "index.faiss"
    with pytest.raises(RuntimeError, match=r"rank 1: .*index.faiss does not exist: rank 0 builds the retrieval index"):
        _build_in_process([*args, "rank=1", "stages=[retrieve]", "wait_timeout_s=0"])
    assert not index.exists()
    _build_in_process([*args, "rank=0", "stages=[retrieve]"])
    built = index.stat().st_mtime_ns
    _build_in_process([*args, "rank=1", "stages=[retrieve]"])
    assert index.stat().st_mtime_ns == built
    assert all((tmp_path / "w" / "retrieve" / f"chunk-{c:05d}.done").exists() for c in range(5))


def test_estimate_first_and_ranks_wait_for_each_other_by_default(tmp_path, capsys):
    """Fails before the fix: wait_timeout_s defaulted to 0, so under srun a rank that reached retrieve before the
    others had embedded their chunks crashed at once; and nothing said what retrieval would cost before it ran."""
    def builder(*extra: str) -> Builder:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("build_shards", overrides=["limit=120", f"out={tmp_path}/o", f"work_dir={tmp_path}/w",
                                                     *extra])
        return Builder(config_from_dict(OmegaConf.to_container(cfg, resolve=True)))

    assert builder("rank=1", "world=4").wait_timeout_s == 6 * 3600
    assert builder().wait_timeout_s == 0
    assert builder("rank=1", "world=4", "wait_timeout_s=60").wait_timeout_s == 60
    out = capsys.readouterr().out
    assert "build: 120 images over 1 rank(s); retrieve: flat: one faiss flat index of 120 x 64" in out
    assert "GFLOP/s measured here" in out


def test_groups_do_not_depend_on_worker_count(local_shards, tmp_path):
    """Draws are keyed by (seed, epoch, sample id), so DataLoader workers see the epoch and draw the same groups."""
    root, _ = local_shards
    groups = []
    for workers in (0, 2):
        clean_streaming_shm(root)
        cfg = {"root": str(root), "cache": str(tmp_path / f"cache{workers}"), "shuffle": True, "num_workers": workers,
               "drop_last": False}
        _, group = build_loaders(cfg, group_size=4, micro_batch=16, seed=9, rank=0, world_size=1)
        ids = torch.cat([b["id"] for b in group])
        groups.append({int(g[0]): g.tolist() for g in ids})
        if workers == 0:                                     # a new epoch draws new partners for some anchors
            nxt = {int(g[0]): g.tolist() for g in torch.cat([b["id"] for b in group])}
            assert nxt.keys() == groups[0].keys() and nxt != groups[0]
        del group
        gc.collect()
    assert groups[0] == groups[1] and len(groups[0]) == local_shards[1]["num_records"]


def test_loader_resumes_exactly_with_production_settings(s3_shards, tmp_path):
    """The production path: shards on S3 (moto), a local cache limited to about 4 shards (streaming's minimum: shards
    are evicted during the epoch), 2 DataLoader workers. Stopped
    mid-epoch and resumed from the state dicts, both streams continue with exactly the ids an uninterrupted epoch
    gives (no repeats, none lost). Catches worker-count or cache-eviction effects on the resume position that the
    local, worker-less test cannot see."""
    root, meta = s3_shards
    cfg = {"root": root, "cache": str(tmp_path / "cache"), "cache_limit": 9_000_000, "shuffle": True, "num_workers": 2,
           "drop_last": False}

    def run(stop_after=None, state=None):
        clean_streaming_shm(tmp_path)
        loaders = list(build_loaders(cfg, group_size=4, micro_batch=8, seed=3, rank=0, world_size=1))
        out = _epoch(loaders, stop_after=stop_after, state=state)
        del loaders[:]
        gc.collect()
        return out

    (ref_plain, ref_group), _ = run()
    (head_plain, head_group), states = run(stop_after=(7, 4))
    (tail_plain, tail_group), _ = run(state=states)
    full = torch.cat(head_plain + tail_plain)
    assert len(head_plain) == 7 and torch.equal(full, torch.cat(ref_plain))
    assert len(full) == meta["num_records"] and len(set(full.tolist())) == len(full)
    assert len(head_group) == 4 and torch.equal(torch.cat(head_group + tail_group), torch.cat(ref_group))
