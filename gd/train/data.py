"""What the trainer reads: micro-batches of latents and labels, plain or grouped, group-major.

:class:`StreamingData` serves a run from the shards (gd.data.loader's plain and group streams, a new epoch whenever
one ends, state in checkpoints); :class:`SyntheticData` serves fixed random latents so the benchmarks time the
trainer's own step without a data pipeline.

Streaming starts each epoch with a barrier among a node's ranks, so every rank must read the same number of batches
from each stream at the same point of the program, although ranks hold group and conditional micro-batches in
different orders (gd.diffusion.plan, mix="micro"). The trainer therefore reads a whole block's batches up front
(:meth:`StreamingData.prefetch`, the counts equal on every rank) and the micro-batches take them from per-stream
queues; the queued batches are part of the checkpoint, so a run stopped mid-block resumes bit for bit.

Group parallelism (``layout.group_parallel`` P > 1): both streams are read by replica, the P ranks of one getting
the same batches of ``layout.replica_batch`` images (streaming's ``replication``), and :meth:`StreamingData.next`
returns the replica's whole micro-batch; the trainer's draws cover all of it and each rank computes its rows
(gd.diffusion.plan.Shard). Reading whole groups on every rank costs P times the group stream's bandwidth (latents
are small next to a group's activations) and keeps the draw of a group's N-1 candidates, seeded by (seed, epoch,
sample id), one draw per group.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from gd.diffusion.plan import BatchLayout
from gd.train.nodes import Nodes

log = logging.getLogger("gd.train")


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


class _Queues:
    """Batches read ahead of their micro-batch, per stream; checkpointed with the loaders (a state_dict of
    tensors)."""

    def __init__(self) -> None:
        self.items: dict[str, deque] = {"group": deque(), "plain": deque()}

    def state_dict(self) -> dict[str, list[dict[str, torch.Tensor]]]:
        return {k: [{"x": x, "y": y} for x, y in q] for k, q in self.items.items()}

    def load_state_dict(self, state: dict[str, list[dict[str, torch.Tensor]]]) -> None:
        self.items = {k: deque((b["x"], b["y"]) for b in state.get(k, [])) for k in ("group", "plain")}


def prepare_cache(cache: str, nodes: Nodes) -> None:
    """Before any loader of the run starts (collective): ``cache`` must be node-local, and each node's first rank
    removes what killed ranks of an earlier attempt left in its shared memory for that cache (a requeued job would
    otherwise fail with streaming's "Reused local directory")."""
    from gd.data.loader import clean_stale_streaming
    from gd.io import private_dir

    nodes.check_node_local(cache, "data.cache", prepare=private_dir, fix=(
        "Each node copies and decompresses shards into its cache, and nodes writing one folder collide: use a "
        "folder on each node's own disk (the default is under $TMPDIR or /tmp)"))
    if nodes.leader:
        removed = clean_stale_streaming(cache)
        if removed:
            log.warning("node %s: removed %d stale streaming shared-memory entries of %s (%s ...)", nodes.name,
                        len(removed), cache, removed[0])
    nodes.barrier()


class StreamingData:
    """The run's two shard streams; ``next(grouped)`` gives one micro-batch ``(x, y)`` of ``replica_batch`` images
    (``micro_batch`` x group_parallel), from what :meth:`prefetch` read ahead."""

    def __init__(self, data_cfg: Any, layout: BatchLayout, group_size: int, seed: int, rank: int,
                 world_size: int, nodes: Nodes | None = None, meta: dict | None = None) -> None:
        from gd.data.loader import build_loaders

        if nodes is not None and data_cfg.get("cache"):
            prepare_cache(str(data_cfg.cache), nodes)
        plain, group = build_loaders(data_cfg, group_size=group_size, micro_batch=layout.replica_batch, seed=seed,
                                     rank=rank, world_size=world_size, replication=layout.group_parallel,
                                     meta=meta)
        self.queues = _Queues()
        self.loaders = {"plain": plain, "group": group, "queued": self.queues}
        self._batches = {"plain": _Epochs(plain), "group": _Epochs(group)}

    def prefetch(self, groups: int, plains: int) -> None:
        """Read ``groups`` group batches, then ``plains`` plain ones, into the queues (same counts on every rank)."""
        for stream, count in (("group", groups), ("plain", plains)):
            for _ in range(count):
                batch = self._batches[stream].next()
                x, y = batch["latent"], batch["label"]
                if stream == "group":
                    x, y = x.flatten(0, 1), y.flatten(0, 1)
                self.queues.items[stream].append((x, y))

    def next(self, grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, C, H, W) and labels (B,), group-major when ``grouped`` (anchor first in each group)."""
        queue = self.queues.items["group" if grouped else "plain"]
        if not queue:
            raise RuntimeError(f"no prefetched {'group' if grouped else 'plain'} batch: the trainer reads each "
                               "block's batches with prefetch() before its micro-batches")
        return queue.popleft()


class SyntheticData:
    """The same random micro-batch (on the host, like a loader's) on every call, for benchmarks; shapes from
    ``cfg.model``; no loader state to checkpoint. Under group parallelism ``micro_batch`` is the replica's batch."""

    loaders: dict[str, Any] = {}

    def __init__(self, model_cfg: Any, micro_batch: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        c, s = int(model_cfg.in_channels), int(model_cfg.input_size)
        self.x = torch.randn(micro_batch, c, s, s, generator=g)
        self.y = torch.randint(0, int(model_cfg.num_classes), (micro_batch,), generator=g)

    def prefetch(self, groups: int, plains: int) -> None:
        """Nothing to read ahead."""

    def next(self, grouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y
