"""Two nodes of a real SLURM on this machine (`slurm_two_nodes`: each slurmd in a mount namespace of its own, so each
node has its own /tmp and /dev/shm), one CPU rank per node, the tiny demo through `python -m gd.launch`.

Run dirs and shards are in a folder both nodes see (outside /tmp); the shard cache is the default, node-local one.
An uninterrupted run is the reference; a run whose first attempt finds its rendezvous port taken and which is then
preempted with USR2 must end with exactly its weights, and so must a run whose rank 1 was killed and which was
relaunched. A frozen rank must end the job; a run dir only one node sees is refused.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gd.launch.job import rendezvous_port
from tests.fixtures.slurm import SHARED_TMP, SlurmCluster
from tests.launch.conftest import DEMO_MECHANICS, REPO, final_state, job_logs, metric_steps
from tests.train.faults import callbacks

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.long]

STEPS = 12
TWO_NODES = ["+cluster=slurm", "cluster.nodes=2", "cluster.tasks_per_node=1", "cluster.gpus_per_node=0",
             "cluster.cpus_per_task=1", "cluster.timeout_min=60", "launcher.wait=true"]


@pytest.fixture(scope="module")
def shared(tiny_shards: Path) -> Iterator[Path]:
    """A folder both nodes see, holding the shards and the runs."""
    root = Path(tempfile.mkdtemp(prefix="gd-multinode-", dir=SHARED_TMP))
    os.chmod(root, 0o755)
    shutil.copytree(tiny_shards, root / "shards")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def tiny(root: Path, name: str, *extra: str) -> list[str]:
    """The demo shrunk for CPU tests (8 micro-batches per step and rank), in run `name` under `root`."""
    return [*TWO_NODES, "+exp=demo", f"run.root={root}/runs", f"run.name={name}", f"data.root={root}/shards",
            *DEMO_MECHANICS,
            "model.input_size=16", "train.global_batch=64", "train.micro_batch=4", f"train.steps={STEPS}",
            "train.log_every=1", "train.ckpt_every=1000", "train.progress=false", *extra]


def job_id(run_dir: Path) -> str:
    return json.loads((run_dir / "launches.jsonl").read_text().splitlines()[-1])["job_id"]


def launch(cluster: SlurmCluster, args: list[str], run_dir: Path,
           during: Callable[[subprocess.Popen], None] | None = None, timeout: float = 420) -> dict[str, Any]:
    """`python -m gd.launch args`, calling `during(launcher)` while it runs; waits for the launcher and then for the
    job to leave the queue. Returns its exit code, output and `scontrol show job`."""
    env = cluster.env(PYTHONPATH=str(REPO))
    out_path, err_path = run_dir.parent / f"{run_dir.name}.out", run_dir.parent / f"{run_dir.name}.err"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as out, open(err_path, "w") as err:
        launcher = subprocess.Popen([sys.executable, "-m", "gd.launch", *args], cwd=run_dir.parent, env=env,
                                    stdout=out, stderr=err, text=True)
        try:
            if during is not None:
                during(launcher)
            launcher.wait(timeout=timeout)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    deadline = time.monotonic() + 240  # a failed rank's job ends within seconds (see the frozen-rank test)
    while cluster.squeue() and time.monotonic() < deadline:
        time.sleep(0.5)
    jid = job_id(run_dir)
    show = subprocess.run(["scontrol", "show", "job", jid], env=env, capture_output=True, text=True).stdout
    return {"returncode": launcher.returncode, "stdout": out_path.read_text(), "stderr": err_path.read_text(),
            "job_id": jid, "scontrol": show, "queue": cluster.squeue()}


def wait_for_steps(run_dir: Path, launcher: subprocess.Popen, steps: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(metric_steps(run_dir)) < steps:
        assert launcher.poll() is None, f"the launcher ended before step {steps}"
        assert time.monotonic() < deadline, f"the job did not reach step {steps} in {timeout} s"
        time.sleep(0.1)


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    got, want = final_state(run_dir), final_state(reference)
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(shared: Path, slurm_two_nodes: SlurmCluster) -> dict[str, Any]:
    run_dir = shared / "runs" / "reference"
    result = launch(slurm_two_nodes, tiny(shared, "reference"), run_dir)
    assert result["returncode"] == 0, result["stderr"][-3000:]
    return {**result, "run_dir": run_dir}


def test_two_nodes_train_to_the_end(reference: dict[str, Any], shared: Path) -> None:
    """One rank on each node; fails before the fix if the shards were decompressed into data.root, a folder both
    nodes share (streaming's `local` was the root itself: both nodes wrote the same .mds files, and a two-node job
    here crashed at its first step)."""
    run_dir = reference["run_dir"]
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    assert (run_dir / "ema.pt").is_file() and reference["queue"] == []
    assert "node=0(2), global_rank=0(2)" in job_logs(run_dir, 0)
    assert "node=1(2), global_rank=1(2)" in job_logs(run_dir, 1)
    assert not list((shared / "shards").rglob("*.mds")), "shards were decompressed inside data.root"


@pytest.fixture(scope="module")
def requeued_twice(shared: Path, slurm_two_nodes: SlurmCluster) -> dict[str, Any]:
    """Submitted held; its first attempt's rendezvous port is taken before it is released; preempted with USR2
    once it has trained three steps."""
    run_dir = shared / "runs" / "requeued"
    env = slurm_two_nodes.env()
    holder = socket.socket()

    def during(launcher: subprocess.Popen) -> None:
        deadline = time.monotonic() + 120
        while not (run_dir / "launches.jsonl").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, "the job was not submitted"
            time.sleep(0.1)
        jid = job_id(run_dir)
        holder.bind(("0.0.0.0", rendezvous_port(jid, "0")))
        holder.listen()
        subprocess.run(["scontrol", "release", jid], env=env, check=True, timeout=30)
        wait_for_steps(run_dir, launcher, 3)
        subprocess.run(["scancel", "--signal=USR2", jid], env=env, check=True, timeout=30)

    try:
        result = launch(slurm_two_nodes, tiny(shared, "requeued", "+cluster.sbatch_extra.hold=true"), run_dir,
                        during)
    finally:
        holder.close()
    return {**result, "run_dir": run_dir, "port": rendezvous_port(result["job_id"], "0")}


def test_a_taken_rendezvous_port_requeues_the_job(requeued_twice: dict[str, Any]) -> None:
    """Fails before the fix: rank 0 could not listen (EADDRINUSE) and the job ended FAILED, not requeued (and its
    ports were in Linux's ephemeral range, where any outgoing connection may hold them)."""
    assert requeued_twice["returncode"] == 0, requeued_twice["stderr"][-3000:]
    assert 20000 <= requeued_twice["port"] < 32768
    logs = job_logs(requeued_twice["run_dir"])
    assert f"rendezvous port {requeued_twice['port']} is taken" in logs, logs[-3000:]


def test_two_node_preemption_resumes_bitwise(requeued_twice: dict[str, Any], reference: dict[str, Any]) -> None:
    """USR2 on both nodes: every rank checkpoints, the job requeues and resumes at the next step on both nodes,
    ending with exactly the uninterrupted run's weights and EMA."""
    run_dir = requeued_twice["run_dir"]
    logs = job_logs(run_dir)
    saved = re.search(r"checkpoint written at step (\d+); requeueing", logs)
    assert saved, logs[-3000:]
    step = int(saved.group(1))
    assert 3 <= step < STEPS
    assert re.search(rf"resumed from .*step_{step:08d} \(step {step}\)", logs), logs[-3000:]
    assert re.search(r"Restarts=2\b", requeued_twice["scontrol"]), requeued_twice["scontrol"]
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    assert_same_weights(run_dir, reference["run_dir"])
    assert requeued_twice["queue"] == []


def test_a_killed_rank_ends_the_job_and_a_relaunch_resumes(shared: Path, slurm_two_nodes: SlurmCluster,
                                                           reference: dict[str, Any]) -> None:
    """Rank 1 and its helpers are SIGKILLed after step 3 (a checkpoint exists at step 2): the job ends FAILED at
    once (srun --kill-on-bad-exit; collectives would wait train.step_timeout_s, 100 s), is not requeued (a failure
    is not a preemption), and relaunching the run name resumes from step 2 to exactly the reference's weights.
    The killed rank left streaming's shared memory on its node; the relaunch removes it there first."""
    run_dir = shared / "runs" / "killed"
    args = tiny(shared, "killed", "train.ckpt_every=2")
    fault = callbacks(SignalSelf={"step": 3, "rank": 1, "signal": "SIGKILL", "group": True})
    killed = launch(slurm_two_nodes, [*args, fault], run_dir)
    assert killed["returncode"] == 1, killed["stdout"][-3000:]
    assert killed["queue"] == [] and re.search(r"JobState=FAILED\b", killed["scontrol"]), killed["scontrol"]
    assert re.search(r"Restarts=0\b", killed["scontrol"])
    assert max(metric_steps(run_dir)) < STEPS

    relaunched = launch(slurm_two_nodes, args, run_dir)
    assert relaunched["returncode"] == 0, relaunched["stderr"][-3000:]
    logs = job_logs(run_dir, "*")
    assert re.search(r"resumed from .*step_00000002 \(step 2\)", logs), logs[-3000:]
    assert re.search(r"node \S+: removed \d+ stale streaming shared-memory entries", logs), logs[-3000:]
    assert set(metric_steps(run_dir)) == set(range(1, STEPS + 1))
    assert_same_weights(run_dir, reference["run_dir"])


STEP_TIMEOUT_S = 100  # conf/train/default.yaml's train.step_timeout_s, written out: the bound this test proves
ENDS_WITHIN_S = STEP_TIMEOUT_S + 40  # rank 0's exit, srun --kill-on-bad-exit (KillWait=5), the job leaving RUNNING


def test_a_frozen_rank_ends_the_job(shared: Path, slurm_two_nodes: SlurmCluster) -> None:
    """Rank 1 stops itself (SIGSTOP) after step 3, with the default timeouts: the job leaves RUNNING within
    ENDS_WITHIN_S of the freeze and ends FAILED. Fails before the fix: the default train.step_timeout_s was 600 s
    (the job was still RUNNING 300 s after the freeze; earlier still rank 0 waited torch's 30 minutes and the
    stopped rank kept the job forever); rank 0 now gives up after 100 s and srun --kill-on-bad-exit ends the stopped
    rank with it."""
    run_dir = shared / "runs" / "frozen"
    fault = callbacks(SignalSelf={"step": 3, "rank": 1, "signal": "SIGSTOP"})
    seen: dict[str, float] = {}

    def during(launcher: subprocess.Popen) -> None:
        wait_for_steps(run_dir, launcher, 3)  # rank 0 logs step 3 as rank 1 stops itself after it
        seen["frozen"] = time.monotonic()
        jid, env = job_id(run_dir), slurm_two_nodes.env()
        while time.monotonic() - seen["frozen"] < ENDS_WITHIN_S + 60:
            state = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], env=env, capture_output=True,
                                   text=True).stdout.strip()
            if state != "RUNNING":
                break
            time.sleep(0.5)
        seen["ended"] = time.monotonic()

    result = launch(slurm_two_nodes, [*tiny(shared, "frozen"), fault], run_dir, during)
    took = seen["ended"] - seen["frozen"]
    assert took <= ENDS_WITHIN_S, f"the job was still RUNNING {took:.0f} s after its rank 1 froze"
    assert took >= STEP_TIMEOUT_S - 10, f"the job ended {took:.0f} s after the freeze, before the step timeout"
    assert result["returncode"] == 1
    assert result["queue"] == [], "the job still runs with its stopped rank"
    assert re.search(r"JobState=(FAILED|CANCELLED)\b", result["scontrol"]), result["scontrol"]
    logs = job_logs(run_dir)
    assert "Another rank stopped answering" in logs, logs[-3000:]
    assert f"train.step_timeout_s={STEP_TIMEOUT_S} s" in logs, logs[-3000:]


def test_a_node_local_run_dir_is_refused(shared: Path, slurm_two_nodes: SlurmCluster) -> None:
    """Fails before the fix: with run.root in each node's own /tmp, both nodes trained on, each writing half of
    every checkpoint where the other never looks (and a resume later sent node 0 to its checkpoint and node 1 to
    a fresh start). Started with srun directly: gd.launch keeps its own files in the run dir, where a node-local
    path fails earlier, less clearly."""
    run_root = "/tmp/gd-node-local-runs"
    train = (f"{sys.executable} -m gd.train +exp=demo run.root={run_root} data.root={shared}/shards "
             "model.input_size=16 train.global_batch=64 train.micro_batch=4 train.steps=2 train.progress=false")
    script = ("export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID "
              "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) "
              f"MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000)); exec {train}")
    env = slurm_two_nodes.env(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    out = subprocess.run(["srun", "-N2", "-n2", "--kill-on-bad-exit=1", "bash", "-c", script], cwd=shared,
                         env=env, capture_output=True, text=True, timeout=420)
    shown = out.stdout[-2000:] + out.stderr[-3000:]
    assert out.returncode != 0, shown
    refusal = f"run.dir={run_root}/demo is not one folder shared by the job's 2 nodes"
    assert out.stderr.count(refusal) >= 2, shown  # on both ranks
    assert "does not exist on this node" in out.stderr and "not on node-local disk such as /tmp" in out.stderr
