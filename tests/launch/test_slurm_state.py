"""slurm/start.sh and stop.sh run as root: they refuse state dirs other users could have prepared, and signal only
their own daemons. None of these tests starts a cluster (every refusal comes before any daemon starts)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="start.sh and stop.sh run as root")
NOBODY = 65534


def _script(name: str, state: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    # Ports nobody listens on, in case a regression lets the script go on to start daemons.
    env = {**os.environ, "GD_SLURM_CTLD_PORT": "1", "GD_SLURM_SLURMD_PORT": "2"}
    return subprocess.run(["bash", str(REPO / "slurm" / name), str(state)], env=env, capture_output=True, text=True,
                          timeout=60, check=False, cwd=tmp_path)


@pytest.fixture
def stop_after(tmp_path):
    """Stops whatever a (regressed) start.sh brought up in the given dirs, with the repo's stop.sh."""
    dirs: list[Path] = []
    yield dirs
    for d in dirs:
        subprocess.run(["bash", str(REPO / "slurm" / "stop.sh"), str(d)], capture_output=True, timeout=60, check=False)


def test_start_refuses_a_state_dir_another_user_made_first(tmp_path, stop_after):
    """Fails before the fix: start.sh trusted an existing /tmp/gd-slurm whoever made it, so its owner could swap
    slurm.conf (a root Prolog) or plant pid files."""
    state = tmp_path / "gd-slurm"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    stop_after.append(state)
    out = _script("start.sh", state, tmp_path)
    assert out.returncode != 0 and f"state dir {state} is owned by uid {NOBODY}, not root" in out.stderr
    assert list(state.iterdir()) == []


def test_start_refuses_a_symlinked_state_dir(tmp_path, stop_after):
    """Fails before the fix: a symlink at the state path was followed (its owner chooses the target)."""
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "gd-slurm"
    link.symlink_to(target)
    stop_after.append(target)
    out = _script("start.sh", link, tmp_path)
    assert out.returncode != 0 and f"state dir {link} is a symbolic link" in out.stderr
    assert list(target.iterdir()) == []


def test_start_refuses_a_world_writable_state_dir(tmp_path, stop_after):
    """Fails before the fix: any local user could write into a 0777 state dir (replace slurm.conf.tmp by a symlink
    that root's `>` then follows)."""
    state = tmp_path / "gd-slurm"
    state.mkdir()
    os.chmod(state, 0o777)
    stop_after.append(state)
    out = _script("start.sh", state, tmp_path)
    assert out.returncode != 0 and "is writable by its group or others (mode 777)" in out.stderr
    assert list(state.iterdir()) == []


def test_start_refuses_a_state_dir_below_another_users_folder(tmp_path, stop_after):
    """Fails before the fix: /tmp/gd-slurm made by another user could later be renamed away and replaced by theirs."""
    parent = tmp_path / "theirs"
    parent.mkdir()
    os.chown(parent, NOBODY, NOBODY)
    stop_after.append(parent / "gd-slurm")
    out = _script("start.sh", parent / "gd-slurm", tmp_path)
    assert out.returncode != 0 and f"{parent} (above the state dir) is owned by uid {NOBODY}" in out.stderr
    assert not (parent / "gd-slurm").exists()


def test_default_state_dir_is_outside_tmp():
    """Fails before the fix: the default was /tmp/gd-slurm, a name any local user can take first."""
    out = subprocess.run(["bash", "-c", f". {REPO / 'slurm' / 'state_dir.sh'}; echo $GD_SLURM_DEFAULT_DIR"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "/var/lib/gd-slurm"


def test_stop_signals_only_this_clusters_daemons(tmp_path):
    """Fails before the fix: stop.sh killed whatever pid its pid files named (a planted file kills any process)."""
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    os.chmod(state, 0o700)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for daemon in ("slurmd", "slurmctld"):
            (state / "run" / f"{daemon}.pid").write_text(f"{victim.pid}\n")
        out = _script("stop.sh", state, tmp_path)
        assert out.returncode == 0, out.stderr
        assert victim.poll() is None, "stop.sh killed a process that is not its daemon"
        assert "names no slurmd of this cluster" in out.stderr
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()


def _two_nodes(name: str, state: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GD_SLURM_NODES": "2", "GD_SLURM_CTLD_PORT": "1", "GD_SLURM_SLURMD_PORTS": "2 3", **env}
    return subprocess.run(["bash", str(REPO / "slurm" / name), str(state)], env=env, capture_output=True, text=True,
                          timeout=60, check=False, cwd=tmp_path)


def test_two_nodes_refuse_a_state_dir_under_tmp(tmp_path, stop_after):
    """Fails without the check: each node mounts its own /tmp over the machine's, so slurmd would write its pid and
    log files where start.sh (and stop.sh) never see them, and the daemons could not be told apart from others."""
    state = tmp_path / "gd-slurm"
    stop_after.append(state)
    out = _two_nodes("start.sh", state, tmp_path)
    assert out.returncode != 0 and f"state dir {state} is under /tmp or /dev/shm" in out.stderr
    assert not state.exists(), "the state dir was created before the refusal"


def test_two_nodes_refuse_node_names_that_do_not_resolve(tmp_path, stop_after):
    """Fails without the check: the first node's name is every rank's MASTER_ADDR; one that does not resolve left
    rank 1 retrying the rendezvous for 10 minutes (seen on this machine)."""
    state = Path("/var/tmp") / f"gd-test-names-{os.getpid()}"
    stop_after.append(state)
    out = _two_nodes("start.sh", state, tmp_path, GD_SLURM_NODE_NAMES="gd-no-such-node-1 gd-no-such-node-2")
    assert out.returncode != 0 and "node name 'gd-no-such-node-1' does not resolve" in out.stderr
    assert not state.exists()


def test_two_nodes_stop_signals_only_this_clusters_daemons(tmp_path):
    """Fails if stop.sh trusted the per-node pid files (slurmd-<node>.pid) of the two-node layout: a planted one would
    let it kill any process."""
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    os.chmod(state, 0o700)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for name in ("slurmd-vm.pid", "slurmd-other.pid", "slurmctld.pid"):
            (state / "run" / name).write_text(f"{victim.pid}\n")
        out = _two_nodes("stop.sh", state, tmp_path)
        assert out.returncode == 0, out.stderr
        assert victim.poll() is None, "stop.sh killed a process that is not its daemon"
        assert out.stderr.count("names no slurmd of this cluster") == 2
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
