"""Training-step throughput: a minimal plain-torch reference step next to the trainer's DeepSpeed engine step.

    python -m gd.bench.train model=sit_xl2 train.bench.steps=20 train.bench.group_sizes=[1,16]
    python -m gd.bench.train +exp=groupdiff16 'train.bench.variants=[z2,z0,z0_autocast]' 'train.bench.compile=[false]'

Everything runs in one process on one device with synthetic latents (no data pipeline), so the two columns differ
only by the step itself. reference = fp32 weights, bf16 autocast, fused torch AdamW (the official recipe in bf16).
engine = gd.train.engine.build_engine with cfg.train plus each variant of train.bench.ds_variants merged in (ZeRO
stage, precision, bucket sizes, ...), the same GuardedAdamW the trainer uses. FLOPs are gd.models.flops x3 at the
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


def _build(cfg: Any) -> torch.nn.Module:
    from gd.models import build_model

    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(0)
    return build_model(kwargs.pop("name"), **kwargs)


def _batch(model: torch.nn.Module, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def _time(step: Any, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return time.perf_counter() - start


def run_reference(cfg: Any, n: int, compile_: bool, device: torch.device) -> tuple[float, Any]:
    from gd.diffusion.objective import group_loss

    b = cfg.train.bench
    model = _build(cfg).to(device).train()
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.train.lr), betas=tuple(cfg.train.betas),
                            weight_decay=float(cfg.train.weight_decay), **fused)
    fwd = torch.compile(model) if compile_ else model
    x, y = _batch(model, int(b.batch), device)
    gen = torch.Generator(device=device).manual_seed(0)
    amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = group_loss(lambda xt, t, yy, gs: fwd(xt, t, yy, group_size=gs), x, y, n, generator=gen)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.train.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = _time(step, int(b.warmup), int(b.steps))
    return dt, model


def run_engine(cfg: Any, n: int, compile_: bool, variant: dict, device: torch.device) -> tuple[float, Any]:
    from gd.diffusion.objective import group_loss

    b = cfg.train.bench
    train_cfg = OmegaConf.merge(cfg.train, {"global_batch": int(b.batch), "micro_batch": int(b.batch),
                                            "compile": bool(compile_)}, variant)
    layout = eng.batch_layout(train_cfg, 1, n)
    model = _build(cfg)
    engine, optimizer = eng.build_engine(model, train_cfg, layout, device)
    x, y = _batch(model, int(b.batch), device)
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        loss, _ = group_loss(lambda xt, t, yy, gs: engine(xt, t, yy, group_size=gs), x, y, n, generator=gen)
        engine.backward(loss)
        engine.step()

    dt = _time(step, int(b.warmup), int(b.steps))
    return dt, (engine, optimizer, model)


def _measure(cfg: Any, spec: dict, device: torch.device) -> dict:
    """One configuration: its row (img/s, TFLOP/s, MFU, peak GiB), or the error that stopped it."""
    from gd.models.flops import forward_flops

    b = cfg.train.bench
    n, compile_ = int(spec["n"]), bool(spec["compile"])
    flops = 3.0 * forward_flops(_build(cfg), group_size=n)
    peak = float(cfg.train.peak_tflops)
    row = dict(spec, ips=math.nan, tflops=math.nan, mfu=math.nan, mem=math.nan, error="")
    _free()
    try:
        if spec["mode"] == "reference":
            dt, keep = run_reference(cfg, n, compile_, device)
        else:
            variant = OmegaConf.to_container(b.ds_variants[spec["variant"]], resolve=True)
            dt, keep = run_engine(cfg, n, compile_, variant, device)
        ips = int(b.batch) * int(b.steps) / dt
        tflops = ips * flops / 1e12
        row.update(ips=ips, tflops=tflops, mfu=tflops / peak if peak > 0 else math.nan,
                   mem=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else math.nan)
        del keep
    except Exception as err:  # one failing configuration should not lose the others' numbers
        row["error"] = f"{type(err).__name__}: {str(err)[:160]}"
    return row


def _specs(b: Any) -> list[dict]:
    specs = []
    for n in [int(v) for v in b.group_sizes]:
        for compile_ in [bool(v) for v in b.compile]:
            if "reference" in b.modes:
                specs.append(dict(mode="reference", variant="-", n=n, compile=compile_))
            if "engine" in b.modes:
                for v in b.variants:
                    if v not in b.ds_variants:
                        raise ValueError(f"train.bench.variants names {v!r}, not in train.bench.ds_variants "
                                         f"({sorted(b.ds_variants)})")
                    specs.append(dict(mode="engine", variant=str(v), n=n, compile=compile_))
    return specs


def main(argv: list[str] | None = None) -> int:
    """Runs every configuration in a child process of its own (``train.bench.isolate``): DeepSpeed engines,
    compile caches and the CUDA allocator start clean for each, so one configuration's memory or state cannot
    leak into the next one's numbers."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from gd.train.__main__ import compose_config

    args = list(sys.argv[1:] if argv is None else argv)
    cfg = compose_config(args)
    b = cfg.train.bench
    one = os.environ.get(_CHILD)
    if one is not None:
        eng.init_distributed()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        print(_RESULT + json.dumps(_measure(cfg, json.loads(one), device)), flush=True)
        return 0
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"# {cfg.model.name} input {cfg.model.input_size} batch {b.batch} on {gpu}; steps {b.steps} "
          f"(+{b.warmup} warmup); peak {cfg.train.peak_tflops} TFLOP/s", flush=True)
    rows = []
    for spec in _specs(b):
        if bool(b.get("isolate", True)):
            rows.append(_run_child(args, spec))
        else:
            eng.init_distributed()
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
                torch.device("cpu")
            rows.append(_measure(cfg, spec, device))
        print(_fmt(rows[-1], rows), flush=True)
    print("\n| mode | variant | N | compile | img/s | TFLOP/s | MFU | peak GiB | vs reference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_fmt(row, rows))
    return 0


_CHILD, _RESULT = "GD_BENCH_ONE", "GD_BENCH_RESULT "


def _run_child(args: list[str], spec: dict) -> dict:
    env = {**os.environ, _CHILD: json.dumps(spec)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "gd.bench.train", *args], env=env, capture_output=True,
                          text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(spec, ips=math.nan, tflops=math.nan, mfu=math.nan, mem=math.nan,
                error=f"child exited {proc.returncode}: {' | '.join(tail)[:200]}")


def _fmt(row: dict, rows: list[dict]) -> str:
    ref = next((r["ips"] for r in rows if r["mode"] == "reference" and r["n"] == row["n"]
                and r["compile"] == row["compile"]), math.nan)
    rel = row["ips"] / ref if ref and not math.isnan(ref) else math.nan
    tail = f" {row['error']}" if row.get("error") else ""
    return (f"| {row['mode']} | {row['variant']} | {row['n']} | {row['compile']} | {row['ips']:.1f} | "
            f"{row['tflops']:.1f} | {row['mfu']:.1%} | {row['mem']:.1f} | {rel:.2f} |{tail}")


if __name__ == "__main__":
    sys.exit(main())
