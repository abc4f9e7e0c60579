"""From a composed config to a running job: run directory, submitit executor, dry-run, following the job.

Run directory (`run.dir`, one per run name; the trainer owns checkpoints/, metrics.jsonl, config.yaml, ema.pt):
    launch.yaml          the composed config of the latest launch (unresolved, credentials redacted)
    launches.jsonl       one line per launch: time, cluster, job id, submitit folder, command line (redacted)
    hydra/launch.log     the launcher's log
    submitit/<stamp>/    a fresh submitit folder per launch: sbatch script, pickles, per-rank stdout/stderr
Launching the same run name again reuses the directory; the trainer resumes from checkpoints/latest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf, open_dict

from gd.io import atomic_write_text
from gd.launch.errors import LaunchError
from gd.launch.job import RunJob
from gd.launch.validate import is_url, tasks_per_node, validate, world_size
from gd.secrets import redact_argv, redacted_yaml

# What a checkpoint is tied to: relaunching a run name with another value here is refused (keys that exist in
# only one of the two configs are ignored, so configs may grow new options between launches).
IDENTITY = ("seed", "model", "diffusion", "data.root", "train.zero_stage", "train.precision", "train.global_batch",
            "train.lr", "train.weight_decay", "train.betas", "train.grad_clip", "train.ema_decay")
# A task that exits non-zero (an exception, a kill) ends the whole step at once instead of leaving the other ranks
# blocked in their next collective; which failures requeue is in slurm/README.md ("Failures and requeueing").
SRUN_ARGS = ("--kill-on-bad-exit=1",)
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "SPECIAL_EXIT")


def launch(cfg: DictConfig) -> int:
    """Validates `cfg`, then prints the dry run or submits the job (and follows it when launcher.wait)."""
    if "cluster" not in cfg:
        raise LaunchError("no cluster chosen: add +cluster=local (this machine) or +cluster=slurm")
    _absolute_paths(cfg)
    for warning in validate(cfg):
        print(f"gd.launch: warning: {warning}", file=sys.stderr)
    run_dir = Path(cfg.run.dir)
    folder = run_dir / "submitit" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    if cfg.launcher.dry_run:
        print(dry_run(cfg, folder))
        return 0
    _check_resumable(cfg, run_dir)
    _check_not_running(cfg, run_dir)
    executor = make_executor(cfg, folder)
    # Not group/other-writable whatever the umask: a resume refuses a run dir others could change.
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    atomic_write_text(run_dir / "launch.yaml", redacted_yaml(cfg, resolve=False))
    job = _submit(executor, cfg)
    _append_launch(run_dir, cfg, job.job_id, folder)
    rank0 = job.task(0)
    print(f"gd.launch: run {cfg.run.name} ({cfg.task}) submitted as {cfg.cluster.kind} job {job.job_id}, "
          f"{world_size(cfg.cluster)} process(es)\n  run dir: {run_dir}\n  rank-0 log: {rank0.paths.stdout}",
          flush=True)
    if not cfg.launcher.wait:
        return 0
    return follow(job, cfg)


def make_executor(cfg: DictConfig, folder: Path) -> submitit.AutoExecutor:
    """An AutoExecutor for cfg.cluster: SLURM (sbatch) or this machine (submitit's local controller)."""
    cluster = cfg.cluster
    kind = cluster.kind
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=kind,
                                         **{f"{kind}_max_num_timeout": int(cluster.max_requeues)})
    except RuntimeError as err:
        raise LaunchError(f"+cluster={kind}: {err} (slurm-client must be installed where gd.launch runs)") from err
    tasks = tasks_per_node(cluster)
    params: dict[str, Any] = dict(name=f"gd-{cfg.run.name}", timeout_min=int(cluster.timeout_min),
                                  nodes=int(cluster.nodes), tasks_per_node=tasks,
                                  cpus_per_task=int(cluster.cpus_per_task),
                                  gpus_per_node=int(cluster.gpus_per_node) or None)
    if kind == "slurm":
        if cluster.mem_per_task_gb is not None:
            params["mem_gb"] = cluster.mem_per_task_gb * tasks
        # --requeue: submitit's `scontrol requeue` needs it where a site's slurm.conf has JobRequeue=0.
        extra = {"requeue": True}
        extra.update({str(k): v for k, v in OmegaConf.to_container(cluster.sbatch_extra, resolve=True).items()})
        params.update(slurm_partition=cluster.partition, slurm_account=cluster.account, slurm_qos=cluster.qos,
                      slurm_constraint=cluster.constraint, slurm_comment=cluster.comment,
                      slurm_exclusive=True if cluster.exclusive else None,
                      slurm_signal_delay_s=int(cluster.signal_delay_s),
                      slurm_setup=list(cluster.setup) or None, slurm_srun_args=[*SRUN_ARGS, *cluster.srun_args],
                      slurm_additional_parameters=extra)
    try:
        executor.update_parameters(**params)
    except (ValueError, NameError, AssertionError) as err:
        raise LaunchError(f"cluster settings rejected by submitit: {err}") from err
    return executor


def _submit(executor: submitit.AutoExecutor, cfg: DictConfig) -> submitit.Job:
    """Submits with the caller's SLURM/torch.distributed variables hidden (a launch from inside a job must not
    inherit its allocation), except SLURM_CONF, which says where the cluster is."""
    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf:
            os.environ["SLURM_CONF"] = conf
        try:
            return executor.submit(RunJob(cfg))
        except submitit.core.utils.FailedJobError as err:
            raise LaunchError(f"the {cfg.cluster.kind} scheduler refused the job:\n{err}") from err


def dry_run(cfg: DictConfig, folder: Path) -> str:
    """What would be submitted: the sbatch script on SLURM, the process layout locally. Writes nothing."""
    cluster = cfg.cluster
    header = (f"# gd.launch dry run: run {cfg.run.name}, task {cfg.task}, {world_size(cluster)} process(es) "
              f"({cluster.nodes} node(s) x {tasks_per_node(cluster)}), run dir {cfg.run.dir}\n"
              f"# nothing was submitted; the submitit folder would be {folder}")
    if cluster.kind == "local":
        return (f"{header}\n# local: {tasks_per_node(cluster)} process(es) on this machine, "
                f"gpus_per_node={cluster.gpus_per_node}, timeout_min={cluster.timeout_min}")
    with tempfile.TemporaryDirectory() as tmp:
        executor = make_executor(cfg, Path(tmp))
        slurm = executor._executor  # the SlurmExecutor behind AutoExecutor renders the script submit() would write
        script = slurm._make_submission_file_text(slurm._submitit_command_str, uid="dry-run")
    return f"{header}\n{script.replace(tmp, str(folder))}"


def follow(job: submitit.Job, cfg: DictConfig) -> int:
    """Streams rank 0's output and the job's state changes until it ends; returns a process exit code."""
    rank0 = job.task(0)
    logs = [(rank0.paths.stdout, sys.stdout), (rank0.paths.stderr, sys.stderr)]
    offsets = {path: 0 for path, _ in logs}
    state, last_state = "", ""
    try:
        while True:
            done = rank0.paths.result_pickle.exists()
            if not done:
                state = _job_state(job, cfg.cluster.kind)
                if state != last_state:
                    print(f"gd.launch: job {job.job_id} is {state}", file=sys.stderr, flush=True)
                    last_state = state
            for path, stream in logs:
                offsets[path] = _copy_new(path, offsets[path], stream)
            ended = state in TERMINAL_STATES or state == "GONE" if cfg.cluster.kind == "slurm" else state != "RUNNING"
            if done or ended:
                break
            time.sleep(2.0)
    except KeyboardInterrupt:
        if cfg.cluster.kind == "slurm":
            note = f"the job goes on (scancel {job.job_id} stops it)"
        else:
            note = "the local job was interrupted with it"
        print(f"\ngd.launch: stopped following; {note}. Relaunching the run name resumes from its last checkpoint",
              file=sys.stderr)
        return 130
    try:
        result = rank0.result()
    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as err:
        print(f"gd.launch: job {job.job_id} failed:\n{err}", file=sys.stderr)
        return 1
    if isinstance(result, dict):
        result = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    print(f"gd.launch: job {job.job_id} finished: {result}", flush=True)
    return 0


def _job_state(job: submitit.Job, kind: str) -> str:
    if kind == "local":
        return job.state
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", str(job.job_id), "-o", "%T"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "GONE"


def _copy_new(path: Path, offset: int, stream: Any) -> int:
    if not path.exists():
        return offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    if data:
        stream.write(data.decode(errors="replace"))
        stream.flush()
    return offset + len(data)


def _absolute_paths(cfg: DictConfig) -> None:
    """The job may start in another directory (or on another node): pin relative paths to this one."""
    with open_dict(cfg):
        cfg.run.root = os.path.abspath(cfg.run.root)
        if not is_url(cfg.data.root):
            cfg.data.root = os.path.abspath(cfg.data.root)


def _check_not_running(cfg: DictConfig, run_dir: Path) -> None:
    """Two jobs writing one run directory would interleave checkpoints: refuse while the last launch still runs."""
    launches = run_dir / "launches.jsonl"
    if not launches.is_file():
        return
    last = json.loads(launches.read_text().splitlines()[-1])
    job_id, kind = last["job_id"], last["cluster"]
    if kind == "slurm":
        # Job ids restart when a development cluster is reset: the job name says whether it is still ours.
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%j %T"], capture_output=True, text=True,
                             check=False).stdout.split()
        running = len(out) == 2 and out[0] == f"gd-{cfg.run.name}" and out[1] not in TERMINAL_STATES
        stop = f"scancel {job_id}"
    else:
        cmdline = Path(f"/proc/{job_id}/cmdline")
        running = cmdline.exists() and last["submitit"] in cmdline.read_bytes().decode(errors="replace")
        stop = f"kill {job_id}"
    if running:
        raise LaunchError(f"run {cfg.run.name} is still running as {kind} job {job_id} (launched {last['time']}); "
                          f"wait for it or stop it ({stop}) before launching it again")


def _check_resumable(cfg: DictConfig, run_dir: Path) -> None:
    """Relaunching a run name resumes it, so its model/data/optimiser settings must match the first launch."""
    previous = run_dir / "launch.yaml"
    if not previous.is_file() or cfg.launcher.allow_config_change:
        return
    old = OmegaConf.to_container(OmegaConf.load(previous), resolve=False)
    new = OmegaConf.to_container(cfg, resolve=False)
    changed = [key for key in _diff(old, new) if any(key == k or key.startswith(k + ".") for k in IDENTITY)]
    if changed:
        raise LaunchError(f"run {cfg.run.name} exists in {run_dir} with different settings, and relaunching resumes "
                          f"it: {', '.join(sorted(changed))} changed. Choose a new run.name, or pass "
                          "launcher.allow_config_change=true if the checkpoint still fits")


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, among the keys both configs have."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in old.keys() & new.keys() for d in _diff(old[k], new[k], f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _append_launch(run_dir: Path, cfg: DictConfig, job_id: str, folder: Path) -> None:
    record = dict(time=datetime.now(timezone.utc).isoformat(timespec="seconds"), cluster=cfg.cluster.kind,
                  task=cfg.task, job_id=str(job_id), submitit=str(folder), argv=redact_argv(sys.argv[1:]))
    with open(run_dir / "launches.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")



