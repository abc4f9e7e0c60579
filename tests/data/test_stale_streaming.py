"""Shared memory that killed ranks leave behind (gd.data.loader.clean_stale_streaming), with real streaming in a
private /dev/shm (a mount namespace of its own), so other processes on this machine neither disturb nor see it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                                  reason="a private /dev/shm needs root and unshare")]


@pytest.mark.long
def test_requeue_after_a_kill_starts_only_after_cleaning(local_shards, tmp_path):
    """Fails before the fix: a rank killed with its helpers (a scancel, the OOM killer) leaves streaming's
    `NNNNNN_locals` registry in /dev/shm. A requeued attempt whose file locks live elsewhere (a per-job TMPDIR, as
    many sites set) then walks into that registry and refuses to start ("Reused local directory"). Cleaning this
    cache's entries lets it start, and leaves another cache's live registry alone."""
    root = str(local_shards[0])
    cache, other = tmp_path / "cache", tmp_path / "other-cache"
    tmp_a, tmp_b = tmp_path / "tmp-a", tmp_path / "tmp-b"
    tmp_a.mkdir()
    tmp_b.mkdir()
    worker = f"{sys.executable} -m tests.data.stale_shm_worker {root}"
    script = "\n".join([
        "mount -t tmpfs -o mode=1777 tmpfs /dev/shm",
        f"TMPDIR={tmp_a} setsid -w {worker} {other} die",
        f"TMPDIR={tmp_a} setsid -w {worker} {cache} die",
        f"{worker} {cache} list",
        f"TMPDIR={tmp_b} {worker} {cache} start",
        f"TMPDIR={tmp_b} {worker} {cache} clean",
        "echo '-- after cleaning:'",
        f"{worker} {cache} list",
    ])
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    lines = out.stdout.splitlines()
    shown = out.stdout + out.stderr[-3000:]
    split = lines.index("-- after cleaning:")
    before, after = lines[:split], lines[split:]
    assert sum(line.startswith("registered") and str(cache) in line for line in before) == 2, shown
    assert any("Reused local directory" in line for line in before), shown
    assert any(line.startswith("removed ") and int(line.split()[1]) > 0 for line in before), shown
    assert before[-1] == "started", shown
    assert not any(str(cache) in line for line in after if line.startswith("registered")), shown
    assert sum(str(other) in line for line in after if line.startswith("registered")) == 2, shown


def _private_shm(script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``script`` (sh) with a fresh tmpfs on /dev/shm of its own."""
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           "mount -t tmpfs -o mode=1777 tmpfs /dev/shm\n" + script], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=timeout)


def test_jobs_starting_at_once_on_one_node_register_under_different_prefixes(local_shards, tmp_path):
    """Fails before the fix: streaming finds the first free prefix, then creates its `NNNNNN_locals`; two jobs
    whose loaders start at the same moment on one node (the method benchmark's parallel runs, two SLURM jobs on a
    shared node) find the same prefix and one dies with `FileExistsError: '/NNNNNN_locals'`. Six workers released
    together must all start."""
    root, go = str(local_shards[0]), tmp_path / "go"
    workers = 6
    starts = "\n".join(f"GD_TEST_GO={go} {sys.executable} -m tests.data.stale_shm_worker {root} "
                       f"{tmp_path / f'cache{i}'} start > {tmp_path / f'out{i}'} 2>&1 &" for i in range(workers))
    ready = f"until [ $(ls {tmp_path} | grep -c '^go.ready') -ge {workers} ]; do sleep 0.1; done"
    out = _private_shm(f"{starts}\n{ready}\ntouch {go}\nwait")
    shown = out.stdout + out.stderr[-3000:]
    results = [(tmp_path / f"out{i}").read_text() for i in range(workers)]
    assert all(r.strip().splitlines()[-1:] == ["started"] for r in results), "\n---\n".join(results) + shown
