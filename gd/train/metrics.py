"""Training observability: throughput, FLOP/s and MFU, and the rank-0 sinks: a JSONL log, tensorboard, wandb
(optional, gd.train.tracking) and a progress bar.

FLOPs are analytic (``gd.models.flops.forward_flops``, group attention over N*L keys included), x3 for a
training step (forward + backward), counted per step at that step's group size.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gd.io import atomic_write_text


class Throughput:
    """Images/s, TFLOP/s per device and MFU over a window of steps."""

    def __init__(self, model: torch.nn.Module, world_size: int, peak_tflops: float) -> None:
        from gd.models.flops import forward_flops

        self._fwd = lambda n: forward_flops(model, group_size=n)
        self._cache: dict[int, float] = {}
        self.world_size = world_size
        self.peak_tflops = float(peak_tflops)
        self.reset()

    def train_flops_per_image(self, group_size: int) -> float:
        if group_size not in self._cache:
            self._cache[group_size] = 3.0 * self._fwd(group_size)
        return self._cache[group_size]

    def reset(self) -> None:
        self.images = 0
        self.flops = 0.0
        self.start = time.perf_counter()

    def add(self, images: int, group_size: int) -> None:
        """Record one optimizer step of ``images`` images (all ranks) at ``group_size``."""
        self.images += images
        self.flops += images * self.train_flops_per_image(group_size)

    def read(self) -> dict[str, float]:
        """Window statistics since the last reset, then reset."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = max(time.perf_counter() - self.start, 1e-9)
        tflops = self.flops / dt / 1e12 / self.world_size
        out = {"img_per_s": self.images / dt, "tflops_per_device": tflops,
               "mfu": tflops / self.peak_tflops if self.peak_tflops > 0 else math.nan}
        self.reset()
        return out


class MetricsLogger:
    """Rank-0 sinks: ``metrics.jsonl`` (one JSON object per logged step), tensorboard under ``tb/``, a wandb run when
    one is given (opened after ``metrics.jsonl`` is cut back to ``start_step``), tqdm bar; images (sample grids) go
    to tensorboard and wandb."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, total_steps: int, start_step: int,
                 progress: bool = True, wandb: Callable[[], Any] | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.truncate(start_step)
        if wandb is not None:
            self._wandb = wandb()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1)
        except ImportError:
            self._tb = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                             mininterval=5.0)

    @classmethod
    def for_run(cls, cfg: Any, enabled: bool, start_step: int) -> MetricsLogger:
        """The sinks of the run ``cfg``: JSONL and tensorboard, wandb when ``train.wandb.enabled``."""
        from gd.train.tracking import WandbSink, wandb_requested

        wandb = (lambda: WandbSink(cfg, start_step)) if wandb_requested(cfg) else None
        return cls(cfg.run.dir, enabled, int(cfg.train.steps), start_step,
                   progress=bool(cfg.train.get("progress", True)), wandb=wandb)

    def truncate(self, step: int) -> None:
        """Drop records after ``step`` (a resumed run re-does those steps and logs them again)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log(step, values)
        if self._bar is not None and "loss" in values:
            self._bar.set_postfix(loss=f"{values['loss']:.4f}",
                                  ips=f"{values.get('img_per_s', float('nan')):.1f}", refresh=False)

    def log_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A uint8 H x W x 3 image (a sample grid) at ``step``."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.add_image(tag, image, step, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log_image(step, tag, image)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()
        if self._bar is not None:
            self._bar.close()


class StepLog:
    """The metrics of the steps since the last log line; owns the log cadence (``train.log_every``).

    ``loss`` is the mean objective of the window's applied steps; ``loss_cond`` / ``loss_group`` the per-image loss
    of conditional and group micro-batches (with ``loss_reduction=group_sum`` a group's objective sums its N
    members, so only these two compare across kinds); ``group_frac`` the fraction of images in group micro-batches.
    """

    def __init__(self, logger: MetricsLogger, throughput: Throughput, every: int, last_step: int) -> None:
        self.logger, self.throughput = logger, throughput
        self.every, self.last_step = int(every), int(last_step)
        self._reset()
        throughput.reset()

    def _reset(self) -> None:
        self.loss, self.n = 0.0, 0
        self.by_kind = {"cond": [0.0, 0], "group": [0.0, 0]}
        self.micro, self.group_micro = 0, 0

    def add(self, micro_batch: int, result: Any, group_size: int) -> None:
        """One optimizer step (a :class:`gd.train.trainer.StepResult`) of micro-batches of ``micro_batch`` images,
        its group micro-batches at ``group_size``."""
        groups = int(result.group_micro.sum())
        self.micro += result.group_micro.size
        self.group_micro += groups
        self.throughput.add(micro_batch * groups, group_size)
        self.throughput.add(micro_batch * (result.group_micro.size - groups), 1)
        if result.loss is None:
            return
        self.loss += result.loss
        self.n += 1
        for kind, value in (("cond", result.loss_cond), ("group", result.loss_group)):
            if value is not None:
                self.by_kind[kind][0] += value
                self.by_kind[kind][1] += 1

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last_step

    def maybe_log(self, step: int, values: dict[str, Any]) -> bool:
        """Write the window's record (plus ``values``) when ``step`` is due; returns whether it did."""
        if not self.due(step):
            return False
        self.logger.log(step, {
            "loss": self.loss / self.n if self.n else math.nan, **values, **self.throughput.read(),
            **{f"loss_{k}": v[0] / v[1] for k, v in self.by_kind.items() if v[1]},
            "group_frac": self.group_micro / max(self.micro, 1),
        })
        self._reset()
        return True
