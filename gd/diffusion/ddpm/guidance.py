"""Classifier-free guidance for an ε model in DDPM time, with an interval and GroupDiff group inference.

DiT's convention (models.py ``forward_with_cfg``): guided ε = uncond + s (cond - uncond) on the first 3 channels
only (``cfg_channels=3``, kept for exact reproducibility of its numbers; ``None`` guides all C ε channels); the
other ε channels and the learned-variance channels come from the conditional branch. DiT reports FID at
s = 1.5 and shows pictures at s = 4.0.

Interval: cfg_interval = (lo, hi) in ORIGINAL DDPM timestep indices (t = 0 least noisy, 999 noisiest), guidance
where lo <= t <= hi; elsewhere only the conditional branch runs (no unconditional forward). The released GroupDiff
DiT evaluation states it as fractions: ``guidance_low * 1000 <= t <= guidance_high * 1000``.

Group inference as in gd.diffusion.guidance: the batch is G groups of N (group-major); the conditional branch runs
with ``group_size``, the unconditional one with ``uncond_group_size`` (GroupDiff-l: 1 and N; -f: N and N). Equal
sizes batch both branches into one forward of 2B images.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gd.diffusion.guidance import CallStats, combine, resolve_null_class

EpsModel = Callable[..., Tensor]
DIT_CFG_CHANNELS = 3


class GuidedEps:
    """``(x, t) -> model output`` (ε and, when learned, the variance values) with CFG inside the interval.

    t: the original DDPM indices the model sees, shape (B,), one value shared by the batch (samplers step all
    images together). ``model(x, t, y, group_size)`` returns (B, C_out, ...) with C_out >= C = x.shape[1].
    """

    def __init__(self, model: EpsModel, y: Tensor, *, null_class: int | None = None, cfg_scale: float = 1.0,
                 cfg_interval: tuple[float, float] | None = None, cfg_channels: int | None = DIT_CFG_CHANNELS,
                 group_size: int = 1, uncond_group_size: int | None = None) -> None:
        self.model = model
        self.y = y
        self.cfg_scale = float(cfg_scale)
        if cfg_interval is not None:
            lo, hi = (float(v) for v in cfg_interval)
            if not 0.0 <= lo <= hi:
                raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi (DDPM timesteps), got {cfg_interval}")
            cfg_interval = (lo, hi)
        self.cfg_interval = cfg_interval
        if cfg_channels is not None and int(cfg_channels) < 1:
            raise ValueError(f"cfg_channels must be >= 1 or None, got {cfg_channels}")
        self.cfg_channels = cfg_channels
        self.group_size = int(group_size)
        self.uncond_group_size = int(uncond_group_size) if uncond_group_size is not None else self.group_size
        # functools.partial(sit, full_output=True) hides num_classes behind .func
        self.null_class = resolve_null_class(getattr(model, "func", model), null_class)
        if self.use_cfg and self.null_class is None:
            raise ValueError("cfg_scale != 1 needs the null class: pass null_class or use a model with num_classes")
        self.y_null = torch.full_like(y, self.null_class) if self.null_class is not None else None
        self.stats = CallStats()

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    def guided_at(self, t: int) -> bool:
        """Whether the unconditional branch runs at original DDPM timestep t."""
        if not self.use_cfg:
            return False
        return self.cfg_interval is None or self.cfg_interval[0] <= t <= self.cfg_interval[1]

    def _forward(self, x: Tensor, t: Tensor, y: Tensor, group_size: int) -> Tensor:
        self.stats.forward_calls += 1
        out = self.model(x, t, y, group_size)
        if out.shape[0] != x.shape[0] or out.shape[1] < x.shape[1] or out.shape[2:] != x.shape[2:]:
            raise ValueError(f"model returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        return out

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        self.stats.nfe += 1
        self.stats.cond_images += batch
        if not self.guided_at(int(t.reshape(-1)[0])):
            return self._forward(x, t, self.y, self.group_size)
        self.stats.guided_nfe += 1
        self.stats.uncond_images += batch
        if self.group_size == self.uncond_group_size:
            both = self._forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.y, self.y_null]),
                                 self.group_size)
            cond, uncond = both[:batch], both[batch:]
        else:
            cond = self._forward(x, t, self.y, self.group_size)
            uncond = self._forward(x, t, self.y_null, self.uncond_group_size)
        channels = x.shape[1] if self.cfg_channels is None else min(int(self.cfg_channels), x.shape[1])
        return combine(cond, uncond, self.cfg_scale, channels)
