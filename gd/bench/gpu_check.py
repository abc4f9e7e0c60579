"""The prepared GPU check: ``bash tools/gpu_check.sh <out>`` or ``python -m gd.bench.gpu_check out=<out>``.

GPU time comes rarely and briefly, so everything worth measuring on one is a single command that fits in 8 minutes
(conf/bench/gpu_check.yaml, ``budget_s``). Its parts (gd.bench.gpu_parts), in this order: ``peak`` (bf16 matmul rate
and copy bandwidth: the MFU denominator of the rest), ``xformers``, ``tests`` (``pytest -m gpu``), ``train`` (the
plain torch step against the trainer's, gd.bench.train), ``attention`` (group-attention cost per N, group layers
and t window), ``sampling`` (gd.bench.sampler, FID-50K GPU-hours).

Each part runs in a child process with a deadline; it rewrites its result file as it measures, so a part that
crashes or overruns (it is killed ``grace_s`` after its deadline, with every process it started) loses only what
it had not finished. A part may use its own ``budget_s`` plus whatever the earlier parts left unused; the later
parts' budgets stay reserved. After every part ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` are rewritten
atomically (gd.io). ``dry_run=true`` (or ``--dry-run``) runs every part on the CPU with a tiny model: CI's proof
that the check still works when a GPU comes.
"""
from __future__ import annotations

import collections
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gd.io import atomic_write_text

PARTS = ("peak", "xformers", "tests", "train", "attention", "sampling")
STATUSES = ("ok", "partial", "skipped", "crashed", "killed")
JSON_NAME, MD_NAME = "gpu_check.json", "gpu_check.md"


def compose_check(args: list[str]) -> DictConfig:
    """conf/bench/gpu_check.yaml with hydra overrides; ``dry_run=true`` merges its ``dry`` section over the file's
    settings, and the command line's overrides again over that (they win). Unknown parts are refused here, before
    anything runs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from gd.config import compose_config

    cfg = compose_config(args, config_name="bench/gpu_check")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    dry = cfg.pop("dry")
    if cfg.dry_run:
        cfg = OmegaConf.merge(cfg, dry)
        for override in OverridesParser.create().parse_overrides(args):
            if not override.is_delete() and not override.key_or_group.startswith("dry."):
                OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False, force_add=True)
    unknown = [p for p in cfg.parts if p not in PARTS]
    if unknown:
        raise ValueError(f"parts={list(cfg.parts)}: unknown {unknown}; expected some of {list(PARTS)}")
    return cfg


def machine() -> dict[str, Any]:
    """What ran the check, without initialising CUDA in this process (the peak part adds the device's own data)."""
    versions = {}
    for name in ("torch", "deepspeed", "hydra-core", "omegaconf", "xformers", "triton", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "versions": versions}


def part_budget(cfg: DictConfig, name: str, left: float) -> float:
    """Seconds part ``name`` may run when ``left`` seconds of the whole check remain: all of them but the
    budgets of the parts after it (so it inherits what earlier parts left unused), at most ``left``."""
    later = list(cfg.parts)[list(cfg.parts).index(name) + 1:]
    reserved = sum(float(cfg[p].budget_s) for p in later)
    return min(left, max(left - reserved, float(cfg[name].budget_s)))


class Report:
    """The check's JSON document, rewritten with its markdown rendering after every change."""

    def __init__(self, cfg: DictConfig) -> None:
        self.out = Path(str(cfg.out))
        self.out.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {
            "version": 1, "started": _now(), "finished": None, "wall_s": None, "dry_run": bool(cfg.dry_run),
            "budget_s": float(cfg.budget_s), "machine": machine(),
            "parts": {p: {"status": "pending"} for p in cfg.parts}}
        self.save()

    def set(self, name: str, entry: dict[str, Any]) -> None:
        self.data["parts"][name] = entry
        self.save()

    def save(self) -> None:
        from gd.bench.gpu_report import render

        atomic_write_text(self.out / JSON_NAME, json.dumps(finite(self.data), indent=1, default=str, allow_nan=False))
        atomic_write_text(self.out / MD_NAME, render(self.data))


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (a row that measured nothing) as None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def orchestrate(cfg: DictConfig, args: list[str]) -> int:
    """Run every part of ``cfg.parts`` in its child process; 0 when all ran and no test failed."""
    report = Report(cfg)
    start = time.time()
    deadline = start + float(cfg.budget_s)
    peak: float | None = None
    with tempfile.TemporaryDirectory(prefix="gd-gpu-check-") as tmp:
        for name in cfg.parts:
            left = deadline - time.time()
            if left < float(cfg.min_part_s):
                report.set(name, {"status": "skipped", "reason": f"the check's budget ({cfg.budget_s:g} s) is spent"})
                continue
            budget = part_budget(cfg, name, left)
            print(f"== {name}: up to {budget:.0f} s", flush=True)
            entry = run_part_child(name, args, budget, float(cfg.grace_s), peak, Path(tmp))
            report.set(name, entry)
            if name == "peak" and entry["status"] == "ok":
                peak = float(entry["result"]["matmul_tflops"])
    report.data["finished"] = _now()
    report.data["wall_s"] = time.time() - start
    report.save()
    print((report.out / MD_NAME).read_text(), flush=True)
    parts = report.data["parts"].values()
    failed = any(p["status"] in ("crashed", "killed") for p in parts)
    tests = report.data["parts"].get("tests", {}).get("result") or {}
    return 1 if failed or tests.get("failed") or tests.get("errors") else 0


def run_part_child(name: str, args: list[str], budget: float, grace: float, peak: float | None,
                   tmp: Path) -> dict[str, Any]:
    """``python -m gd.bench.gpu_check <args> part=<name> ...`` with a deadline; its entry for the report."""
    result_file = tmp / f"{name}.json"
    start = time.time()
    cmd = [sys.executable, "-m", "gd.bench.gpu_check", *args, f"part={name}", f"part_deadline={start + budget}",
           f"part_result={result_file}"]
    if peak is not None:
        cmd.append(f"peak_tflops={peak}")
    code, tail = supervise(cmd, budget + grace)
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    status = result.pop("status", None) if result is not None else None
    entry: dict[str, Any] = {"budget_s": round(budget, 1), "wall_s": round(time.time() - start, 1), "result": result}
    if code == 0 and status in STATUSES:
        entry["status"] = status
        if "reason" in result:
            entry["reason"] = result["reason"]
    else:
        entry["status"] = "killed" if code is None else "crashed"
        what = f"killed {grace:g} s after its {budget:.0f} s budget" if code is None else f"exit code {code}"
        entry["error"] = f"{what}: " + " | ".join(line.strip() for line in tail if line.strip())[-600:]
    return entry


def supervise(cmd: list[str], timeout: float) -> tuple[int | None, list[str]]:
    """Run ``cmd`` (stdout shared, stderr echoed) for at most ``timeout`` seconds; then it is killed with every
    process it started. Returns (exit code, None when killed; the last lines of its stderr)."""
    from gd.bench.train import child_env, kill_tree

    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace", env=child_env())
    tail: collections.deque[str] = collections.deque(maxlen=12)
    reader = threading.Thread(target=_echo, args=(proc.stderr, tail), daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        code = None
    reader.join(timeout=5)
    return code, list(tail)


def _echo(stream: Any, tail: collections.deque) -> None:
    for line in stream:
        sys.stderr.write(line)
        tail.append(line)


class PartBudget:
    """The deadline of one part, in epoch seconds."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()


def run_part(cfg: DictConfig) -> None:
    """In a part's child process: run it, rewriting ``part_result`` as it goes (status "running" until done)."""
    from gd.bench import gpu_parts

    path = Path(str(cfg.part_result))

    def save(data: dict[str, Any]) -> None:
        atomic_write_text(path, json.dumps({"status": "running", **data}, default=str))

    result = gpu_parts.PARTS[str(cfg.part)](cfg, PartBudget(float(cfg.part_deadline)), save)
    atomic_write_text(path, json.dumps({"status": "ok", **result}, default=str))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    args = ["dry_run=true" if a == "--dry-run" else a for a in (sys.argv[1:] if argv is None else argv)]
    cfg = compose_check(args)
    if cfg.part is not None:
        run_part(cfg)
        return 0
    if cfg.dry_run:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the dry run is the CPU run, also on a GPU machine
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return orchestrate(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
