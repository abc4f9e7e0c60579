"""``gd-launch status`` on jobs the scheduler has forgotten: how they ended is read from what submitit wrote."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import submitit


def _fails() -> None:
    raise RuntimeError("rank 0: CUDA out of memory while allocating 20.00 GiB")


def _succeeds() -> int:
    return 0


def _run_dir(tmp_path: Path, name: str, fn) -> Path:
    """A run folder launched as gd.launch records it, its job a real submitit local job that has ended."""
    run = tmp_path / name
    folder = run / "submitit"
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=5)
    job = executor.submit(fn)
    try:
        job.result()
    except Exception:  # noqa: BLE001 - the failure is what is being recorded
        pass
    (run / "config.yaml").write_text("train:\n  steps: 100\n")
    (run / "launches.jsonl").write_text(json.dumps({"time": "now", "cluster": "local", "task": "train",
                                                    "job_id": str(job.job_id), "submitit": str(folder)}) + "\n")
    return run


def _status(path: Path) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "gd.launch", "status", str(path), "--json"], capture_output=True,
                         text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_a_crashed_job_is_failed_with_its_last_error_line(tmp_path):
    """Before: a job that crashed showed as STOPPED ("relaunching resumes it"), since squeue forgets ended jobs."""
    _run_dir(tmp_path, "crashed", _fails)
    _run_dir(tmp_path, "preempted", _succeeds)
    rows = {r["run"]: r for r in _status(tmp_path)}
    assert rows["crashed"]["state"] == "FAILED"
    assert rows["crashed"]["error"] == "task 0: RuntimeError: rank 0: CUDA out of memory while allocating 20.00 GiB"
    assert rows["preempted"]["state"] == "STOPPED" and rows["preempted"]["error"] is None
    table = subprocess.run([sys.executable, "-m", "gd.launch", "status", str(tmp_path)], capture_output=True,
                           text=True, check=True).stdout
    assert "crashed: task 0: RuntimeError: rank 0: CUDA out of memory" in table


class _Planted:
    def __reduce__(self):
        return (print, ("planted code ran",))


def test_a_result_file_naming_classes_is_not_unpickled(tmp_path):
    run = _run_dir(tmp_path, "crashed", _fails)
    for path in (run / "submitit").glob("*_result.pkl"):
        path.write_bytes(pickle.dumps(("error", _Planted())))
    out = subprocess.run([sys.executable, "-m", "gd.launch", "status", str(run), "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert "planted code ran" not in out and json.loads(out)["state"] == "STOPPED"
