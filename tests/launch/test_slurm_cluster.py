"""slurm/start.sh: the session cluster is up with this machine's CPUs, and starting it again changes nothing."""
from __future__ import annotations

import os
import subprocess

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
