"""Model throughput per attention backend: ``python -m gd.bench.model model=sit_xl2 bench.group_size=16``.

Times a forward (``mode=fwd``) or forward+backward (``mode=fwdbwd``, no optimizer) of ``build_model(**cfg.model)``
on random inputs: warmup steps, then the median of ``iters`` steps, each bracketed by a device synchronize.
TFLOP/s uses gd.models.flops (forward FLOPs x 3 for fwd+bwd); MFU divides it by ``peak_tflops``.
"""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from gd.io import atomic_write_text
from gd.models import build_model, forward_flops

PRECISIONS = ("fp32", "tf32", "bf16", "bf16w")
CUDA_PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check(group_size: int, batch: int, precision: str, mode: str, warmup: int, iters: int) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode={mode!r}: expected 'fwd' or 'fwdbwd'")
    if batch < 1 or batch % group_size:
        raise ValueError(f"batch={batch} must be a positive multiple of group_size={group_size}")
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters={iters}, warmup={warmup}: expected iters >= 1, warmup >= 0")


def bench_backend(model_cfg: dict[str, Any], backend: str, *, group_size: int = 1, batch: int = 32,
                  precision: str = "bf16", mode: str = "fwdbwd", compile: bool = False, warmup: int = 3,
                  iters: int = 10, device: str = "auto", peak_tflops: float | None = None,
                  t: float | None = None, seed: int = 0) -> dict[str, Any]:
    """One backend's numbers: img/s, step seconds (median), TFLOP/s, MFU, peak memory; or its error."""
    _check(group_size, batch, precision, mode, warmup, iters)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    result: dict[str, Any] = {"backend": backend, "group_size": group_size, "batch": batch, "precision": precision,
                              "mode": mode, "compile": compile, "device": str(dev)}
    cfg = {k: v for k, v in dict(model_cfg).items() if k != "name"}
    try:
        with dev:  # initialise on the device: an XL init on CPU takes seconds
            model = build_model(model_cfg["name"], **{**cfg, "attn_backend": backend})
    except RuntimeError as err:  # backend unavailable here
        return {**result, "error": str(err)}
    result["model"] = model_cfg["name"]
    return {**result, **time_model(model, group_size=group_size, batch=batch, precision=precision, mode=mode,
                                   compile=compile, warmup=warmup, iters=iters, peak_tflops=peak_tflops, t=t,
                                   seed=seed)}


def time_model(model: torch.nn.Module, *, group_size: int = 1, batch: int = 32, precision: str = "bf16",
               mode: str = "fwdbwd", compile: bool = False, warmup: int = 3, iters: int = 10,
               peak_tflops: float | None = None, t: float | Sequence[float] | None = None,
               seed: int = 0) -> dict[str, Any]:
    """Time a built ``model`` on its device: warm-up seconds, median step seconds, img/s, TFLOP/s, MFU, peak memory.

    ``t``: None = uniform random per image, a float = every image, a sequence = one per image (e.g. groups on
    both sides of a ``group_t_window``). ``bf16w`` converts ``model`` to bf16 in place."""
    _check(group_size, batch, precision, mode, warmup, iters)
    dev = next(model.parameters()).device
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if precision == "bf16w":
        model = model.to(torch.bfloat16)
    model.train(mode == "fwdbwd")
    fn = torch.compile(model) if compile else model
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, device=dev, generator=gen)
    if t is None:
        tt = torch.rand(batch, device=dev, generator=gen)
    elif isinstance(t, (int, float)):
        tt = torch.full((batch,), float(t), device=dev)
    else:
        tt = torch.tensor([float(v) for v in t], device=dev)
        if tt.shape != (batch,):
            raise ValueError(f"t has {tt.numel()} values; expected one per image ({batch})")
    y = torch.randint(0, model.num_classes, (batch,), device=dev, generator=gen)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step() -> None:
        with autocast:
            out = fn(x, tt, y, group_size=group_size)
        if mode == "fwdbwd":
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    result: dict[str, Any] = {}
    grad = torch.enable_grad() if mode == "fwdbwd" else torch.no_grad()
    with grad:
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(dev)
        result["warmup_s"] = time.perf_counter() - t0
        times = []
        for _ in range(iters):
            _sync(dev)
            t0 = time.perf_counter()
            step()
            _sync(dev)
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    flops = forward_flops(model, group_size) * (3 if mode == "fwdbwd" else 1)
    peak = peak_tflops if peak_tflops is not None else (CUDA_PEAK_TFLOPS if dev.type == "cuda" else None)
    tflops = batch / sec * flops / 1e12
    result.update(step_s=sec, img_per_s=batch / sec, tflops=tflops, mfu=(tflops / peak if peak else None),
                  gflops_per_img=flops / 1e9)
    if dev.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return result


def format_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['backend']:9s} unavailable: {r['error']}"
    mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "  n/a"
    mem = f"  mem {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else ""
    return (f"{r['backend']:9s} {r['img_per_s']:9.3g} img/s  {r['step_s'] * 1e3:9.1f} ms/step  "
            f"{r['tflops']:8.3g} TFLOP/s  MFU {mfu}{mem}")


def run(cfg: Any) -> list[dict[str, Any]]:
    """Bench every backend in ``cfg.bench.backends`` for ``cfg.model``; prints one line each."""
    b = cfg.bench
    model_cfg = dict(cfg.model)
    print(f"{model_cfg['name']}  N={b.group_size}  batch={b.batch}  {b.precision}  {b.mode}"
          f"{'  compiled' if b.compile else ''}")
    results = []
    for backend in b.backends:
        r = bench_backend(model_cfg, backend, group_size=b.group_size, batch=b.batch, precision=b.precision,
                          mode=b.mode, compile=b.compile, warmup=b.warmup, iters=b.iters, device=b.device,
                          peak_tflops=b.peak_tflops, t=b.t)
        print(format_row(r), flush=True)
        results.append(r)
    if b.out:
        atomic_write_text(b.out, json.dumps(results, indent=1))
    return results


def main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from gd.config import config_path

    @hydra.main(config_path=config_path(), config_name="bench/model", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        run(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)))

    _main()


if __name__ == "__main__":
    main()
