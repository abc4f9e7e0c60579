"""DeepSpeed ZeRO trainer with exact resume: engine, EMA, checkpoints, metrics and the Trainer (``train``)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def train(cfg: Any, stop_requested: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train (or resume) ``cfg.run.dir`` with the callbacks of ``cfg.train.callbacks``; see
    :class:`gd.train.trainer.Trainer` (imported lazily: DeepSpeed is heavy)."""
    from gd.train.callbacks import from_config
    from gd.train.trainer import Trainer

    callbacks = from_config(cfg.train.get("callbacks"))
    return Trainer(cfg, stop_requested=stop_requested, callbacks=callbacks).train()


__all__ = ["train"]
