"""End to end through `python -m gd.launch` on a real local SLURM (and on +cluster=local for the reference).

The tiny demo (2 CPU ranks, 1x16x16, 40 steps) is run uninterrupted on +cluster=local, then on SLURM where it is
preempted with `scancel --signal=USR2` mid-run: it must checkpoint, requeue, resume at the next step and end with
exactly the reference's weights.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.slurm import SlurmCluster
from tests.launch.conftest import DEMO_MECHANICS, REPO, final_state, job_logs, metric_steps, run_launch

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 40
SLURM_CPU = ["+cluster=slurm", "cluster.gpus_per_node=0", "cluster.tasks_per_node=2", "cluster.cpus_per_task=1",
             "cluster.timeout_min=60"]
LOCAL_CPU = ["+cluster=local", "cluster.tasks_per_node=2", "cluster.cpus_per_task=1"]


def tiny(shards: Path, root: Path, *extra: str) -> list[str]:
    """The demo experiment shrunk for CPU tests; 8 micro-steps per step keep a step long enough to signal."""
    return ["+exp=demo", f"run.root={root}", f"data.root={shards}", f"data.cache={root}/cache",
            *DEMO_MECHANICS,
            "model.input_size=16", "train.global_batch=64", "train.micro_batch=4", f"train.steps={STEPS}",
            "train.log_every=1", "train.ckpt_every=1000", *extra]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path) -> Path:
    root = tmp_path_factory.mktemp("local-run")
    # Same ranks and threads per rank as on SLURM: the thread count changes float reduction order.
    out = run_launch(*LOCAL_CPU, *tiny(tiny_shards, root / "runs"), cwd=root, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root / "runs" / "demo"


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path,
                  slurm_cluster: SlurmCluster) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("slurm-run")
    run_dir = root / "runs" / "demo"
    cmd = [*SLURM_CPU, *tiny(tiny_shards, root / "runs"), "launcher.wait=true"]  # follow it (SLURM's default: not)
    env = slurm_cluster.env(PYTHONPATH=str(REPO))
    with open(root / "launcher.out", "w") as out, open(root / "launcher.err", "w") as err:
        launcher = subprocess.Popen([sys.executable, "-m", "gd.launch", *cmd], cwd=root, env=env,
                                    stdout=out, stderr=err, text=True)
        try:
            deadline = time.monotonic() + 300
            while len(metric_steps(run_dir)) < 3:
                assert launcher.poll() is None, (root / "launcher.err").read_text()[-3000:]
                assert time.monotonic() < deadline, "the SLURM job did not reach step 3 in 300 s"
                time.sleep(0.1)
            job_id = json.loads((run_dir / "launches.jsonl").read_text().splitlines()[-1])["job_id"]
            subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True, timeout=30)
            signalled_after = max(metric_steps(run_dir))
            launcher.wait(timeout=600)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    show = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    deadline = time.monotonic() + 60
    while slurm_cluster.squeue() and time.monotonic() < deadline:  # the job may still be COMPLETING
        time.sleep(0.5)
    return {"run_dir": run_dir, "job_id": job_id, "returncode": launcher.returncode, "signalled_after": signalled_after,
            "stdout": (root / "launcher.out").read_text(), "stderr": (root / "launcher.err").read_text(),
            "scontrol": show, "queue": slurm_cluster.squeue()}


def test_local_run_finishes_with_checkpoint_and_metrics(reference_run: Path) -> None:
    assert metric_steps(reference_run) == list(range(1, STEPS + 1))
    assert (reference_run / "checkpoints" / "latest").read_text().strip().endswith(f"step_{STEPS:08d}")
    assert (reference_run / "ema.pt").is_file() and (reference_run / "launch.yaml").is_file()


def test_slurm_preemption_checkpoints_requeues_and_resumes(preempted_run: dict[str, Any], reference_run: Path) -> None:
    run_dir = preempted_run["run_dir"]
    assert preempted_run["returncode"] == 0, preempted_run["stderr"][-3000:]
    assert "'preempted': False" in preempted_run["stdout"] and f"'step': {STEPS}" in preempted_run["stdout"]
    logs = job_logs(run_dir)
    saved = re.search(r"checkpoint written at step (\d+); requeueing", logs)
    assert saved, logs[-3000:]
    step = int(saved.group(1))
    assert preempted_run["signalled_after"] <= step < STEPS
    assert re.search(rf"resumed from .*step_{step:08d} \(step {step}\)", logs), logs[-3000:]
    assert re.search(r"Restarts=1\b", preempted_run["scontrol"]), preempted_run["scontrol"]
    assert (run_dir / "checkpoints" / f"step_{step:08d}").is_dir()
    # The step counter goes on from the checkpoint: every step logged once, none from a restart at 0.
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    got, want = final_state(run_dir), final_state(reference_run)
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    assert preempted_run["queue"] == []


def test_relaunching_a_run_name_resumes_it(preempted_run: dict[str, Any], tiny_shards: Path) -> None:
    run_dir = preempted_run["run_dir"]
    root = run_dir.parent
    out = run_launch(*LOCAL_CPU, *tiny(tiny_shards, root),
                     f"train.steps={STEPS + 2}", cwd=root.parent, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert metric_steps(run_dir) == list(range(1, STEPS + 3))
    assert len((run_dir / "launches.jsonl").read_text().splitlines()) == 2
    assert len(list((run_dir / "submitit").iterdir())) == 2


def test_relaunch_with_another_model_is_refused(preempted_run: dict[str, Any], tiny_shards: Path) -> None:
    root = preempted_run["run_dir"].parent
    out = run_launch("+cluster=local", *tiny(tiny_shards, root), "model.depth=3", cwd=root.parent)
    assert out.returncode == 2 and "model.depth changed" in out.stderr


def test_bad_config_is_rejected_and_nothing_submitted(tmp_path: Path, tiny_shards: Path,
                                                      slurm_cluster: SlurmCluster) -> None:
    out = run_launch(*SLURM_CPU, *tiny(tiny_shards, tmp_path / "runs"), "train.global_batch=30", cwd=tmp_path,
                     env=slurm_cluster.env())
    assert out.returncode == 2
    assert "train.global_batch=30 is not divisible by diffusion.group_size=4" in out.stderr
    assert not (tmp_path / "runs" / "demo" / "submitit").exists()
    assert slurm_cluster.squeue() == []


def test_dry_run_prints_the_sbatch_script(tmp_path: Path, tiny_shards: Path, slurm_cluster: SlurmCluster) -> None:
    out = run_launch(*SLURM_CPU, *tiny(tiny_shards, tmp_path / "runs"), "launcher.dry_run=true",
                     "cluster.partition=debug", cwd=tmp_path, env=slurm_cluster.env())
    assert out.returncode == 0, out.stderr
    for line in ("#!/bin/bash", "#SBATCH --ntasks-per-node=2", "#SBATCH --partition=debug", "#SBATCH --requeue",
                 "#SBATCH --signal=USR2@", "#SBATCH --time=60", "srun --unbuffered", "--kill-on-bad-exit=1",
                 "submitit.core._submit"):
        assert line in out.stdout, out.stdout
    assert not (tmp_path / "runs" / "demo" / "submitit").exists()
    assert slurm_cluster.squeue() == []


def test_sample_task_runs_from_the_trained_run(reference_run: Path, tiny_shards: Path) -> None:
    root = reference_run.parent
    out = run_launch("+cluster=local", *tiny(tiny_shards, root), "task=sample", "sample.num_images=20",
                     "sample.steps=2", "sample.method=euler", "sample.batch_groups=5", cwd=root.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    samples = list((reference_run / "samples").rglob("samples.npz"))
    assert len(samples) == 1
    assert str(samples[0]) in out.stdout


def test_a_run_that_is_still_running_is_not_launched_twice(tmp_path: Path, tiny_shards: Path,
                                                           slurm_cluster: SlurmCluster) -> None:
    env = slurm_cluster.env()
    sub = subprocess.run(["sbatch", "--parsable", "-J", "gd-demo", f"--output={tmp_path}/slurm-%j.out",
                          "--wrap", "sleep 60"], env=env, capture_output=True, text=True, check=True)
    job_id = sub.stdout.strip().split(";")[0]
    try:
        run_dir = tmp_path / "runs" / "demo"
        run_dir.mkdir(parents=True)
        (run_dir / "launches.jsonl").write_text(json.dumps(
            {"time": "t", "cluster": "slurm", "task": "train", "job_id": job_id, "submitit": "x"}) + "\n")
        out = run_launch(*SLURM_CPU, *tiny(tiny_shards, tmp_path / "runs"), cwd=tmp_path, env=env)
        assert out.returncode == 2
        assert f"run demo is still running as slurm job {job_id}" in out.stderr
        assert not (run_dir / "submitit").exists()
    finally:
        subprocess.run(["scancel", job_id], env=env, check=False)
