"""Probes of the training model that run on their own cadence: S_cross, the paper's cross-sample attention score."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gd.diffusion.objectives import FlowObjective, Objective


class SCrossProbe:
    """Every ``every`` steps, S_cross per layer of the training model on the last group batch at signal-to-noise
    ratio 1 (flow t = 0.5; the DDPM step where ᾱ is nearest 1/2), noised as the run's ``objective`` does.

    The trainer shows it each group micro-batch (:meth:`observe`); :meth:`maybe_measure` returns the metrics to log
    when the step is due (a collective under ZeRO-3: every rank calls it). ``every`` = 0 turns it off. Under group
    parallelism the trainer shows it the replica's whole groups and it measures them on every rank of the replica
    with the model's group parallelism switched off (the score needs each group's attention in one place).
    """

    def __init__(self, every: int, zero3: bool, objective: Objective | None = None) -> None:
        self.every = int(every or 0)
        self.zero3 = zero3
        self.objective = objective if objective is not None else FlowObjective()
        self._last: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def observe(self, x1: torch.Tensor, y: torch.Tensor, group_size: int) -> None:
        if self.every and group_size > 1:
            self._last = (x1.detach(), y.detach(), group_size)

    def maybe_measure(self, step: int, engine: Any) -> dict[str, float] | None:
        if not self.every or step % self.every or self._last is None:
            return None
        scores = self.measure(engine.module)
        return {"s_cross": float(np.mean(list(scores.values())) if scores else 0.0),
                **{f"s_cross_l{k}": v for k, v in scores.items()}}

    def measure(self, module: torch.nn.Module) -> dict[int, float]:
        from gd.models import cross_attention_score

        x1, y, n = self._last
        gen = torch.Generator(device=x1.device).manual_seed(0)
        noise = torch.randn(x1.shape, generator=gen, device=x1.device, dtype=x1.dtype)
        x_t, t = self.objective.probe_input(x1, noise)
        slots = module.draw_slots(x1.shape[0], n, gen, whole=True) if module.embed_mode == "cond" else None
        split = module.group_parallel
        module.set_group_parallel(None)
        try:
            if self.zero3:
                import deepspeed

                with deepspeed.zero.GatheredParameters(list(module.parameters())):
                    return cross_attention_score(module, x_t, t, y, n, slots=slots)
            return cross_attention_score(module, x_t, t, y, n, slots=slots)
        finally:
            module.set_group_parallel(split)
