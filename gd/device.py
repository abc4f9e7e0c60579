"""Which accelerator a process uses: one rule for the trainer, DeepSpeed, the shard builder's models and sampling.

A rank uses GPU ``LOCAL_RANK % device_count``. Nodes that show every task all their GPUs give rank i GPU i; sites
that bind one GPU per task (``CUDA_VISIBLE_DEVICES`` set per task, or ``--gpus-per-task=1``) show each task a single
device, which is then device 0 whatever its LOCAL_RANK: ``cuda:LOCAL_RANK`` there fails with "invalid device
ordinal". DeepSpeed picks ``LOCAL_RANK`` by itself unless told otherwise, so :func:`gd.train.engine.build_engine`
hands it this index.
"""
from __future__ import annotations

import os

import torch


def local_rank() -> int:
    """This process's rank on its node: LOCAL_RANK (torchrun, submitit), else SLURM_LOCALID (a bare srun), else 0."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def device_index(rank_on_node: int, device_count: int) -> int:
    """The GPU a process with ``rank_on_node`` uses among the ``device_count`` it sees."""
    if device_count < 1:
        raise ValueError(f"device_count={device_count}: no GPU to choose from")
    return int(rank_on_node) % int(device_count)


def local_device(spec: str = "auto") -> torch.device:
    """``"auto"``/``"cuda"``: this process's GPU by the rule above (``"auto"`` falls back to the CPU without CUDA);
    anything else (``"cpu"``, ``"cuda:3"``) as given."""
    if spec in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", device_index(local_rank(), torch.cuda.device_count()))
    if spec == "auto":
        return torch.device("cpu")
    return torch.device(spec)
