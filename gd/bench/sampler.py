"""Sampling throughput per method: ``python -m gd.bench.sampler model=sit_xl2 diffusion=groupdiff_l``.

For each method in ``bench.methods`` it runs ``gd.diffusion.sample`` once on a batch of ``batch_groups`` groups
(group inference as in ``bench.mode``; CFG with ``bench.cfg_interval``), timing the run with device
synchronisation and counting NFE, guided NFE and forward calls. Separately it times one unguided and one guided
velocity evaluation (median of ``iters``), and projects the seconds per image, and the GPU-hours for
``num_images`` images, with the interval and without it (guidance at every NFE, same NFE).
"""
from __future__ import annotations

import json
import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from gd.diffusion import METHODS, BatchPlan, CallStats, GuidedVelocity, sample
from gd.io import atomic_write_text

PRECISIONS = ("bf16", "fp32", "tf32")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _Autocast:
    """The model under bf16 autocast, returning fp32 so the integrators stay in fp32."""

    def __init__(self, model: torch.nn.Module, enabled: bool) -> None:
        self.model, self.enabled, self.num_classes = model, enabled, model.num_classes

    def __call__(self, x: Tensor, t: Tensor, y: Tensor, group_size: int) -> Tensor:
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if self.enabled else nullcontext()
        with ctx:
            return self.model(x, t, y, group_size).float()


def _time_eval(fn, x: Tensor, t: Tensor, dev: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn(x, t)
    times = []
    for _ in range(iters):
        _sync(dev)
        t0 = time.perf_counter()
        fn(x, t)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(cfg: Any) -> list[dict[str, Any]]:
    """Bench every method of ``cfg.bench.methods`` for ``cfg.model``; prints one line each, returns the rows."""
    from gd.models import build_model, load_pretrained

    b = cfg.bench
    bad = [m for m in b.methods if m not in METHODS]
    if bad:
        raise ValueError(f"bench.methods has {bad}: expected a subset of {METHODS}")
    if b.precision not in PRECISIONS:
        raise ValueError(f"bench.precision={b.precision!r}: expected one of {PRECISIONS}")
    if int(b.batch_groups) < 1 or int(b.num_images) < 1 or int(b.iters) < 1:
        raise ValueError(f"bench.batch_groups={b.batch_groups}, num_images={b.num_images}, iters={b.iters}: "
                         "expected >= 1")
    n = int(b.group_size)
    cond_n, uncond_n = BatchPlan(str(b.mode), n).sampling_group_sizes()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if b.device == "auto" else b.device)
    model_cfg = {k: v for k, v in dict(cfg.model).items() if k != "name"}
    with dev:
        model = build_model(cfg.model.name, **model_cfg)
    if b.get("ckpt"):
        load_pretrained(model, b.ckpt)
    model.eval().requires_grad_(False)
    torch.backends.cuda.matmul.allow_tf32 = b.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = b.precision == "tf32"
    net = _Autocast(model, b.precision == "bf16")

    batch = int(b.batch_groups) * n
    gen = torch.Generator(device=dev).manual_seed(int(b.seed))
    noise = torch.randn(batch, model.in_channels, model.input_size, model.input_size, device=dev, generator=gen)
    y = torch.randint(0, model.num_classes, (int(b.batch_groups),), device=dev, generator=gen).repeat_interleave(n)
    interval = tuple(float(v) for v in b.cfg_interval)
    guidance = dict(cfg_scale=float(b.cfg_scale), cfg_channels=b.cfg_channels, group_size=cond_n,
                    uncond_group_size=uncond_n)

    with torch.no_grad():
        half = torch.tensor(0.5, device=dev)
        plain = GuidedVelocity(net, y, cfg_scale=1.0, group_size=cond_n)
        # the cost of a guided evaluation does not depend on the scale; 2.0 only switches guidance on
        guided = GuidedVelocity(net, y, cfg_scale=2.0, group_size=cond_n, uncond_group_size=uncond_n)
        c_plain = _time_eval(plain, noise, half, dev, int(b.warmup), int(b.iters))
        c_guided = _time_eval(guided, noise, half, dev, int(b.warmup), int(b.iters))
    use_cfg = float(b.cfg_scale) != 1.0
    print(f"{cfg.model.name}  mode={b.mode}  N={n}  batch={batch}  {b.precision}  {dev}  "
          f"cfg={b.cfg_scale} interval={list(interval)}  per NFE: {c_plain * 1e3:.1f} ms plain, "
          f"{c_guided * 1e3:.1f} ms guided")
    rows = []
    for method in b.methods:
        steps = int(b.steps[method])
        stats = CallStats()
        _sync(dev)
        t0 = time.perf_counter()
        sample(net, noise, y, method=method, steps=steps, cfg_interval=interval, generator=gen, stats=stats,
               atol=float(b.atol), rtol=float(b.rtol), **guidance)
        _sync(dev)
        wall = time.perf_counter() - t0
        guided_nfe = stats.guided_nfe if use_cfg else 0
        sec_interval = (c_plain * (stats.nfe - guided_nfe) + c_guided * guided_nfe) / batch
        sec_full = (c_guided if use_cfg else c_plain) * stats.nfe / batch
        row = {"method": method, "steps": steps, "nfe": stats.nfe, "guided_nfe": guided_nfe,
               "forward_calls": stats.forward_calls, "batch": batch, "wall_s": wall, "img_per_s": batch / wall,
               "gpu_hours_measured": b.num_images / (batch / wall) / 3600,
               "gpu_hours_interval": b.num_images * sec_interval / 3600,
               "gpu_hours_no_interval": b.num_images * sec_full / 3600,
               "sec_per_nfe_plain": c_plain, "sec_per_nfe_guided": c_guided,
               "model": cfg.model.name, "mode": b.mode, "group_size": n, "precision": b.precision,
               "device": str(dev), "cfg_scale": float(b.cfg_scale), "cfg_interval": list(interval)}
        rows.append(row)
        print(f"{method:7s} steps {steps:4d}  NFE {stats.nfe:4d} (guided {guided_nfe:4d}, forwards "
              f"{stats.forward_calls:4d})  {row['img_per_s']:9.3g} img/s  {b.num_images} images: "
              f"{row['gpu_hours_measured']:.3g} GPU-h measured, {row['gpu_hours_interval']:.3g} projected with "
              f"interval, {row['gpu_hours_no_interval']:.3g} without", flush=True)
    if b.get("out"):
        atomic_write_text(b.out, json.dumps(rows, indent=1))
    return rows


def main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from gd.config import config_path

    @hydra.main(config_path=config_path(), config_name="bench/sampler", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        run(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)))

    _main()


if __name__ == "__main__":
    main()
