"""Classifier-free guidance with an interval, and GroupDiff group inference, as one velocity callable.

Interval convention: cfg_interval = (t_low, t_high) is in THIS repository's time (official SiT: t = 0 noise,
t = 1 data). Guidance applies where t_low <= t <= t_high; elsewhere only the conditional branch runs, so the
unconditional forward (and its compute) is skipped. The released GroupDiff / REPA code states its interval in
the reverse time (t = 1 noise): their ``guidance_low=0, guidance_high=0.7`` is (0.3, 1.0) here
(see ``gd.diffusion.convert.interval_from_reverse_time``).

Group inference: the batch is G groups of N (group-major). The conditional branch runs with ``group_size``
and the unconditional one with ``uncond_group_size``: GroupDiff-l uses (1, N), GroupDiff-f (N, N). When both
are equal the two branches are one batched forward of 2B images; otherwise they are two forward calls.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

VelocityModel = Callable[..., Tensor]


@dataclass
class CallStats:
    """What a sampling run cost: guided-velocity evaluations (NFE), model forward calls, images through the
    model per branch."""

    nfe: int = 0
    forward_calls: int = 0
    cond_images: int = 0
    uncond_images: int = 0
    guided_nfe: int = 0


def resolve_null_class(model: object, null_class: int | None) -> int | None:
    """The null label: explicit, else model.num_classes (looking through a .module wrapper)."""
    if null_class is not None:
        return int(null_class)
    for obj in (model, getattr(model, "module", None)):
        n = getattr(obj, "num_classes", None)
        if isinstance(n, int):
            return n
    return None


class GuidedVelocity:
    """``(x, t) -> velocity`` for the samplers: conditional model output, guided inside the interval.

    guided = uncond + cfg_scale * (cond - uncond) on all channels, or on the first ``cfg_channels`` channels
    only (the official DiT/SiT "first 3 channels" variant; the other channels keep the conditional output).
    """

    def __init__(self, model: VelocityModel, y: Tensor, *, null_class: int | None = None, cfg_scale: float = 1.0,
                 cfg_interval: tuple[float, float] = (0.0, 1.0), cfg_channels: int | None = None,
                 group_size: int = 1, uncond_group_size: int | None = None) -> None:
        self.model = model
        self.y = y
        self.cfg_scale = float(cfg_scale)
        self.t_low, self.t_high = (float(v) for v in cfg_interval)
        if not 0.0 <= self.t_low <= self.t_high <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= t_low <= t_high <= 1 (t = 0 noise), got {cfg_interval}")
        self.cfg_channels = cfg_channels
        self.group_size = int(group_size)
        self.uncond_group_size = int(uncond_group_size) if uncond_group_size is not None else self.group_size
        self.null_class = resolve_null_class(model, null_class)
        if self.use_cfg and self.null_class is None:
            raise ValueError("cfg_scale != 1 needs the null class: pass null_class or use a model with num_classes")
        self.y_null = torch.full_like(y, self.null_class) if self.null_class is not None else None
        self.stats = CallStats()

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    def guided_at(self, t: float) -> bool:
        """Whether the unconditional branch runs at time t."""
        return self.use_cfg and self.t_low <= t <= self.t_high

    def _forward(self, x: Tensor, t: Tensor, y: Tensor, group_size: int) -> Tensor:
        self.stats.forward_calls += 1
        out = self.model(x, t, y, group_size)
        if out.shape != x.shape:
            raise ValueError(f"model returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        return out

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        t_val = float(t.reshape(-1)[0])
        tb = torch.as_tensor(t, device=x.device).to(torch.promote_types(x.dtype, torch.float32))
        tb = tb.reshape(-1)[:1].expand(batch)
        self.stats.nfe += 1
        self.stats.cond_images += batch
        if not self.guided_at(t_val):
            return self._forward(x, tb, self.y, self.group_size)
        self.stats.guided_nfe += 1
        self.stats.uncond_images += batch
        if self.group_size == self.uncond_group_size:
            both = self._forward(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([self.y, self.y_null]),
                                 self.group_size)
            cond, uncond = both[:batch], both[batch:]
        else:
            cond = self._forward(x, tb, self.y, self.group_size)
            uncond = self._forward(x, tb, self.y_null, self.uncond_group_size)
        return combine(cond, uncond, self.cfg_scale, self.cfg_channels)


def combine(cond: Tensor, uncond: Tensor, scale: float, channels: int | None = None) -> Tensor:
    """uncond + scale * (cond - uncond), on the first `channels` channels only when given."""
    guided = uncond + scale * (cond - uncond)
    if channels is None or channels >= cond.shape[1]:
        return guided
    return torch.cat([guided[:, :channels], cond[:, channels:]], dim=1)
