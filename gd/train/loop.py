"""The training loop: model + batch plan + loaders + DeepSpeed engine + EMA + checkpoints + metrics.

One optimizer step = ``grad_accum`` micro-steps of ``micro_batch`` images on every rank. The batch plan
(gd.diffusion.plan) decides per step whether it is a conditional step (plain loader, group size 1) or a group step
(group loader, group size N); both hold the same number of images. Every random draw of a step (labels dropped,
t, noise) comes from generators seeded by (seed, step, rank, micro), and the loaders resume from their saved
state, so a resumed run repeats the uninterrupted one bit for bit on CPU.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from gd.io import atomic_write_text
from gd.train import engine as eng
from gd.train.checkpoint import CheckpointManager, export_ema, model_signature
from gd.train.ema import ShardedEMA
from gd.train.metrics import MetricsLogger, Throughput

log = logging.getLogger("gd.train")


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss or gradient."""


class _Epochs:
    """Endless batches from a loader: a new epoch (``iter``) whenever one ends; created on first use."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._it: Iterator | None = None

    def next(self) -> dict[str, torch.Tensor]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise RuntimeError("the data loader yields no batch at all: the dataset is smaller than one micro batch "
                           "per rank (check data.root and train.micro_batch)")


def _check_train_cfg(t: Any) -> None:
    problems = []
    for key in ("steps", "log_every", "ckpt_every", "keep_last", "max_nonfinite"):
        value = t.get(key)
        minimum = 0 if key == "steps" else 1
        if value is None or int(value) < minimum:
            problems.append(f"train.{key}={value}: expected an integer >= {minimum}")
    if float(t.get("lr", 0)) <= 0:
        problems.append(f"train.lr={t.get('lr')}: expected > 0")
    if problems:
        raise ValueError("invalid train config:\n  " + "\n  ".join(problems))


def _model_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    return {k: v for k, v in kwargs.items() if v is not None or k in ("group_layers", "group_t_window")}


def _fault(cfg: DictConfig, key: str) -> Any:
    debug = cfg.train.get("debug") or {}
    return debug.get(key)


def train(cfg: DictConfig, stop_requested: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train (or resume) the run ``cfg.run.dir`` to ``cfg.train.steps`` optimizer steps.

    Returns ``{"preempted", "step", "skipped_steps", "loss", "run_dir", "ema"}``. When ``stop_requested()`` is true
    on any rank, every rank saves a checkpoint and the call returns with ``preempted=True``.
    """
    t_cfg, d_cfg = cfg.train, cfg.diffusion
    _check_train_cfg(t_cfg)
    rank, world, _ = eng.dist_env()
    n = int(d_cfg.group_size) if d_cfg.mode != "none" else 1
    layout = eng.batch_layout(t_cfg, world, n if eng.uses_groups(d_cfg) else 1, int(cfg.model.max_group_size))
    eng.deepspeed_config(t_cfg, layout)  # rejects bad stage/precision before any process starts work
    run_dir = Path(cfg.run.dir)
    ckpt = CheckpointManager(run_dir, int(t_cfg.keep_last), rank, world)
    latest = ckpt.latest()
    meta: dict[str, Any] = {}
    if latest is not None:
        meta = ckpt.check_compatible(latest, cfg.model)

    d = eng.init_distributed()
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    ckpt.clean_partial()
    random.seed(int(cfg.seed) + d.rank)
    np.random.seed((int(cfg.seed) + d.rank) % 2**32)
    torch.manual_seed(int(cfg.seed))  # identical initial weights on every rank (ZeRO-3 partitions each rank's copy)

    from gd.data.loader import build_loaders
    from gd.diffusion.objective import group_loss
    from gd.diffusion.plan import BatchPlan
    from gd.models import build_model, cross_attention_score

    kwargs = _model_kwargs(cfg)
    model = build_model(kwargs.pop("name"), **kwargs)
    model_config = dict(model.config)
    throughput = Throughput(model, d.world_size, float(t_cfg.peak_tflops))
    engine, optimizer = eng.build_engine(model, t_cfg, layout, d.device)
    zero3 = int(t_cfg.zero_stage) == 3
    ema = ShardedEMA(engine.module, float(t_cfg.ema_decay), zero3=zero3, optimizer=engine.optimizer)
    plan = BatchPlan(d_cfg.mode, n, float(d_cfg.p_group), float(cfg.model.class_dropout_prob),
                     int(cfg.model.num_classes), int(cfg.seed))
    plain_loader, group_loader = build_loaders(cfg.data, group_size=n, micro_batch=layout.micro_batch,
                                               seed=int(cfg.seed), rank=d.rank, world_size=d.world_size)
    loaders = {"plain": plain_loader, "group": group_loader}
    start = 0
    skipped_total = int(meta.get("skipped_steps", 0))
    if latest is not None:
        ckpt.load(latest, engine, ema, loaders)
        start = int(meta["step"])
        if d.is_main:
            log.warning("resumed from %s (step %d)", latest, start)
    batches = {k: _Epochs(v) for k, v in loaders.items()}

    steps = int(t_cfg.steps)
    metrics = MetricsLogger(run_dir, d.is_main, steps, start, progress=bool(t_cfg.get("progress", True)))
    sigma_tv, time_sampling = float(d_cfg.sigma_tv), str(d_cfg.time_sampling)
    s_cross_every = int(t_cfg.get("s_cross_every") or 0)
    nan_steps = set(int(s) for s in (_fault(cfg, "nan_steps") or []))
    kill_step = _fault(cfg, "kill_in_checkpoint")
    step_delay = float(_fault(cfg, "step_delay_s") or 0.0)
    dtype_note = eng.engine_dtype(engine)

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, group_size: int) -> torch.Tensor:
        return engine(x, t, y, group_size=group_size)

    def save(step: int) -> None:
        def hook(stage: str) -> None:
            if kill_step is not None and int(kill_step) == step and d.is_main:
                os.kill(os.getpid(), signal.SIGKILL)

        ckpt.save(step, engine, ema, loaders,
                  {"skipped_steps": skipped_total, "model_signature": model_signature(cfg.model),
                   "model_config": model_config, "time": time.time()}, cfg, fault_hook=hook)

    in_a_row, window_loss, window_n, last_loss = 0, 0.0, 0, math.nan
    # Per-image loss by step kind: a group step's objective sums N members, so `loss` alone mixes scales.
    by_kind = {"cond": [0.0, 0], "group": [0.0, 0]}
    last_group: tuple[torch.Tensor, torch.Tensor, int] | None = None
    preempted = False
    step = start
    throughput.reset()
    try:
        while step < steps:
            sp = plan.step(step)
            # Summed on the device and read once per step (one host sync), together with the stop flag.
            acc = torch.zeros(3, dtype=torch.float64, device=d.device)
            if zero3:
                _clear_zero3_grads(engine)
            for micro in range(layout.grad_accum):
                if sp.is_group:
                    batch = batches["group"].next()
                    x, y = batch["latent"].flatten(0, 1), batch["label"].flatten(0, 1)
                else:
                    batch = batches["plain"].next()
                    x, y = batch["latent"], batch["label"]
                x = x.to(d.device, non_blocking=True)
                if step in nan_steps:
                    x = x * float("nan")
                y = plan.labels(step, y, rank=d.rank, micro=micro).to(d.device, non_blocking=True)
                gen = plan.generator(step, rank=d.rank, micro=micro, device=d.device)
                loss, _ = group_loss(forward, x, y, sp.group_size, sigma_tv=sigma_tv, generator=gen,
                                     time_sampling=time_sampling)
                engine.backward(loss)
                value = loss.detach().double()
                finite = torch.isfinite(value)
                acc[0] += torch.where(finite, value, torch.zeros_like(value))
                acc[1] += (~finite).double()
                if micro == layout.grad_accum - 1:
                    if stop_requested is not None and stop_requested():
                        acc[2] = 1.0
                    if dist.is_initialized() and d.world_size > 1:
                        dist.all_reduce(acc)
                    loss_sum, bad, stop = acc.tolist()
                    optimizer.force_skip = bad > 0
                    optimizer.last_skipped = False
                engine.step()
                if sp.is_group and s_cross_every:
                    last_group = (x.detach(), y.detach(), sp.group_size)
            skipped = optimizer.last_skipped or not engine.was_step_applied()
            step += 1
            throughput.add(layout.global_batch, sp.group_size)
            if skipped:
                skipped_total += 1
                in_a_row += 1
                if d.is_main:
                    log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, in_a_row)
                if in_a_row >= int(t_cfg.max_nonfinite):
                    raise NonFiniteError(
                        f"{in_a_row} consecutive steps (up to step {step}) had a NaN/inf loss or gradient "
                        f"(train.max_nonfinite={t_cfg.max_nonfinite}); stopping. The last checkpoint is intact: "
                        f"lower train.lr, check the data, or raise train.max_nonfinite")
            else:
                in_a_row = 0
                ema.update()
                last_loss = loss_sum / (layout.grad_accum * d.world_size)
                window_loss += last_loss
                window_n += 1
                kind = by_kind["group" if sp.is_group else "cond"]
                kind[0] += last_loss / sp.group_size
                kind[1] += 1
            metrics.advance()
            if step_delay:
                time.sleep(step_delay)
            if s_cross_every and step % s_cross_every == 0 and last_group is not None:
                scores = _s_cross(engine, last_group, zero3, cross_attention_score)
                metrics.log(step, {"s_cross": float(np.mean(list(scores.values())) if scores else 0.0),
                                   **{f"s_cross_l{k}": v for k, v in scores.items()}})
            if step % int(t_cfg.log_every) == 0 or step == steps:
                stats = throughput.read()
                norm = optimizer.last_grad_norm  # global, before clipping (DeepSpeed's own norm is off)
                metrics.log(step, {
                    "loss": window_loss / window_n if window_n else math.nan, "grad_norm": norm,
                    "lr": float(optimizer.param_groups[0]["lr"]), "group_size": sp.group_size,
                    "skipped_steps": skipped_total, **stats,
                    **{f"loss_{k}": v[0] / v[1] for k, v in by_kind.items() if v[1]},
                })
                window_loss, window_n = 0.0, 0
                by_kind = {"cond": [0.0, 0], "group": [0.0, 0]}
            if stop > 0 and step < steps:
                save(step)
                preempted = True
                break
            if step % int(t_cfg.ckpt_every) == 0 or step == steps:
                save(step)
        if not preempted and d.is_main:
            log.info("training done at step %d (%s)", step, dtype_note)
        ema_state = ema.full_state() if not preempted else None
        if ema_state is not None and d.is_main:
            export_ema(model_config, ema_state, run_dir / "ema.pt")
        if dist.is_initialized():
            dist.barrier()
    finally:
        metrics.close()
    return {"preempted": preempted, "step": step, "skipped_steps": skipped_total, "loss": last_loss,
            "run_dir": str(run_dir), "ema": str(run_dir / "ema.pt")}


def _clear_zero3_grads(engine: Any) -> None:
    """Zero ZeRO-3's flat gradient-partition buffer before a step's first backward.

    DeepSpeed 0.19 ZeRO-3 only writes the gradient partitions of parameters that received a gradient in this
    step and then steps on the whole buffer: a parameter unused in a step (``sample_embed`` on a conditional
    GroupDiff-l step) would be updated again with its last, stale gradient, and a resumed run (fresh, zero
    buffer) would diverge from an uninterrupted one.
    """
    buffer = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
    if isinstance(buffer, torch.Tensor):
        buffer.zero_()


def _s_cross(engine: Any, group: tuple[torch.Tensor, torch.Tensor, int], zero3: bool,
             score: Callable[..., dict[int, float]]) -> dict[int, float]:
    """S_cross of the training model on the last group batch at t = 0.5 (collective under ZeRO-3)."""
    x1, y, n = group
    gen = torch.Generator(device=x1.device).manual_seed(0)
    noise = torch.randn(x1.shape, generator=gen, device=x1.device, dtype=x1.dtype)
    t = torch.full((x1.shape[0],), 0.5, device=x1.device)
    x_t = t.view(-1, *([1] * (x1.ndim - 1))) * x1 + (1 - t.view(-1, *([1] * (x1.ndim - 1)))) * noise
    module = engine.module
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return score(module, x_t, t, y, n)
    return score(module, x_t, t, y, n)
