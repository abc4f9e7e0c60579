"""The parts of gd.bench.gpu_check, each ``part(cfg, budget, save) -> result``.

Each runs in a child process of its own (see gd.bench.gpu_check), calls ``save(partial)`` whenever it has something
new, and returns its result: a dict with ``status`` ("ok", "partial" when rows were skipped or failed, "skipped"
with a ``reason``) and its numbers. Imports of optional packages (deepspeed, xformers, pytest) happen inside the
part that needs them, so a missing one costs that part only.
"""
from __future__ import annotations

import math
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gd.distributed.env import local_device

Save = Callable[[dict[str, Any]], None]
REPO = Path(__file__).resolve().parents[2]
DATASHEET_TFLOPS = 989.0  # H100 / H200 SXM dense bf16


def _device() -> torch.device:
    return local_device("auto")


def _seconds(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls: CUDA events on a GPU, the host clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _model_cfg(overrides: list[str]) -> dict[str, Any]:
    """``cfg.model`` of conf/config.yaml with these overrides, as build_model arguments (``name`` included)."""
    from gd.train.__main__ import compose_config
    from gd.train.trainer import model_kwargs

    return model_kwargs(compose_config(list(overrides)).model)


def _run(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit code or None when killed at ``timeout``, stdout + stderr) of ``cmd`` run from the repository."""
    from gd.bench.train import child_env, kill_tree

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env=child_env())
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1.0))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        return None, out


# ---- peak -------------------------------------------------------------------------------------------------------
def peak(cfg: DictConfig, budget: Any, save: Save) -> dict[str, Any]:
    """The device's matmul rate on random data (the MFU denominator of the other parts) and its copy bandwidth
    (bytes read + written), each the median of ``iters`` timed calls after ``warmup``."""
    c = cfg.peak
    dev = _device()
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if c.dtype not in dtypes:
        raise ValueError(f"peak.dtype={c.dtype!r}: expected one of {sorted(dtypes)}")
    dtype = dtypes[str(c.dtype)]
    n = int(c.size)
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    out = torch.full((n, n), math.nan, device=dev, dtype=dtype)  # poisoned: every element must be written
    mm = statistics.median(_seconds(lambda: torch.mm(a, b, out=out), dev, int(c.warmup), int(c.iters)))
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("the timed matmul left non-finite values in its output")
    src = torch.rand(int(c.copy_mib) * 2**18, device=dev, generator=gen)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    cp = statistics.median(_seconds(lambda: dst.copy_(src), dev, int(c.warmup), int(c.iters)))
    if not torch.equal(dst, src):
        raise RuntimeError("the timed copy did not copy")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": str(c.dtype),
        "size": n, "matmul_tflops": 2.0 * n**3 / mm / 1e12, "copy_gb_s": 2.0 * src.numel() * 4 / cp / 1e9,
        "torch": torch.__version__, "cuda": torch.version.cuda}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        result.update(datasheet_tflops=DATASHEET_TFLOPS, capability=f"{props.major}.{props.minor}",
                      sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    print(f"peak: {result['matmul_tflops']:.1f} TFLOP/s {c.dtype} matmul {n}^3, copy {result['copy_gb_s']:.0f} GB/s "
          f"on {result['device']}", flush=True)
    return result


# ---- xformers ---------------------------------------------------------------------------------------------------
def xformers(cfg: DictConfig, budget: Any, save: Save) -> dict[str, Any]:
    """SiT fwd+bwd with the xformers backend next to sdpa when an xformers build for this torch runs here; else
    why not (gd.models.attention.check_backend's reason)."""
    from gd.bench.model import bench_backend
    from gd.models.attention import check_backend

    try:
        check_backend("xformers")
    except Exception as err:  # not importable, or built for another torch/CUDA
        print(f"xformers: unavailable: {err}", flush=True)
        return {"available": False, "reason": str(err)}
    c = cfg.xformers
    model_cfg = _model_cfg(list(c.model))
    rows: list[dict] = []
    skipped: list[dict] = []
    for n in c.group_sizes:
        for backend in ("xformers", "sdpa"):
            if budget.left() < 5:
                skipped.append({"backend": backend, "group_size": int(n), "reason": "part budget spent"})
                continue
            rows.append(bench_backend(model_cfg, backend, group_size=int(n), batch=int(c.batch),
                                      precision=str(c.precision), warmup=int(c.warmup), iters=int(c.iters),
                                      peak_tflops=cfg.peak_tflops))
            save({"available": True, "rows": rows, "skipped": skipped})
    return {"status": "partial" if skipped else "ok", "available": True, "rows": rows, "skipped": skipped}


# ---- tests ------------------------------------------------------------------------------------------------------
def marked_files(paths: list[str], marker: str) -> list[str]:
    """Test files under ``paths`` (relative to the repository) that use ``pytest.mark.<marker>``."""
    files = set()
    for root in paths:
        for path in sorted((REPO / root).rglob("test_*.py")):
            if f"mark.{marker}" in path.read_text(errors="replace"):
                files.add(str(path.relative_to(REPO)))
    return sorted(files)


def junit_counts(path: Path) -> dict[str, Any]:
    """passed / failed / errors / skipped and each case's outcome from a pytest JUnit XML file."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                outcome, message = name, (node.get("message") or node.text or "")[:300]
                break
        counts[outcome] += 1
        cases.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "message": message})
    return {**counts, "cases": cases}


def tests(cfg: DictConfig, budget: Any, save: Save) -> dict[str, Any]:
    """``pytest -m <marker>`` over the files that use the marker (other test modules need packages the GPU
    machine may lack, and collecting them would fail there)."""
    c = cfg.tests
    files = marked_files(list(c.paths), str(c.marker))
    if not files:
        return {"status": "skipped", "reason": f"no test file under {list(c.paths)} uses pytest.mark.{c.marker}"}
    with tempfile.TemporaryDirectory(prefix="gd-gpu-tests-") as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", str(c.marker),
               f"--junitxml={junit}", *files]
        code, out = _run(cmd, budget.left())
        counts = junit_counts(junit) if junit.is_file() else {}
    print(out[-3000:], flush=True)
    result = {"files": files, "exit_code": code, **counts, "output_tail": out.strip().splitlines()[-15:]}
    if code is None:
        return {**result, "status": "partial", "reason": "killed at the part's deadline"}
    if not counts:
        return {**result, "status": "partial", "reason": f"pytest exited {code} without a report"}
    return result


# ---- train ------------------------------------------------------------------------------------------------------
def train_specs(c: DictConfig) -> list[dict[str, Any]]:
    """The rows of ``c.sets`` named by ``c.run``, in order, as gd.bench.train specs (plus ``overrides``)."""
    unknown = [name for name in c.run if name not in c.sets]
    if unknown:
        raise ValueError(f"train.run names {unknown}, not in train.sets ({sorted(c.sets)})")
    specs = []
    for name in c.run:
        for row in c.sets[name]:
            row = OmegaConf.to_container(row, resolve=True)
            if row.get("mode") not in ("reference", "engine"):
                raise ValueError(f"train.sets.{name}: mode={row.get('mode')!r}; expected reference or engine")
            specs.append({"mode": row["mode"], "variant": row.get("variant", "-"), "n": int(row["n"]),
                          "compile": bool(row.get("compile", False)), "overrides": list(row.get("overrides", [])),
                          "set": name})
    return specs


def train(cfg: DictConfig, budget: Any, save: Save) -> dict[str, Any]:
    """gd.bench.train's rows in order, each (``isolate``) in its child process killed at the part's deadline; a
    row starts only if ``estimate_s`` of its kind is left, else it is listed with the reason."""
    from gd.bench import train as bench

    c = cfg.train
    args = list(c.overrides) + ([f"train.peak_tflops={cfg.peak_tflops}"] if cfg.peak_tflops else [])
    base = bench.compose_bench(args)  # bad overrides fail here, before any row
    specs = train_specs(c)
    for spec in specs:
        if spec["mode"] == "engine" and spec["variant"] not in base.bench.ds_variants:
            raise ValueError(f"train.sets: variant {spec['variant']!r} is not in bench.ds_variants")
    info = {"model": base.model.name, "batch": int(base.bench.batch), "steps": int(base.bench.steps),
            "warmup": int(base.bench.warmup), "peak_tflops": float(base.train.peak_tflops)}
    rows: list[dict] = []
    skipped: list[dict] = []
    for spec in specs:
        kind = "compiled" if spec["compile"] else "eager"
        need = float(c.estimate_s[kind])
        if budget.left() < need:
            skipped.append({**spec, "reason": f"budget: {max(budget.left(), 0):.0f} s left, a {kind} row needs "
                                              f"at least {need:g} s"})
            save({**info, "rows": rows, "skipped": skipped})
            continue
        start = time.time()
        row_args = [*args, *spec["overrides"]]
        if bool(c.isolate):
            row = bench.run_child("gd.bench.train", row_args, spec, timeout=budget.left())
        else:
            try:
                row = bench.measure(bench.compose_bench(row_args), spec, bench.bench_device(spec))
            except Exception as err:  # e.g. no DeepSpeed for the process group: this row only
                row = {**spec, "error": f"{type(err).__name__}: {str(err)[:200]}"}
        row["wall_s"] = time.time() - start
        rows.append(row)
        print(f"train: {_label(row)}: {row.get('ips', math.nan):.1f} img/s {row.get('error') or ''} "
              f"({row['wall_s']:.0f} s)", flush=True)
        save({**info, "rows": rows, "skipped": skipped})
    bad = skipped or any(r.get("error") for r in rows)
    return {"status": "partial" if bad else "ok", **info, "rows": rows, "skipped": skipped}


def _label(row: dict[str, Any]) -> str:
    extra = f" {' '.join(row['overrides'])}" if row.get("overrides") else ""
    return (f"{row['mode']} {row['variant']} N={row['n']} {'compiled' if row['compile'] else 'eager'}{extra}")


# ---- attention --------------------------------------------------------------------------------------------------
def expected_train_cost(inside: float, outside: float, mixed: float | None, width: float, groups: int) -> float:
    """Mean seconds of an eager training step whose groups' anchor t is uniform on [0, 1] and a window of ``width``:
    all groups inside (prob. width^G), all outside ((1 - width)^G), else mixed (both attentions computed)."""
    p_in, p_out = width**groups, (1.0 - width) ** groups
    p_mixed = 1.0 - p_in - p_out
    return p_in * inside + p_out * outside + (p_mixed * mixed if p_mixed > 1e-12 and mixed is not None else 0.0)


def attention(cfg: DictConfig, budget: Any, save: Save) -> dict[str, Any]:
    """ms per training step (fwd+bwd, batch ``batch``) and per sampling forward (batch ``sample_batch``) of the model
    for every group size x group layers x t window (eager). With a window, the costs inside and outside it are
    timed (plus mixed groups for training) and combined for t uniform on [0, 1]: the cost of a real run."""
    from gd.bench.model import time_model
    from gd.models import build_model

    c = cfg.attention
    model_cfg = _model_cfg(list(c.model))
    dev = _device()
    common = dict(precision=str(c.precision), warmup=int(c.warmup), iters=int(c.iters),
                  peak_tflops=cfg.peak_tflops)
    info = {"model": model_cfg["name"], "batch": int(c.batch), "sample_batch": int(c.sample_batch),
            "precision": str(c.precision)}
    rows: list[dict] = []
    skipped: list[dict] = []
    slowest = 0.0
    for layers in c.group_layers:
        for window in c.t_windows:
            layers_v = None if layers is None else [int(v) for v in layers]
            window_v = None if window is None else [float(v) for v in window]
            key = {"group_layers": layers_v, "group_t_window": window_v}
            if layers_v is not None and layers_v[0] == layers_v[1] and window_v is not None:
                skipped.append({**key, "reason": "no group layer: the window changes nothing (see t window all)"})
                continue
            model = None
            for n in [int(v) for v in c.group_sizes]:
                if budget.left() < max(2.0 * slowest, 1.0):
                    skipped.append({**key, "n": n, "reason": f"budget: {max(budget.left(), 0):.0f} s left"})
                    continue
                if model is None:
                    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
                    with dev:
                        model = build_model(model_cfg["name"], **{**kwargs, "group_layers": layers_v,
                                                                   "group_t_window": window_v})
                start = time.time()
                rows.append({**key, "n": n, **_attention_costs(model, n, window_v, c, common, time_model)})
                slowest = max(slowest, time.time() - start)
                save({**info, "rows": rows, "skipped": skipped})
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    budget_skips = any(s["reason"].startswith("budget") for s in skipped)
    return {"status": "partial" if budget_skips else "ok", **info, "rows": rows, "skipped": skipped}


def _attention_costs(model: torch.nn.Module, n: int, window: list[float] | None, c: DictConfig, common: dict,
                     time_model: Callable[..., dict]) -> dict[str, Any]:
    batch, sample_batch = int(c.batch), int(c.sample_batch)

    def ms(mode: str, t: Any, size: int) -> float:
        return 1e3 * time_model(model, group_size=n, batch=size, mode=mode, t=t, **common)["step_s"]

    if window is None or n == 1:
        return {"train_ms": ms("fwdbwd", None, batch), "sample_ms": ms("fwd", 0.5, sample_batch)}
    width = min(window[1], 1.0) - max(window[0], 0.0)
    t_in, t_out = float(c.t_inside), float(c.t_outside)
    groups = batch // n
    costs: dict[str, Any] = {"train_ms_inside": ms("fwdbwd", t_in, batch),
                             "train_ms_outside": ms("fwdbwd", t_out, batch)}
    if groups > 1:  # groups on both sides: eager computes both attentions and picks per group
        costs["train_ms_mixed"] = ms("fwdbwd", [t_in if (i // n) % 2 == 0 else t_out for i in range(batch)], batch)
    costs["train_ms"] = expected_train_cost(costs["train_ms_inside"], costs["train_ms_outside"],
                                            costs.get("train_ms_mixed"), width, groups)
    costs["sample_ms_inside"] = ms("fwd", t_in, sample_batch)
    costs["sample_ms_outside"] = ms("fwd", t_out, sample_batch)
    costs["sample_ms"] = width * costs["sample_ms_inside"] + (1.0 - width) * costs["sample_ms_outside"]
    return costs


# ---- sampling ---------------------------------------------------------------------------------------------------
class _Stub:
    """A free velocity model: counts a sampler's guided NFE for a step count without running the real one."""

    num_classes = 1

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, group_size: int) -> torch.Tensor:
        return torch.zeros_like(x)


def guided_nfe(b: DictConfig, steps: int, cond_n: int, uncond_n: int) -> tuple[int, int]:
    """(NFE, guided NFE) of gd.bench.sampler's sampling run at ``steps`` steps, on a stub model."""
    from gd.diffusion import CallStats, sample

    stats = CallStats()
    batch = cond_n * uncond_n
    channels = int(b.cfg_channels or 1)
    sample(_Stub(), torch.zeros(batch, channels, 1, 1), torch.zeros(batch, dtype=torch.long), method=str(b.methods[0]),
           steps=steps, cfg_scale=float(b.cfg_scale), cfg_interval=tuple(float(v) for v in b.cfg_interval),
           cfg_channels=b.cfg_channels, group_size=cond_n, uncond_group_size=uncond_n,
           generator=torch.Generator().manual_seed(0), stats=stats)
    return stats.nfe, stats.guided_nfe


def sampling(cfg: DictConfig, budget: Any, save: Save) -> dict[str, Any]:
    """gd.bench.sampler at its batch (a short run plus per-NFE costs of a plain and a guided evaluation), projected
    to ``target_steps``: NFE/s plain, guided and averaged over the CFG interval, img/s and FID-50K GPU-hours."""
    from gd.bench import sampler
    from gd.config import compose_config
    from gd.diffusion import BatchPlan

    c = cfg.sampling
    scfg = compose_config(list(c.overrides), config_name="bench/sampler")
    scfg = OmegaConf.create(OmegaConf.to_container(scfg, resolve=True))
    b = scfg.bench
    if len(b.methods) != 1:
        raise ValueError(f"sampling.overrides: bench.methods={list(b.methods)}; expected one method")
    row = sampler.run(scfg)[0]
    cond_n, uncond_n = BatchPlan(str(b.mode), int(b.group_size)).sampling_group_sizes()
    steps = int(c.target_steps)
    nfe, guided = guided_nfe(b, steps, cond_n, uncond_n)
    plain_s, guided_s = float(row["sec_per_nfe_plain"]), float(row["sec_per_nfe_guided"])
    batch = int(row["batch"])
    per_run = plain_s * (nfe - guided) + guided_s * guided
    projection = {"steps": steps, "nfe": nfe, "guided_nfe": guided, "batch": batch,
                  "nfe_per_s_plain": 1.0 / plain_s, "nfe_per_s_guided": 1.0 / guided_s,
                  "nfe_per_s_with_interval": nfe / per_run, "img_per_s": batch / per_run,
                  "num_images": int(c.num_images),
                  "gpu_hours": int(c.num_images) / batch * per_run / 3600,
                  "gpu_hours_no_interval": int(c.num_images) / batch * guided_s * nfe / 3600}
    print(f"sampling: {projection['nfe_per_s_with_interval']:.2f} NFE/s at batch {batch} with the interval, "
          f"FID-{c.num_images} {projection['gpu_hours']:.2f} GPU-hours ({steps} steps, model only)", flush=True)
    return {"measured": row, "projection": projection}


PARTS: dict[str, Callable[[DictConfig, Any, Save], dict[str, Any]]] = {
    "peak": peak, "xformers": xformers, "tests": tests, "train": train, "attention": attention,
    "sampling": sampling}
