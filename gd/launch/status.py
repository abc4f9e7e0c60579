"""``python -m gd.launch status [PATH ...] [--json]`` (or ``gd-launch status``): where the runs of a sweep stand.

A PATH is a run directory, a sweep directory (its members are sub-folders) or a run root (default: ``runs``). For
each run it reads what the run directory already holds, nothing else: the last launch (``launches.jsonl``), the step
and loss of the last ``metrics.jsonl`` record, ``train.steps`` from ``config.yaml``, the latest checkpoint. The
state is the scheduler's while it knows the job (``squeue``: PENDING, RUNNING, REQUEUED, FAILED, CANCELLED, ...;
on +cluster=local, RUNNING while the process lives); otherwise, and for a job that COMPLETED, DONE when the run
reached ``train.steps``; FAILED when a task of the job ended in an exception (submitit's result files, else
``sacct``), with that task's last error line; else STOPPED (stopped early, e.g. preempted without a requeue:
relaunching the run resumes it).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TAIL_BYTES = 1 << 16
DEPTH = 3


@dataclass
class RunStatus:
    run: str
    state: str
    step: int | None
    steps: int | None
    loss: float | None
    checkpoint: int | None
    checkpoint_age_s: float | None
    job_id: str | None
    cluster: str | None
    log: str | None
    run_dir: str
    error: str | None = None


def is_run_dir(path: Path) -> bool:
    return (path / "launches.jsonl").is_file() or (path / "config.yaml").is_file()


def find_runs(path: Path) -> list[Path]:
    """``path`` if it is a run directory, else the run directories below it (up to three levels: root/sweep/member)."""
    if is_run_dir(path):
        return [path]
    found: list[Path] = []
    frontier = [path]
    for _ in range(DEPTH):
        children = [c for d in frontier for c in sorted(d.iterdir()) if c.is_dir() and not c.is_symlink()
                    and c.name not in ("submitit", "hydra", "checkpoints", "tb", "wandb", "grids", "samples")]
        found += [c for c in children if is_run_dir(c)]
        frontier = [c for c in children if not is_run_dir(c)]
    return sorted(found)


def last_json_line(path: Path, want: str | None = None) -> dict[str, Any] | None:
    """The last JSON line of ``path`` (holding the key ``want``), reading only the file's tail."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a partial first line of the tail, or a line being written
        if isinstance(record, dict) and (want is None or want in record):
            return record
    return None


def _train_steps(run_dir: Path) -> int | None:
    from omegaconf import OmegaConf

    for name in ("config.yaml", "launch.yaml"):
        path = run_dir / name
        if path.is_file():
            try:
                steps = OmegaConf.select(OmegaConf.load(path), "train.steps")
                return int(steps) if steps is not None else None
            except Exception:  # noqa: BLE001 - an unresolvable launch.yaml value: try the next file
                continue
    return None


def _checkpoint(run_dir: Path) -> tuple[int | None, float | None]:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None, None
    name = latest.read_text().strip()
    step = int(name.rsplit("_", 1)[-1]) if name.rsplit("_", 1)[-1].isdigit() else None
    target = run_dir / "checkpoints" / Path(name).name
    age = time.time() - (target if target.exists() else latest).stat().st_mtime
    return step, age


def scheduler_states(launches: list[dict[str, Any]]) -> dict[str, str]:
    """Job id -> state for the jobs the scheduler (squeue, one call) or this machine (local pids) still knows."""
    states: dict[str, str] = {}
    slurm = [r for r in launches if r.get("cluster") == "slurm"]
    if slurm:
        ids = ",".join(sorted({str(r["job_id"]) for r in slurm}))
        try:
            out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ids, "-o", "%i|%j|%T"],
                                 capture_output=True, text=True, check=False, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        names = {str(r["job_id"]): r.get("job_name") for r in slurm}
        for line in out.splitlines():
            job_id, name, state = (line.split("|") + ["", ""])[:3]
            # Job ids restart when a development cluster is reset: the job name says whether it is still ours.
            if job_id in names and (names[job_id] is None or names[job_id] == name):
                states[job_id] = state
    for r in launches:
        if r.get("cluster") == "local":
            cmdline = Path(f"/proc/{r['job_id']}/cmdline")
            try:
                alive = str(r.get("submitit")) in cmdline.read_bytes().decode(errors="replace")
            except OSError:
                alive = False
            if alive:
                states[str(r["job_id"])] = "RUNNING"
    return states


def collect(path: Path) -> list[RunStatus]:
    runs = find_runs(path)
    launches = {run: last_json_line(run / "launches.jsonl") for run in runs}
    known = scheduler_states([r for r in launches.values() if r])
    rows = []
    for run in runs:
        launch = launches[run]
        record = last_json_line(run / "metrics.jsonl", want="loss")
        step = int(record["step"]) if record else None
        steps = _train_steps(run)
        ckpt, age = _checkpoint(run)
        job_id = str(launch["job_id"]) if launch else None
        done = step is not None and steps is not None and step >= steps and (run / "ema.pt").is_file()
        error = None
        if job_id in known and known[job_id] != "COMPLETED":
            state = known[job_id]  # pending, running, requeued, or how it ended (FAILED, CANCELLED, TIMEOUT, ...)
        elif launch is None:
            state = "NOT LAUNCHED"
        elif done:
            state = "DONE"
        else:
            error = job_error(launch)
            state = "FAILED" if error is not None else (_sacct_state(launch) or "STOPPED")
        log = None
        if launch and launch.get("submitit"):
            log = str(Path(launch["submitit"]) / f"{job_id}_0_log.out")
        loss = record.get("loss") if record else None
        rows.append(RunStatus(run=_name(run, path), state=state, step=step, steps=steps,
                              loss=float(loss) if isinstance(loss, (int, float)) else None, checkpoint=ckpt,
                              checkpoint_age_s=age, job_id=job_id, cluster=launch.get("cluster") if launch else None,
                              log=log, run_dir=str(run), error=error))
    return rows


class _PlainUnpickler(pickle.Unpickler):
    """Reads only plain data (tuples, strings, numbers): a result file is not trusted to name classes."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name}")


def job_error(launch: dict[str, Any]) -> str | None:
    """The last line of the exception a task of the launched job ended with (submitit writes each task's outcome
    to ``<job>_<task>_result.pkl``: ("error", traceback) or ("success", ...)); None when no task failed."""
    folder, job_id = launch.get("submitit"), str(launch.get("job_id"))
    if not folder or not Path(folder).is_dir():
        return None
    for path in sorted(Path(folder).glob(f"{job_id}_*_result.pkl")):
        try:
            with open(path, "rb") as f:
                outcome = _PlainUnpickler(io.BytesIO(f.read(TAIL_BYTES * 16))).load()
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError):
            continue  # written by a newer submitit, or holding a result object: not an error record
        if isinstance(outcome, tuple) and len(outcome) == 2 and outcome[0] == "error" and isinstance(outcome[1], str):
            task = path.name[len(job_id) + 1:].split("_")[0]
            lines = [line.strip() for line in outcome[1].strip().splitlines() if line.strip()]
            return f"task {task}: {lines[-1] if lines else 'failed'}"
    return None


def _sacct_state(launch: dict[str, Any]) -> str | None:
    """How SLURM's accounting says the job ended (FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, ...), where
    accounting is kept; None otherwise or when it completed."""
    if launch.get("cluster") != "slurm":
        return None
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", str(launch["job_id"]), "-o", "JobName,State"],
                             capture_output=True, text=True, check=False, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        name, _, state = line.partition("|")
        state = state.split()[0] if state.split() else ""
        if state and state != "COMPLETED" and name == launch.get("job_name", name):
            return state
    return None


def _name(run: Path, base: Path) -> str:
    if run == base:
        return run.name
    return str(run.relative_to(base))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def table(rows: list[RunStatus]) -> str:
    head = ("run", "state", "step", "loss", "last checkpoint", "job")
    body = [(r.run, r.state, f"{r.step if r.step is not None else '-'}/{r.steps if r.steps is not None else '?'}",
             f"{r.loss:.4f}" if r.loss is not None else "-",
             f"step {r.checkpoint} ({_age(r.checkpoint_age_s)})" if r.checkpoint is not None else "-",
             f"{r.cluster} {r.job_id}" if r.job_id else "-") for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body)]
    errors = [f"{r.run}: {r.error} (log: {r.log})" for r in rows if r.error]
    return "\n".join(lines + errors)


def main(argv: list[str]) -> int:
    # The status command reads run folders; it has no config to compose, so a plain argument parser fits.
    parser = argparse.ArgumentParser(prog="gd-launch status", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=["runs"], help="run, sweep or run-root directories (default: runs)")
    parser.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    args = parser.parse_args(argv)
    code = 0
    for raw in args.paths:
        path = Path(raw).expanduser()
        if not path.is_dir():
            print(f"gd.launch status: {raw} is not a directory (a run, a sweep or a run root)", file=sys.stderr)
            code = 2
            continue
        rows = collect(path)
        if args.json:
            for row in rows:
                print(json.dumps(asdict(row)))
        elif not rows:
            print(f"{path}: no runs (no launches.jsonl or config.yaml below it)")
        else:
            if len(args.paths) > 1:
                print(f"{path}:")
            print(table(rows))
    return code
