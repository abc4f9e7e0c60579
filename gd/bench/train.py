"""Training-step throughput: a minimal plain-torch reference step next to the trainer's own step.

    python -m gd.bench.train model=sit_xl2 bench.steps=20 'bench.group_sizes=[1,16]'
    python -m gd.bench.train +exp=groupdiff16 'bench.variants=[z2,z0_autocast]' 'bench.compile=[false]'

Settings: conf/bench/train.yaml (``bench.*``), composed on top of the run config. Everything runs in one process on
one device with synthetic latents (no data pipeline), so the two columns differ only by the step itself.
reference = fp32 weights, bf16 autocast, fused torch AdamW, fp32 EMA and one loss.item() per step (the official
recipe in bf16). engine = the trainer's step, :class:`gd.train.trainer.Trainer`'s own forward / backward / update
(engine, GuardedAdamW, host read-back, non-finite guard, ShardedEMA) with cfg.train plus each variant of
bench.ds_variants merged in (ZeRO stage, precision, bucket sizes, ...). FLOPs are gd.models.flops x3 at the
step's group size; MFU against train.peak_tflops. Prints one row per configuration and a table at the end.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from gd.train import engine as eng

log = logging.getLogger("gd.bench.train")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _build(cfg: Any, device: torch.device | str | None = None) -> torch.nn.Module:
    """``cfg.model`` seeded with 0, initialised on ``device`` (None: the CPU, as the trainer builds it; ``meta``
    for shapes alone; CUDA: an XL init takes seconds on a CPU)."""
    from gd.models import build_model

    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(0)
    if device is None:
        return build_model(kwargs.pop("name"), **kwargs)
    with torch.device(device):
        return build_model(kwargs.pop("name"), **kwargs)


def _batch(model: torch.nn.Module, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x.to(device), y.to(device)


Measure = Callable[[Any, dict, torch.device], dict]


@dataclass
class Step:
    """One optimizer step in three phases, so a profiler can attribute costs: ``forward() -> loss``,
    ``backward(loss)`` (gradients, plus the trainer's once-per-step loss read-back for the engine), ``update()``
    (optimizer, EMA). ``params`` is the model's parameter count; ``keep`` holds what must outlive the step."""

    forward: Callable[[], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    update: Callable[[], None]
    params: int
    keep: Any = None

    def __call__(self) -> None:
        loss = self.forward()
        self.backward(loss)
        self.update()


def _time(step: Callable[[], None], warmup: int, steps: int) -> tuple[float, float]:
    """(seconds of the warm-up steps, compilation included; seconds of the timed steps)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync()
    warm = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return warm - start, time.perf_counter() - warm


def reference_step(cfg: Any, n: int, compile_: bool, device: torch.device, fused: bool | None = None,
                   autocast: bool | None = None, readback: bool = True, objective: Any = None) -> Step:
    """The official recipe in bf16: fp32 weights, bf16 autocast, fused AdamW, clipping from ``cfg.train``, an fp32
    EMA of every parameter and ``loss.item()`` once per step, as SiT's train.py does.
    ``fused`` / ``autocast`` None: as on CUDA when on CUDA, foreach AdamW and fp32 elsewhere. ``readback=False``
    drops the ``loss.item()`` (fake tensors have no values). The loss is the run's objective's (flow or DDPM;
    ``objective``, else built from ``cfg.diffusion``: a DDPM schedule must be built outside FakeTensorMode).
    Sample-embedding slots are drawn from the step's generator and passed in, as the trainer does, so both compile
    the same module graph (a compiled engine row can reuse the reference row's kernels from inductor's cache);
    ``train.compile_mode`` applies as in the trainer."""
    from gd.diffusion.objectives import build_objective

    b = cfg.bench
    objective = objective if objective is not None else build_objective(cfg.diffusion, cfg.model)
    model = _build(cfg, device if device.type == "cuda" else None).train()
    if next(model.parameters()).device != device:  # (a no-op .to() fails on fake tensors)
        model = model.to(device)
    fused = device.type == "cuda" if fused is None else fused
    impl = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.train.lr), betas=tuple(cfg.train.betas),
                            weight_decay=float(cfg.train.weight_decay), **impl)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    decay = float(cfg.train.ema_decay)
    mode = cfg.train.get("compile_mode")
    fwd = objective.network(torch.compile(model, **({"mode": mode} if mode else {})) if compile_ else model)
    x, y = _batch(model, int(b.batch), device)
    gen = torch.Generator(device=device).manual_seed(0)
    amp = device.type == "cuda" if autocast is None else autocast

    def net(xt: torch.Tensor, t: torch.Tensor, yy: torch.Tensor, gs: int) -> torch.Tensor:
        slots = model.draw_slots(xt.shape[0], gs, gen, xt.device) if model.embed_mode == "cond" else None
        return fwd(xt, t, yy, group_size=gs, slots=slots)

    def forward() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = objective.loss(net, x, y, n, gen)
        return loss

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        if readback:
            loss.item()

    def update() -> None:
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, float(cfg.train.grad_clip), foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)

    return Step(forward, backward, update, sum(p.numel() for p in params), (model, opt, ema))


def trainer_config(cfg: Any, n: int, compile_: bool, variant: dict) -> Any:
    """The run config of an engine row: ``cfg.train`` with the variant merged in, the whole batch on one process,
    and a plan whose every step has group size ``n`` (GroupDiff-f without null-label steps; plain SiT at n = 1)."""
    b = cfg.bench
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # variants may add DeepSpeed keys
    diffusion = {"mode": "f", "group_size": n, "p_group": 0.0} if n > 1 else {"mode": "none", "group_size": 1}
    return OmegaConf.merge(plain, {"train": {"global_batch": int(b.batch), "micro_batch": int(b.batch),
                                             "compile": bool(compile_), **variant}, "diffusion": diffusion})


def engine_step(cfg: Any, n: int, compile_: bool, variant: dict, device: torch.device,
                fused: bool | None = None) -> Step:
    """The trainer's step on synthetic data: :class:`gd.train.trainer.Trainer`'s forward, its backward with the
    step's one host read-back, and the update (``engine.step``, non-finite guard, EMA), as ``train_step`` runs them
    for a step of one micro-batch. ``device`` is the trainer's own (its process group decides)."""
    from gd.train.data import SyntheticData
    from gd.train.trainer import Trainer

    run = trainer_config(cfg, n, compile_, variant)
    trainer = Trainer(run, data=SyntheticData(run.model, int(cfg.bench.batch)), resume=False, fused=fused)
    mb = trainer.micro_batch(0, 0)

    def forward() -> torch.Tensor:
        trainer.begin_step()
        return trainer.forward(mb)

    def backward(loss: torch.Tensor) -> None:
        trainer.backward(loss, last=True)

    def update() -> None:
        trainer.engine.step()
        trainer.end_step(0)

    return Step(forward, backward, update, sum(p.numel() for p in trainer.model.parameters()), trainer)


def measure(cfg: Any, spec: dict, device: torch.device) -> dict:
    """One configuration: its row (img/s, TFLOP/s, MFU, peak GiB, warm-up seconds with compilation), or the
    error that stopped it."""
    from gd.models.flops import forward_flops

    b = cfg.bench
    n = int(spec["n"])
    flops = 3.0 * forward_flops(_build(cfg, "meta"), group_size=n)
    peak = float(cfg.train.peak_tflops)
    row = dict(spec, ips=math.nan, tflops=math.nan, mfu=math.nan, mem=math.nan, error="")
    _free()
    try:
        step = build_step(cfg, spec, device, fused=b.get("fused"))
        warm, dt = _time(step, int(b.warmup), int(b.steps))
        ips = int(b.batch) * int(b.steps) / dt
        tflops = ips * flops / 1e12
        row.update(ips=ips, tflops=tflops, mfu=tflops / peak if peak > 0 else math.nan, warmup_s=warm,
                   mem=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else math.nan)
        del step
    except Exception as err:  # one failing configuration should not lose the others' numbers
        row["error"] = f"{type(err).__name__}: {str(err)[:160]}"
    return row


def build_step(cfg: Any, spec: dict, device: torch.device, fused: bool | None = None,
               autocast: bool | None = None) -> Step:
    """The :class:`Step` a row of :func:`_specs` names (reference, or the engine with its ds_variant)."""
    n, compile_ = int(spec["n"]), bool(spec["compile"])
    if spec["mode"] == "reference":
        return reference_step(cfg, n, compile_, device, fused, autocast)
    variant = OmegaConf.to_container(cfg.bench.ds_variants[spec["variant"]], resolve=True)
    return engine_step(cfg, n, compile_, variant, device, fused)


def _specs(b: Any) -> list[dict]:
    specs = []
    for n in [int(v) for v in b.group_sizes]:
        for compile_ in [bool(v) for v in b.compile]:
            if "reference" in b.modes:
                specs.append(dict(mode="reference", variant="-", n=n, compile=compile_))
            if "engine" in b.modes:
                for v in b.variants:
                    if v not in b.ds_variants:
                        raise ValueError(f"bench.variants names {v!r}, not in bench.ds_variants "
                                         f"({sorted(b.ds_variants)})")
                    specs.append(dict(mode="engine", variant=str(v), n=n, compile=compile_))
    return specs


def run_table(argv: list[str] | None, module: str, measure: Measure, fmt: Callable[[dict, list[dict]], str],
              describe: Callable[[Any], tuple[str, str]]) -> tuple[Any, list[dict]] | None:
    """The shared ``main`` of the step benchmarks: compose the config, then either measure the one configuration
    this child process was started for (returns None) or run every configuration of ``cfg.bench`` (each in a
    child process of its own when ``bench.isolate``: DeepSpeed engines, compile caches and the CUDA allocator
    start clean, so one configuration cannot leak memory or state into the next one's numbers), printing
    ``describe(cfg)``'s title and table header, a row as each finishes, and the whole table at the end."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = compose_bench(args)
    if child_measure(cfg, measure):
        return None
    title, header = describe(cfg)
    print(f"{title}\n{header}", flush=True)
    rows = run_specs(cfg, args, module, measure, fmt)
    print("\n" + header)
    for row in rows:
        print(fmt(row, rows))
    return cfg, rows


def compose_bench(args: list[str]) -> Any:
    """conf/config.yaml + conf/bench/train.yaml (``bench.*``) with command-line overrides."""
    from gd.train.__main__ import compose_config

    return compose_config(["+bench=train", *args])


def _describe(cfg: Any) -> tuple[str, str]:
    b = cfg.bench
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    title = (f"# {cfg.model.name} input {cfg.model.input_size} batch {b.batch} on {gpu}; steps {b.steps} "
             f"(+{b.warmup} warmup); peak {cfg.train.peak_tflops} TFLOP/s")
    header = ("| mode | variant | N | compile | img/s | TFLOP/s | MFU | peak GiB | vs reference |\n"
              "|---|---|---|---|---|---|---|---|---|")
    return title, header


def main(argv: list[str] | None = None) -> int:
    run_table(argv, "gd.bench.train", measure, _fmt, _describe)
    return 0


_CHILD, _RESULT = "GD_BENCH_ONE", "GD_BENCH_RESULT "


def bench_device(spec: dict | None = None) -> torch.device:
    """This process's device. The trainer's rows start the process group first (DeepSpeed's, which needs one even
    for one process); plain rows do not, so they run where DeepSpeed does not import."""
    if spec is None or spec.get("mode") != "reference":
        eng.init_distributed()
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def child_measure(cfg: Any, measure: Measure) -> bool:
    """In a child started by :func:`run_specs`: measure its one configuration, print the row, return True."""
    one = os.environ.get(_CHILD)
    if one is None:
        return False
    spec = json.loads(one)
    print(_RESULT + json.dumps(measure(cfg, spec, bench_device(spec))), flush=True)
    return True


def run_specs(cfg: Any, args: list[str], module: str, measure: Measure,
              fmt: Callable[[dict, list[dict]], str]) -> list[dict]:
    """Every configuration of ``cfg.bench`` measured (each in a child ``python -m module`` when isolated),
    printed as it finishes."""
    rows: list[dict] = []
    for spec in _specs(cfg.bench):
        rows.append(run_child(module, args, spec) if bool(cfg.bench.get("isolate", True))
                    else measure(cfg, spec, bench_device(spec)))
        print(fmt(rows[-1], rows), flush=True)
    return rows


def run_child(module: str, args: list[str], spec: dict, timeout: float | None = None) -> dict:
    """``python -m module args`` measuring the one configuration ``spec``; its row, or ``spec`` with the error.

    At ``timeout`` seconds the child is killed with every process it started (inductor's compile workers
    included) and the row says so."""
    env = {**child_env(), _CHILD: json.dumps(spec)}
    proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        return dict(spec, error=f"timeout: killed after {timeout:.0f} s")
    for line in out.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    tail = (err or out).strip().splitlines()[-3:]
    return dict(spec, error=f"child exited {proc.returncode}: {' | '.join(tail)[:200]}")


def child_env() -> dict[str, str]:
    """This process's environment without its torch.distributed variables: a child starts its own process group
    (inheriting them, it would try to serve this process's store on the same port)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def kill_tree(pid: int) -> None:
    """SIGKILL process ``pid`` and all its descendants (listed before any is killed, so none is re-parented
    away first)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def _fmt(row: dict, rows: list[dict]) -> str:
    row = {"ips": math.nan, "tflops": math.nan, "mfu": math.nan, "mem": math.nan, **row}
    ref = next((r.get("ips", math.nan) for r in rows if r["mode"] == "reference" and r["n"] == row["n"]
                and r["compile"] == row["compile"]), math.nan)
    rel = row["ips"] / ref if ref and not math.isnan(ref) else math.nan
    tail = f" {row['error']}" if row.get("error") else ""
    return (f"| {row['mode']} | {row['variant']} | {row['n']} | {row['compile']} | {row['ips']:.1f} | "
            f"{row['tflops']:.1f} | {row['mfu']:.1%} | {row['mem']:.1f} | {rel:.2f} |{tail}")


if __name__ == "__main__":
    sys.exit(main())
