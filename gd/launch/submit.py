"""From composed configs to running jobs: run directories, submitit executor, dry-run, following the jobs.

Run directory (`run.dir`, one per run name; the trainer owns checkpoints/, metrics.jsonl, config.yaml, ema.pt):
    launch.yaml          the composed config of the latest launch (unresolved, credentials redacted)
    launches.jsonl       one line per launch: time, cluster, job id and name, submitit folder, command line (redacted)
    hydra/launch.log     the launcher's log (single runs)
    submitit/<stamp>/    a fresh submitit folder per launch: sbatch script, pickles, per-rank stdout/stderr
Launching the same run name again reuses the directory; the trainer resumes from checkpoints/latest.

A sweep (gd.launch.sweep) is a folder of such run directories, one per member, plus
    sweeps.jsonl         one line per sweep launch: time, job array id, members and their job ids
    submitit/<stamp>/    the job array's submitit folder (all members' pickles and logs)
On SLURM its members are one job array; on +cluster=local (no scheduler to queue them) they run one after another.
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
            "train.lr", "train.weight_decay", "train.betas", "train.grad_clip", "train.ema_decay", "train.init_from")
# A task that exits non-zero (an exception, a kill) ends the whole step at once instead of leaving the other ranks
# blocked in their next collective; which failures requeue is in slurm/README.md ("Failures and requeueing").
SRUN_ARGS = ("--kill-on-bad-exit=1",)
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "SPECIAL_EXIT")


def launch(cfg: DictConfig) -> int:
    """Validates `cfg`, then prints the dry run or submits the job (and follows it when it should: `wait`)."""
    _check_cluster_chosen(cfg)
    _absolute_paths(cfg)
    for warning in validate(cfg):
        print(f"gd.launch: warning: {warning}", file=sys.stderr)
    _check_tracking(cfg)
    return _launch_validated(cfg)


def _launch_validated(cfg: DictConfig) -> int:
    run_dir = Path(cfg.run.dir)
    folder = _submitit_folder(run_dir)
    if cfg.launcher.dry_run:
        print(dry_run(cfg, folder))
        return 0
    _check_resumable(cfg, run_dir)
    _check_not_running(cfg, run_dir)
    executor = make_executor(cfg, folder)
    _prepare_run_dir(cfg)
    job = _submit(executor, [cfg], cfg.cluster.kind)[0]
    _append_launch(run_dir, cfg, job.job_id, folder, f"gd-{cfg.run.name}")
    rank0 = job.task(0)
    print(f"gd.launch: run {cfg.run.name} ({cfg.task}) submitted as {cfg.cluster.kind} job {job.job_id}, "
          f"{world_size(cfg.cluster)} process(es)\n  run dir: {run_dir}\n  rank-0 log: {rank0.paths.stdout}",
          flush=True)
    if not wait(cfg):
        queue = f"squeue -j {job.job_id}" if cfg.cluster.kind == "slurm" else f"ps {job.job_id}"
        print(f"  follow it: {queue}; tail -f {rank0.paths.stdout}; python -m gd.launch status {run_dir}",
              flush=True)
        return 0
    return follow(job, cfg)


def wait(cfg: DictConfig) -> bool:
    """`launcher.wait`, or when unset (null): follow local jobs, return once a SLURM job is submitted."""
    if cfg.launcher.get("wait") is not None:
        return bool(cfg.launcher.wait)
    return cfg.cluster.kind == "local"


def launch_sweep(members: list[tuple[str, DictConfig]]) -> int:
    """Validates every member (label, composed config) of a sweep, then submits them all as one SLURM job array
    (or, on +cluster=local, runs them one after another); nothing is submitted when any member is rejected."""
    from gd.launch.sweep import place

    problems: list[str] = []
    warnings: dict[str, None] = {}
    cfgs = []
    for label, cfg in members:
        _check_cluster_chosen(cfg)
        _absolute_paths(cfg)
        place(cfg, label)
        try:
            warnings.update(dict.fromkeys(validate(cfg)))
            _check_tracking(cfg)
        except LaunchError as err:
            problems.append(f"{cfg.run.name}: " + str(err).split("\n", 1)[-1].strip().replace("\n", "\n    "))
        cfgs.append(cfg)
    if problems:
        raise LaunchError("sweep rejected, nothing was submitted:\n  - " + "\n  - ".join(problems))
    for warning in warnings:
        print(f"gd.launch: warning: {warning}", file=sys.stderr)
    first = cfgs[0]
    clusters = {json.dumps(OmegaConf.to_container(c.cluster, resolve=True), sort_keys=True) for c in cfgs}
    if len(clusters) > 1:
        raise LaunchError("the sweep's members have different cluster settings; a sweep runs as one job array, "
                          "so sweep cluster.* in separate launches")
    root = Path(os.path.commonpath([str(c.run.dir) for c in cfgs]))
    if (root / "launch.yaml").is_file():
        raise LaunchError(f"{root} is the directory of a single run (it has launch.yaml): give the sweep another "
                          "run.name")
    folder = _submitit_folder(root)
    job_name = f"gd-{root.name}"
    if first.launcher.dry_run:
        if first.cluster.kind == "local":
            print("\n".join(dry_run(cfg, _submitit_folder(Path(cfg.run.dir))) for cfg in cfgs))
        else:
            print(dry_run(first, folder, members=cfgs, job_name=job_name))
        return 0
    refused = []
    for cfg in cfgs:
        try:
            _check_resumable(cfg, Path(cfg.run.dir))
        except LaunchError as err:
            refused.append(str(err))
    if refused:
        raise LaunchError("sweep rejected, nothing was submitted:\n  - " + "\n  - ".join(refused))
    cfgs = _members_to_run(cfgs)
    if not cfgs:
        print(f"gd.launch: sweep {root.name}: every run is running or done, nothing submitted", flush=True)
        return 0
    if first.cluster.kind == "local":
        return _run_one_after_another(cfgs)
    executor = _array_executor(first, folder, job_name, len(cfgs))
    root.mkdir(parents=True, exist_ok=True, mode=0o755)
    for cfg in cfgs:
        _prepare_run_dir(cfg)
    jobs = _submit(executor, cfgs, first.cluster.kind)
    for cfg, job in zip(cfgs, jobs):
        _append_launch(Path(cfg.run.dir), cfg, job.job_id, folder, job_name)
    array_id = str(jobs[0].job_id).split("_")[0]
    record = dict(time=_now(), cluster=first.cluster.kind, job_id=array_id, job_name=job_name, submitit=str(folder),
                  members=[{"run": c.run.name, "job_id": str(j.job_id)} for c, j in zip(cfgs, jobs)],
                  argv=redact_argv(sys.argv[1:]))
    with open(root / "sweeps.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    width = max(len(c.run.name) for c in cfgs)
    lines = "\n".join(f"  {c.run.name.ljust(width)}  job {j.job_id}  {c.run.dir}" for c, j in zip(cfgs, jobs))
    what = "job array" if len(cfgs) > 1 else "job"
    print(f"gd.launch: sweep {root.name}: {len(cfgs)} run(s) submitted as {first.cluster.kind} {what} {array_id}, "
          f"{world_size(first.cluster)} process(es) each\n{lines}\n"
          f"  follow it: squeue -j {array_id}; python -m gd.launch status {root}; "
          f"logs in {folder}/<job id>_0_log.out", flush=True)
    if not wait(first):
        return 0
    return follow_many(jobs, cfgs)


def _members_to_run(cfgs: list[DictConfig]) -> list[DictConfig]:
    """A relaunched sweep resubmits the members that need it: not those whose job still runs, nor those trained to
    train.steps (their metrics.jsonl says so and ema.pt is written); each skip is said."""
    from gd.launch.status import last_json_line

    todo = []
    for cfg in cfgs:
        run_dir = Path(cfg.run.dir)
        try:
            _check_not_running(cfg, run_dir)
        except LaunchError as err:
            print(f"gd.launch: skipping {cfg.run.name}: {str(err).split(';')[0]}", file=sys.stderr)
            continue
        last = last_json_line(run_dir / "metrics.jsonl", want="loss")
        trained = last is not None and int(last["step"]) >= int(cfg.train.steps)
        if cfg.task == "train" and trained and (run_dir / "ema.pt").is_file():
            print(f"gd.launch: skipping {cfg.run.name}: trained to train.steps={cfg.train.steps} already",
                  file=sys.stderr)
            continue
        todo.append(cfg)
    return todo


def _run_one_after_another(cfgs: list[DictConfig]) -> int:
    """A local sweep: this machine has no queue, so its members run in turn, each followed to its end."""
    if cfgs[0].launcher.get("wait") is False:
        print("gd.launch: +cluster=local runs a sweep's members one after another and follows each "
              "(launcher.wait=false applies to SLURM)", file=sys.stderr)
    codes = []
    for i, cfg in enumerate(cfgs):
        print(f"gd.launch: sweep member {i + 1}/{len(cfgs)}: {cfg.run.name}", flush=True)
        with open_dict(cfg):
            cfg.launcher.wait = True
        codes.append(_launch_validated(cfg))
        if codes[-1] == 130:
            return 130
    failed = [c.run.name for c, code in zip(cfgs, codes) if code]
    if failed:
        print(f"gd.launch: {len(failed)} of {len(cfgs)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


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


def _array_executor(cfg: DictConfig, folder: Path, job_name: str, members: int) -> submitit.AutoExecutor:
    """The executor of a sweep's job array: the members' common settings, named after the sweep."""
    executor = make_executor(cfg, folder)
    params: dict[str, Any] = {"name": job_name}
    if members > 1:
        params["slurm_array_parallelism"] = int(cfg.launcher.array_parallelism)
    executor.update_parameters(**params)
    return executor


def _submit(executor: submitit.AutoExecutor, cfgs: list[DictConfig], kind: str) -> list[submitit.Job]:
    """Submits one job per config, several as one job array (submitit's batch), with the caller's
    SLURM/torch.distributed variables hidden (a launch from inside a job must not inherit its allocation), except
    SLURM_CONF, which says where the cluster is."""
    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf:
            os.environ["SLURM_CONF"] = conf
        try:
            if len(cfgs) == 1:
                return [executor.submit(RunJob(cfgs[0]))]
            with executor.batch():
                jobs = [executor.submit(RunJob(cfg)) for cfg in cfgs]
            return jobs
        except submitit.core.utils.FailedJobError as err:
            raise LaunchError(f"the {kind} scheduler refused the job:\n{err}") from err


def dry_run(cfg: DictConfig, folder: Path, members: list[DictConfig] | None = None, job_name: str | None = None) -> str:
    """What would be submitted: the sbatch script on SLURM (a job array's for a sweep's `members`), the process
    layout locally. Writes nothing."""
    cluster = cfg.cluster
    shape = (f"{world_size(cluster)} process(es) ({cluster.nodes} node(s) x {tasks_per_node(cluster)})")
    if members:
        runs = "".join(f"\n#   {m.run.name}: {m.run.dir}" for m in members)
        header = (f"# gd.launch dry run: sweep of {len(members)} runs as one job array, task {cfg.task}, {shape} "
                  f"each{runs}")
    else:
        header = f"# gd.launch dry run: run {cfg.run.name}, task {cfg.task}, {shape}, run dir {cfg.run.dir}"
    header += f"\n# nothing was submitted; the submitit folder would be {folder}"
    if cluster.kind == "local":
        return (f"{header}\n# local: {tasks_per_node(cluster)} process(es) on this machine, "
                f"gpus_per_node={cluster.gpus_per_node}, timeout_min={cluster.timeout_min}")
    with tempfile.TemporaryDirectory() as tmp:
        if members:
            executor = _array_executor(cfg, Path(tmp), job_name or f"gd-{cfg.run.name}", len(members))
        else:
            executor = make_executor(cfg, Path(tmp))
        slurm = executor._executor  # the SlurmExecutor behind AutoExecutor renders the script submit() would write
        if members and len(members) > 1:
            slurm.parameters["map_count"] = len(members)  # what submitit's batch() sets to render --array
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


def follow_many(jobs: list[submitit.Job], cfgs: list[DictConfig]) -> int:
    """Reports the state changes of a sweep's jobs until all have ended; 0 when every one finished."""
    kind = cfgs[0].cluster.kind
    last: dict[str, str] = {}
    pending = {str(job.job_id): (job, cfg) for job, cfg in zip(jobs, cfgs)}
    try:
        while pending:
            states = _slurm_states(list(pending)) if kind == "slurm" else {}
            for job_id, (job, cfg) in list(pending.items()):
                done = job.task(0).paths.result_pickle.exists()
                state = "DONE" if done else (states.get(job_id, "GONE") if kind == "slurm" else job.state)
                if state != last.get(job_id):
                    print(f"gd.launch: {cfg.run.name} (job {job_id}) is {state}", file=sys.stderr, flush=True)
                    last[job_id] = state
                if done or state in TERMINAL_STATES or state == "GONE":
                    del pending[job_id]
            if pending:
                time.sleep(5.0)
    except KeyboardInterrupt:
        print("\ngd.launch: stopped following; the jobs go on (python -m gd.launch status shows them)",
              file=sys.stderr)
        return 130
    failed = 0
    for job, cfg in zip(jobs, cfgs):
        try:
            result = job.task(0).result()
        except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as err:
            print(f"gd.launch: {cfg.run.name} (job {job.job_id}) failed:\n{err}", file=sys.stderr)
            failed += 1
            continue
        if isinstance(result, dict):
            result = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
        print(f"gd.launch: {cfg.run.name} (job {job.job_id}) finished: {result}", flush=True)
    return 1 if failed else 0


def _slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Job id (array tasks as ``<array>_<index>``) -> state, in one squeue call."""
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(job_ids), "-o", "%i %T"],
                         capture_output=True, text=True, check=False).stdout
    return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)


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


def _check_tracking(cfg: DictConfig) -> None:
    """The trainer's monitoring settings, refused before the queue: wandb asked for (train.wandb.enabled) but not
    installed where the launch runs, a sample grid (train.sample_every) it could not make."""
    if cfg.task != "train":
        return
    from gd.train.sample_grid import SampleGrid
    from gd.train.tracking import check_available

    try:
        check_available(cfg)
        SampleGrid.from_config(cfg)
    except (ImportError, ValueError) as err:
        raise LaunchError(f"rejected, nothing was submitted:\n  - {err}") from err


def _check_cluster_chosen(cfg: DictConfig) -> None:
    if "cluster" not in cfg:
        raise LaunchError("no cluster chosen: add +cluster=local (this machine) or +cluster=slurm")


def _submitit_folder(run_dir: Path) -> Path:
    return run_dir / "submitit" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def _prepare_run_dir(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run.dir)
    # Not group/other-writable whatever the umask: a resume refuses a run dir others could change.
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    atomic_write_text(run_dir / "launch.yaml", redacted_yaml(cfg, resolve=False))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _absolute_paths(cfg: DictConfig) -> None:
    """The job may start in another directory (or on another node): pin relative paths to this one."""
    with open_dict(cfg):
        cfg.run.root = os.path.abspath(cfg.run.root)
        if not OmegaConf.is_missing(cfg.data, "root") and not is_url(cfg.data.root):
            cfg.data.root = os.path.abspath(cfg.data.root)
        if OmegaConf.select(cfg, "train.init_from"):
            cfg.train.init_from = os.path.abspath(str(cfg.train.init_from))


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
        name = last.get("job_name") or f"gd-{cfg.run.name}"
        running = len(out) == 2 and out[0] == name and out[1] not in TERMINAL_STATES
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


def _append_launch(run_dir: Path, cfg: DictConfig, job_id: str, folder: Path, job_name: str | None = None) -> None:
    """One line of launches.jsonl; ``job_name``: the scheduler's name of the job (a sweep's array is named after the
    sweep, not the run), which tells a later launch whether that job id is still this run's."""
    record = dict(time=_now(), cluster=cfg.cluster.kind, task=cfg.task, job_id=str(job_id), job_name=job_name,
                  submitit=str(folder), argv=redact_argv(sys.argv[1:]))
    with open(run_dir / "launches.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")



