"""Logging for gd's processes: one format, the rank in every line, INFO on rank 0 and warnings on the others.

A process started by submitit (SLURM or the local controller), torchrun or DeepSpeed's launcher has no logging
handler until someone adds one, and Python then prints only warnings and errors: the trainer's ``log.info`` lines
(resumed from, done at step, ...) were lost. Every entry point calls :func:`configure_logging` first.
"""
from __future__ import annotations

import logging
import sys

from gd.distributed import env as _env

FORMAT = "%(asctime)s [rank {rank}] %(name)s %(levelname)s: %(message)s"


def env_rank() -> int:
    """This process's global rank from the launcher's environment (:func:`gd.distributed.env.rank`), 0 if none."""
    return _env.rank()


def configure_logging(rank: int | None = None) -> None:
    """Root logger to stderr: INFO on rank 0, WARNING elsewhere (every rank logs the same progress). Replaces
    handlers an earlier call installed; submitit's own logger keeps its handlers and stops propagating (else its
    lines would print twice)."""
    rank = env_rank() if rank is None else int(rank)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT.format(rank=rank)))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_gd", False)]:
        root.removeHandler(old)
    handler._gd = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("submitit").propagate = False
