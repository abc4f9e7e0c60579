"""gd.train.nodes with two real gloo processes, each acting as a node of its own (SLURMD_NODENAME) and each in a
mount namespace of its own, so a folder can be shared by both or private to each, as on separate machines."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="private mounts per process need root and unshare")


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    base = tmp_path_factory.mktemp("nodes")
    shared, local = base / "shared", base / "local"
    shared.mkdir()
    local.mkdir()
    procs = []
    for rank, node in enumerate(("node-a", "node-b")):
        script = f'mount -t tmpfs tmpfs "{local}" && exec "{sys.executable}" -m tests.train.nodes_worker {rank} ' \
                 f'"{shared}" "{local}"'
        env = {**os.environ, "PYTHONPATH": str(REPO), "SLURMD_NODENAME": node, "LOCAL_RANK": "0"}
        procs.append(subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_nodes_are_told_apart_by_name(reports) -> None:
    assert [r["names"] for r in reports] == [["node-a", "node-b"]] * 2


def test_a_shared_folder_passes_as_shared_and_is_refused_as_node_local(reports) -> None:
    """Fails if the probe could not see another node's file (every shared run dir refused) or if a cache both nodes
    write (the two-node crash this guards against) passed as node-local."""
    for r in reports:
        assert r["shared_is_shared"] is None
        msg = r["shared_is_node_local"]
        assert msg and "data.cache=" in msg and "must be node-local" in msg
        assert "shared by node node-a (rank 0), node node-b (rank 1)" in msg and msg.endswith("FIX")


def test_a_node_local_folder_is_refused_as_the_run_dir(reports) -> None:
    """Fails before the fix: a run dir on node-local disk went unnoticed, node 0 resumed and node 1 started fresh."""
    for r in reports:
        assert r["local_is_node_local"] is None
        msg = r["local_is_shared"]
        assert msg and "is not one folder shared by the job's 2 nodes" in msg
        assert "node node-a (rank 0) does not see what node-b wrote there" in msg
        assert "node node-b (rank 1) does not see what node-a wrote there" in msg


def test_a_run_dir_missing_on_one_node_is_refused_on_every_rank(reports) -> None:
    """Fails if one rank raised alone (the other would wait in a barrier until the collective timeout)."""
    for r in reports:
        msg = r["missing_is_shared"]
        assert msg and "node node-b (rank 1) cannot use it" in msg and "does not exist on this node" in msg


def test_ranks_that_disagree_are_refused_naming_the_nodes(reports) -> None:
    """Fails before the fix: each rank read checkpoints/latest on its own and resumed (or not) alone."""
    for r in reports:
        assert r["same_value"] is None
        msg = r["different_values"]
        assert msg.startswith("the ranks disagree on the checkpoint: ")
        assert "'step_00000040' on node-a (rank 0)" in msg and "None on node-b (rank 1)" in msg
