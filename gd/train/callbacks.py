"""Hooks into the training loop: a researcher's profiler or sampler, or a test's fault injection.

A callback subclasses :class:`Callback` and overrides the events it needs; the trainer calls every installed callback
in order. Configured runs install them from ``train.callbacks`` (a list of hydra ``_target_`` nodes), in-process
users pass them to :class:`gd.train.trainer.Trainer`. The trainer itself never injects faults: tests install
callbacks that do (tests/train/faults.py).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gd.train.trainer import Trainer


class Callback:
    """Training events, each a no-op by default."""

    def on_train_start(self, trainer: Trainer, step: int) -> None:
        """Before the first step (``step`` = the step resumed from, 0 for a fresh run)."""

    def on_micro_batch(self, trainer: Trainer, step: int, micro: int, x: torch.Tensor) -> torch.Tensor:
        """The latents of micro-batch ``micro`` of ``step`` before the forward; may return a replacement."""
        return x

    def on_checkpoint_stage(self, trainer: Trainer, step: int, stage: str) -> None:
        """Inside a checkpoint write of ``step`` (``stage``: "engine_saved")."""

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        """After optimizer step ``step`` (1-based: the number of steps done), its metrics and its checkpoint (not
        called for the step a preemption stops at). Work one rank does alone here for more than a few seconds
        belongs inside ``with trainer.timeouts.relaxed(sync=True):`` entered on every rank (the others would wait
        in the next step's collective, which fails after ``train.step_timeout_s``)."""


class CallbackList(Callback):
    """Several callbacks called in order as one."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks: Sequence[Callback] = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"train.callbacks: {cb!r} is not a gd.train.callbacks.Callback")

    def on_train_start(self, trainer: Trainer, step: int) -> None:
        for cb in self.callbacks:
            cb.on_train_start(trainer, step)

    def on_micro_batch(self, trainer: Trainer, step: int, micro: int, x: torch.Tensor) -> torch.Tensor:
        for cb in self.callbacks:
            x = cb.on_micro_batch(trainer, step, micro, x)
        return x

    def on_checkpoint_stage(self, trainer: Trainer, step: int, stage: str) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint_stage(trainer, step, stage)

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        for cb in self.callbacks:
            cb.on_step_end(trainer, step)


def from_config(nodes: Any) -> list[Callback]:
    """Callbacks from ``train.callbacks``: hydra ``{_target_: module.Class, **kwargs}`` nodes (or None)."""
    if not nodes:
        return []
    from hydra.utils import instantiate

    return [instantiate(node) for node in nodes]
