"""What the trainer reads: micro-batches of latents and labels, plain or grouped, group-major.

:class:`StreamingData` serves a run from the shards (gd.data.loader's plain and group streams, a new epoch whenever
one ends, state in checkpoints); :class:`SyntheticData` serves fixed random latents so the benchmarks time the
trainer's own step without a data pipeline.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from gd.diffusion.plan import BatchLayout


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


class StreamingData:
    """The run's two shard streams; ``next(grouped)`` gives one micro-batch ``(x, y)`` of ``micro_batch`` images."""

    def __init__(self, data_cfg: Any, layout: BatchLayout, group_size: int, seed: int, rank: int,
                 world_size: int) -> None:
        from gd.data.loader import build_loaders

        plain, group = build_loaders(data_cfg, group_size=group_size, micro_batch=layout.micro_batch, seed=seed,
                                     rank=rank, world_size=world_size)
        self.loaders = {"plain": plain, "group": group}
        self._batches = {k: _Epochs(v) for k, v in self.loaders.items()}

    def next(self, grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, C, H, W) and labels (B,), group-major when ``grouped`` (anchor first in each group)."""
        if grouped:
            batch = self._batches["group"].next()
            return batch["latent"].flatten(0, 1), batch["label"].flatten(0, 1)
        batch = self._batches["plain"].next()
        return batch["latent"], batch["label"]


class SyntheticData:
    """The same random micro-batch (on the host, like a loader's) on every call, for benchmarks; shapes from
    ``cfg.model``; no loader state to checkpoint."""

    loaders: dict[str, Any] = {}

    def __init__(self, model_cfg: Any, micro_batch: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        c, s = int(model_cfg.in_channels), int(model_cfg.input_size)
        self.x = torch.randn(micro_batch, c, s, s, generator=g)
        self.y = torch.randint(0, int(model_cfg.num_classes), (micro_batch,), generator=g)

    def next(self, grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y
