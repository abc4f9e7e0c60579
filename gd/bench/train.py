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
import logging
import math
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from gd.models.flops import forward_flops
    from gd.train.__main__ import compose_config

    cfg = compose_config(list(sys.argv[1:] if argv is None else argv))
    b = cfg.train.bench
    eng.init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    flops_model = _build(cfg)
    peak = float(cfg.train.peak_tflops)
    name = cfg.model.name
    print(f"# {name} input {cfg.model.input_size} batch {b.batch} on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; steps {b.steps} (+{b.warmup} warmup); "
          f"engine base: zero_stage={cfg.train.zero_stage} precision={cfg.train.precision}", flush=True)
    rows = []
    for n in [int(v) for v in b.group_sizes]:
        flops = 3.0 * forward_flops(flops_model, group_size=n)
        for compile_ in [bool(v) for v in b.compile]:
            configs: list[tuple[str, str, dict]] = []
            if "reference" in b.modes:
                configs.append(("reference", "-", {}))
            if "engine" in b.modes:
                for v in b.variants:
                    if v not in b.ds_variants:
                        raise ValueError(f"train.bench.variants names {v!r}, not in train.bench.ds_variants "
                                         f"({sorted(b.ds_variants)})")
                    configs.append(("engine", str(v), OmegaConf.to_container(b.ds_variants[v], resolve=True)))
            for mode, vname, variant in configs:
                _free()
                try:
                    if mode == "reference":
                        dt, keep = run_reference(cfg, n, compile_, device)
                    else:
                        dt, keep = run_engine(cfg, n, compile_, variant, device)
                    ips = int(b.batch) * int(b.steps) / dt
                    tflops = ips * flops / 1e12
                    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else math.nan
                    row = dict(mode=mode, variant=vname, n=n, compile=compile_, ips=ips, tflops=tflops,
                               mfu=tflops / peak if peak > 0 else math.nan, mem=mem, error="")
                    del keep
                except Exception as err:  # one failing configuration should not lose the others' numbers
                    row = dict(mode=mode, variant=vname, n=n, compile=compile_, ips=math.nan, tflops=math.nan,
                               mfu=math.nan, mem=math.nan, error=f"{type(err).__name__}: {str(err)[:120]}")
                rows.append(row)
                print(_fmt(row, rows), flush=True)
    print("\n| mode | variant | N | compile | img/s | TFLOP/s | MFU | peak GiB | vs reference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_fmt(row, rows))
    return 0


def _fmt(row: dict, rows: list[dict]) -> str:
    ref = next((r["ips"] for r in rows if r["mode"] == "reference" and r["n"] == row["n"]
                and r["compile"] == row["compile"]), math.nan)
    rel = row["ips"] / ref if ref and not math.isnan(ref) else math.nan
    tail = f" {row['error']}" if row["error"] else ""
    return (f"| {row['mode']} | {row['variant']} | {row['n']} | {row['compile']} | {row['ips']:.1f} | "
            f"{row['tflops']:.1f} | {row['mfu']:.1%} | {row['mem']:.1f} | {rel:.2f} |{tail}")


if __name__ == "__main__":
    sys.exit(main())
