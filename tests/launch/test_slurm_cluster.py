"""slurm/start.sh: the session cluster is up with this machine's CPUs, and starting it again changes nothing; the
two-node cluster gives each node its own /tmp and /dev/shm."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.fixtures.slurm import REPO, SlurmCluster

pytestmark = pytest.mark.slurm


def test_node_is_up_with_this_machines_cpus(slurm_cluster: SlurmCluster) -> None:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t %c"], env=slurm_cluster.env(), capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == "localhost" and not out[1].startswith(("down", "drain", "fail")), out
    assert int(out[2]) == os.cpu_count()


def test_start_is_idempotent(slurm_cluster: SlurmCluster) -> None:
    pid = (slurm_cluster.state / "run" / "slurmctld.pid").read_text()
    again = subprocess.run([str(REPO / "slurm" / "start.sh"), str(slurm_cluster.state)], env=slurm_cluster.env(),
                           capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout
    assert (slurm_cluster.state / "run" / "slurmctld.pid").read_text() == pid
    srun = subprocess.run(["srun", "-n1", "echo", "ok"], env=slurm_cluster.env(), capture_output=True, text=True,
                          timeout=60, check=True)
    assert srun.stdout.strip() == "ok"


@pytest.mark.long
def test_two_nodes_each_have_their_own_tmp_and_shm(slurm_two_nodes: SlurmCluster) -> None:
    """What makes the two-node tests mean something: one task per node, and a file one node's task writes into /tmp
    or /dev/shm is not there for the other's (nor for this machine); yet the folders that stand for a shared
    filesystem stay shared under /tmp too, and each node runs the checkout's Python. Fails before the fix where
    they lie under /tmp (a clone there, as CI may make: exit 127, the venv's python not found on the nodes): the
    nodes' fresh /tmp hid them."""
    tag = f"gd-node-{uuid.uuid4().hex[:8]}"  # a node's private /tmp outlives a test session: names of this test only
    shared = slurm_two_nodes.shared
    assert shared is not None and str(shared).startswith("/tmp/")
    script = (f"touch /tmp/{tag}-$SLURM_NODEID /dev/shm/{tag}-$SLURM_NODEID {shared}/{tag}-$SLURM_NODEID; sleep 2; "
              f"echo $SLURM_NODEID $SLURMD_NODENAME $(ls /tmp /dev/shm | grep -c {tag}) "
              f"$(ls {shared} | grep -c {tag}) $({sys.executable} -c 'import gd; print(gd.__file__)'); "
              f"rm -f /tmp/{tag}-$SLURM_NODEID /dev/shm/{tag}-$SLURM_NODEID")
    out = subprocess.run(["srun", "-N2", "-n2", "bash", "-c", script], env=slurm_two_nodes.env(PYTHONPATH=str(REPO)),
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    rows = sorted(line.split() for line in out)
    assert [r[0] for r in rows] == ["0", "1"] and sorted(r[1] for r in rows) == list(slurm_two_nodes.nodes), out
    assert [r[2] for r in rows] == ["2", "2"], f"a node sees the other node's files: {out}"
    assert [r[3] for r in rows] == ["2", "2"], f"a node does not see the shared folder {shared}: {out}"
    assert [r[4:] for r in rows] == [[str(REPO / "gd" / "__init__.py")]] * 2, f"the checkout's python: {out}"
    assert not list(Path("/tmp").glob(f"{tag}-*")) and not list(Path("/dev/shm").glob(f"{tag}-*"))
    assert sorted(p.name for p in shared.glob(f"{tag}-*")) == [f"{tag}-0", f"{tag}-1"]
