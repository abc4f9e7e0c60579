"""End-to-end sampling throughput of gd.sample and projected GPU-hours of FID-50K:
``python -m gd.bench.sample [model=sit_xl2] [bench.ckpt=...] [sample.method=sde] ...``.

gd.bench.sampler times the integrators alone (per NFE, per method). This one times the whole gd.sample
pipeline on one GPU (per-index noise, group inference + CFG, decode, PNG/npz writes) for each variant in
``bench.variants`` (sample.* overrides: precision, compile, cfg_interval, ...). Per variant it runs full chunks
at two step counts, fits seconds/image = fixed + per_NFE * NFE (NFE-aware: the fixed part is decode and
writes, the slope is the model), and projects to ``sample.steps`` and ``bench.num_images`` images. The first
chunk of every run is a warm-up (torch.compile) and not timed.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gd.io import atomic_write_bytes
from gd.sample import generate, load_sampling_model


class _Enough(Exception):
    """Raised from the chunk hook once enough chunks are timed."""


def nfe_of(method: str, steps: int) -> int:
    """Model evaluations of a fixed-grid sampler (heun: 2 per step); dopri5 is adaptive and not projected."""
    if method == "dopri5":
        raise ValueError("bench: dopri5 has an adaptive NFE; bench a fixed-grid method (sde, euler, heun)")
    return 2 * steps if method == "heun" else steps


def time_chunks(cfg: DictConfig, model: torch.nn.Module, steps: int, chunks: int, out: Path) -> float:
    """Median seconds per image over ``chunks`` timed chunks (after one warm-up chunk) at ``steps`` steps."""
    per_image: list[float] = []
    last = [time.perf_counter()]

    def hook(chunk: int, images: int) -> None:
        now = time.perf_counter()
        per_image.append((now - last[0]) / images)
        last[0] = now
        if len(per_image) > chunks:
            raise _Enough

    run_cfg = OmegaConf.merge(cfg, {"sample": {"steps": steps, "out": str(out), "png": True, "progress": False}})
    try:
        generate(run_cfg, rank=0, world_size=1, model=model, on_chunk=hook)
    except _Enough:
        pass
    if len(per_image) <= chunks:
        raise ValueError(f"bench: only {len(per_image)} chunks for {chunks} timed + 1 warm-up; raise "
                         "sample.num_images or lower sample.batch_groups")
    return statistics.median(per_image[1:])


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Bench every variant; prints one line each and returns the rows (also written to bench.out)."""
    b, s = cfg.bench, cfg.sample
    low, high = (int(v) for v in b.steps_fit)
    if not 1 < low < high:
        raise ValueError(f"bench.steps_fit={list(b.steps_fit)}: expected two step counts 1 < low < high")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device)
    if b.get("ckpt"):
        model, _ = load_sampling_model(cfg, Path(str(b.ckpt)))
    else:
        from gd.models import build_model

        kw = OmegaConf.to_container(cfg.model, resolve=True)
        with device:
            model = build_model(kw.pop("name"), **kw)
    model.to(device).eval().requires_grad_(False)
    classes = int(model.num_classes)
    n = int(s.group_size)
    # one group per class and enough classes for the timed chunks: every slot is kept, chunks are full
    base = OmegaConf.merge(cfg, {"sample": {"num_images": classes * n, "num_classes": classes}})
    target_nfe = nfe_of(s.method, int(s.steps))
    rows = []
    print(f"{model.config.get('name')}  {device}  mode={s.mode} N={n}  batch={int(s.batch_groups) * n}  "
          f"{s.method} {s.steps} steps (NFE {target_nfe})  cfg={s.cfg_scale}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gd-bench-sample-") as tmp:
        for i, variant in enumerate(b.variants):
            vcfg = OmegaConf.merge(base, {"sample": variant})
            t_low = time_chunks(vcfg, model, low, int(b.chunks), Path(tmp) / f"v{i}_{low}")
            t_high = time_chunks(vcfg, model, high, int(b.chunks), Path(tmp) / f"v{i}_{high}")
            n_low, n_high = nfe_of(s.method, low), nfe_of(s.method, high)
            per_nfe = max((t_high - t_low) / (n_high - n_low), 0.0)
            fixed = max(t_low - per_nfe * n_low, 0.0)
            sec = fixed + per_nfe * target_nfe
            row = {**OmegaConf.to_container(variant, resolve=True), "device": str(device),
                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "model": model.config.get("name"), "method": s.method, "steps": int(s.steps), "nfe": target_nfe,
                   "mode": s.mode, "group_size": n, "batch": int(s.batch_groups) * n, "cfg_scale": float(s.cfg_scale),
                   "ms_per_image_per_nfe": per_nfe * 1e3, "ms_per_image_fixed": fixed * 1e3,
                   "img_per_s": 1.0 / sec, "gpu_hours": float(b.num_images) * sec / 3600,
                   "num_images": int(b.num_images)}
            rows.append(row)
            print(f"{json.dumps(OmegaConf.to_container(variant, resolve=True)):60s} {row['img_per_s']:8.3g} img/s/GPU"
                  f"  {row['ms_per_image_per_nfe']:.3g} ms/img/NFE + {row['ms_per_image_fixed']:.3g} ms/img fixed"
                  f"  -> {b.num_images} images: {row['gpu_hours']:.3g} GPU-h", flush=True)
    if b.get("out"):
        atomic_write_bytes(Path(str(b.out)), json.dumps(rows, indent=1).encode())
    return rows


def main() -> None:
    import hydra

    from gd.config import config_path

    @hydra.main(config_path=config_path(), config_name="bench/sample", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        run(cfg)

    _main()


if __name__ == "__main__":
    main()
