"""Sweeps (``python -m gd.launch -m ... key=a,b``): members named from their swept overrides, validated together,
submitted as one SLURM job array on the local cluster, followed with ``gd.launch status``, each resumable alone."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.slurm import SlurmCluster
from tests.launch.conftest import DEMO_MECHANICS, REPO, run_launch

SLURM_CPU = ["+cluster=slurm", "cluster.gpus_per_node=0", "cluster.tasks_per_node=1", "cluster.cpus_per_task=1",
             "cluster.timeout_min=60"]
STEPS = 4


def tiny(shards: Path, root: Path, *extra: str) -> list[str]:
    """The demo experiment shrunk to a few CPU seconds per member: 16x16, one micro-batch of 8, 4 steps."""
    # Each member its own node-local cache, as the default data.cache (per run.name) gives: members of one array
    # run at once on one node, and streaming refuses a local folder another live job registered.
    return ["+exp=demo", f"run.root={root}", f"data.root={shards}", f"data.cache={root}/cache/" + "${run.name}",
            *DEMO_MECHANICS,
            "model.input_size=16", "train.global_batch=8", "train.micro_batch=8", f"train.steps={STEPS}",
            "train.log_every=1", "train.ckpt_every=2", *extra]


def status(path: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "gd.launch", "status", str(path), "--json"], env=env,
                         capture_output=True, text=True, check=True, timeout=60)
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_members_are_named_from_their_swept_overrides():
    """Catches members sharing one run name (every member of a sweep used to train into the same folder), names
    that differ between launches of the same sweep (a relaunch would not resume), and unsafe folder names."""
    from gd.launch.errors import LaunchError
    from gd.launch.sweep import expand

    members = expand(["+cluster=slurm", "+exp=demo", "diffusion.group_size=2,4", "seed=range(0,2)",
                      "data.root=/d/x"])
    assert [m.label for m in members] == ["diffusion.group_size=2,seed=0", "diffusion.group_size=2,seed=1",
                                          "diffusion.group_size=4,seed=0", "diffusion.group_size=4,seed=1"]
    assert members[3].overrides == ["+cluster=slurm", "+exp=demo", "diffusion.group_size=4", "seed=1",
                                    "data.root=/d/x"]
    odd = expand(["data.root=/a/b,/c/d", "+exp=demo,sit_xl2_baseline"])
    assert all("/" not in m.label for m in odd) and len({m.label for m in odd}) == 4
    assert odd[0].label.startswith("data.root=_a_b,exp=demo-")  # changed characters: a hash keeps names apart
    assert [m.label for m in expand(["run.name=a,b"])] == ["", ""]  # run names place themselves
    with pytest.raises(LaunchError, match="without a swept override"):
        expand(["+exp=demo"])
    with pytest.raises(LaunchError, match="names several members alike"):
        expand(["seed=1,1"])


def test_a_bad_member_rejects_the_whole_sweep(tmp_path, tiny_shards):
    """Every member is validated before anything is submitted; the error names the member and its problem."""
    out = run_launch("-m", *SLURM_CPU, *tiny(tiny_shards, tmp_path / "runs"), "diffusion.group_size=3,4",
                     cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "sweep rejected, nothing was submitted" in out.stderr
    assert "demo/diffusion.group_size=3: " in out.stderr and "not divisible by diffusion.group_size=3" in out.stderr
    assert "demo/diffusion.group_size=4" not in out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slurm
def test_sweep_dry_run_prints_one_array_script(tmp_path, tiny_shards, slurm_cluster: SlurmCluster):
    out = run_launch("-m", *SLURM_CPU, *tiny(tiny_shards, tmp_path / "runs"), "diffusion.group_size=2,4",
                     "launcher.dry_run=true", cwd=tmp_path, env=slurm_cluster.env())
    assert out.returncode == 0, out.stderr
    assert "sweep of 2 runs as one job array" in out.stdout and out.stdout.count("#!/bin/bash") == 1
    assert "#SBATCH --array=0-1%2" in out.stdout and "#SBATCH --job-name=gd-demo" in out.stdout
    assert f"demo/diffusion.group_size=4: {tmp_path}/runs/demo/diffusion.group_size=4" in out.stdout
    assert not (tmp_path / "runs").exists() and slurm_cluster.squeue() == []


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_shards, slurm_cluster: SlurmCluster) -> dict[str, Any]:
    """A 2-member sweep (N = 2 and 4) submitted on the local SLURM and followed with the status command."""
    root = tmp_path_factory.mktemp("sweep")
    env = slurm_cluster.env(PYTHONPATH=str(REPO))
    out = run_launch("-m", *SLURM_CPU, *tiny(tiny_shards, root / "runs"), "diffusion.group_size=2,4", cwd=root,
                     env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep_dir = root / "runs" / "demo"
    deadline = time.monotonic() + 400
    while True:
        rows = status(sweep_dir, env)
        if len(rows) == 2 and all(r["state"] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED")
                                  for r in rows):
            break
        assert time.monotonic() < deadline, f"the sweep did not finish in 400 s: {rows}"
        time.sleep(2)
    deadline = time.monotonic() + 60
    while slurm_cluster.squeue() and time.monotonic() < deadline:  # the array may still be COMPLETING
        time.sleep(0.5)
    return {"root": root, "dir": sweep_dir, "out": out, "rows": rows, "env": env}


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_runs_as_one_job_array_with_a_folder_per_member(sweep):
    """Catches: one job per member instead of an array, the launcher waiting on SLURM by default, a member that
    trains with another member's setting or into its folder, INFO lines lost in the jobs' logs, a status table
    that does not say where each run stands."""
    sweep_dir, out = sweep["dir"], sweep["out"]
    record = json.loads((sweep_dir / "sweeps.jsonl").read_text().splitlines()[-1])
    array = record["job_id"]
    assert [m["job_id"] for m in record["members"]] == [f"{array}_0", f"{array}_1"]
    assert f"2 run(s) submitted as slurm job array {array}" in out.stdout
    assert f"python -m gd.launch status {sweep_dir}" in out.stdout  # how to follow, printed instead of waiting
    scripts = list((sweep_dir / "submitit").rglob("*submission.sh"))
    assert len(scripts) == 1 and "#SBATCH --array=0-1%2" in scripts[0].read_text()
    for n, index in ((2, 0), (4, 1)):
        run = sweep_dir / f"diffusion.group_size={n}"
        launch = json.loads((run / "launches.jsonl").read_text().splitlines()[-1])
        assert launch["job_id"] == f"{array}_{index}"
        config = (run / "config.yaml").read_text()
        assert f"group_size: {n}\n" in config and f"name: demo/diffusion.group_size={n}\n" in config
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1))
        logs = "".join(p.read_text() for p in (sweep_dir / "submitit").rglob(f"{array}_{index}_0_log.*"))
        assert f"gd.train INFO: training done at step {STEPS}" in logs, logs[-2000:]
    rows = {r["run"]: r for r in sweep["rows"]}
    assert sorted(rows) == ["diffusion.group_size=2", "diffusion.group_size=4"]
    for r in rows.values():
        assert r["state"] == "DONE" and r["step"] == r["steps"] == STEPS and r["checkpoint"] == STEPS
        assert r["loss"] is not None and r["job_id"].startswith(f"{array}_")
    table = subprocess.run([sys.executable, "-m", "gd.launch", "status", str(sweep_dir)], env=sweep["env"],
                           capture_output=True, text=True, check=True).stdout
    assert table.splitlines()[0].split() == ["run", "state", "step", "loss", "last", "checkpoint", "job"]
    assert f"diffusion.group_size=2  DONE   {STEPS}/{STEPS}" in table


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.long
def test_each_member_resumes_on_its_own(sweep, tiny_shards):
    """Catches a relaunched sweep that resubmits finished members (or refuses), and a member that cannot be
    continued alone: relaunching the sweep unchanged submits nothing (both members are trained to train.steps);
    one member relaunched by its run name with more steps resumes from its own checkpoint, the other untouched."""
    root, sweep_dir, env = sweep["root"], sweep["dir"], sweep["env"]
    again = run_launch("-m", *SLURM_CPU, *tiny(tiny_shards, root / "runs"), "diffusion.group_size=2,4", cwd=root,
                       env=env)
    assert again.returncode == 0 and "every run is running or done, nothing submitted" in again.stdout
    assert "skipping demo/diffusion.group_size=4: trained to train.steps=4 already" in again.stderr
    assert len((sweep_dir / "sweeps.jsonl").read_text().splitlines()) == 1

    out = run_launch(*SLURM_CPU, *tiny(tiny_shards, root / "runs"), "run.name='demo/diffusion.group_size=2'",
                     "diffusion.group_size=2", f"train.steps={STEPS + 2}", "launcher.wait=true", cwd=root, env=env,
                     timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = sweep_dir / "diffusion.group_size=2", sweep_dir / "diffusion.group_size=4"
    assert f"resumed from {first}/checkpoints/step_{STEPS:08d} (step {STEPS})" in out.stderr + out.stdout
    assert metric_steps(first) == list(range(1, STEPS + 3)) and metric_steps(second) == list(range(1, STEPS + 1))
    assert len((first / "launches.jsonl").read_text().splitlines()) == 2  # the sweep, then the relaunch alone


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
