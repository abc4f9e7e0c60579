"""DeepSpeed ZeRO trainer with exact resume: engine, EMA, checkpoints, metrics and the loop (``train``)."""
from __future__ import annotations

from typing import Any


def train(cfg: Any, stop_requested: Any = None) -> dict[str, Any]:
    """See :func:`gd.train.loop.train` (imported lazily: DeepSpeed is heavy)."""
    from gd.train.loop import train as _train

    return _train(cfg, stop_requested)


__all__ = ["train"]
