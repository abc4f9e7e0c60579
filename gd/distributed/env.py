"""Where this process runs: its rank, the world size, its rank on the node and its accelerator, the one rule for the
trainer, DeepSpeed, sampling, evaluation, the shard builder and the benchmarks.

The launcher's variables are read in this order: torchrun's (``RANK`` and ``WORLD_SIZE``, with ``LOCAL_RANK``; also
what submitit and DeepSpeed's launcher export), else a SLURM step's (``SLURM_PROCID`` of ``SLURM_STEP_NUM_TASKS``,
``SLURM_LOCALID``: set only inside ``srun``, so a batch script run directly stays one process), else one process.
A rank uses GPU ``local_rank % device_count``: nodes that show every task all their GPUs give local rank i GPU i;
sites that bind one GPU per task show each task a single device, which is then device 0 whatever its local rank.
This module imports no torch at import time (the launcher reads it too).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Place:
    """This process's place in the job and which launcher said so (``torchrun``, ``slurm`` or ``single``)."""

    rank: int
    world_size: int
    local_rank: int
    source: str


def place(env: Mapping[str, str] | None = None) -> Place:
    """This process's :class:`Place` from ``env`` (default: the environment), by the order in the module doc."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Place(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return Place(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]),
                     int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0))), "slurm")
    return Place(0, 1, int(env.get("LOCAL_RANK", 0)), "single")


def rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank (0 for a lone process)."""
    return place(env).rank


def world_size(env: Mapping[str, str] | None = None) -> int:
    """How many processes the job has (1 for a lone process)."""
    return place(env).world_size


def local_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank on its node (0 for a lone process)."""
    return place(env).local_rank


def device_index(rank_on_node: int, device_count: int) -> int:
    """The GPU a process with ``rank_on_node`` uses among the ``device_count`` it sees."""
    if device_count < 1:
        raise ValueError(f"device_count={device_count}: no GPU to choose from")
    return int(rank_on_node) % int(device_count)


def local_device(spec: str = "auto", env: Mapping[str, str] | None = None) -> torch.device:
    """``"auto"``/``"cuda"``: this process's GPU by the rule above (``"auto"`` falls back to the CPU without CUDA);
    anything else (``"cpu"``, ``"cuda:3"``) as given."""
    import torch

    if spec in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", device_index(local_rank(env), torch.cuda.device_count()))
    if spec == "auto":
        return torch.device("cpu")
    return torch.device(spec)


def bind_device(device: torch.device) -> None:
    """Make a CUDA device the current one: otherwise plain "cuda" allocations (xformers' build check, library
    workspaces) land on GPU 0 while the model sits on this rank's GPU."""
    import torch

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
