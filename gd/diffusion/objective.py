"""The group flow-matching objective: time sampling, intra-group timestep spread (sigma_tv) and the group loss.

Time convention (official SiT): t = 0 noise, t = 1 data, x_t = t x1 + (1 - t) x0, target u = x1 - x0.
Every random draw takes an explicit ``torch.Generator`` so a training step can be replayed exactly.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gd.diffusion.path import LinearPath, Path
from gd.diffusion.plan import Shard, check_groups

VelocityModel = Callable[..., Tensor]

# SD3's default shift for high-resolution flow matching; used when the bare string "shifted" is given.
DEFAULT_SHIFT = 3.0


@dataclass(frozen=True)
class TimeSampler:
    """How training times t in [0, 1] are drawn.

    kind: "uniform" (SiT) or "logit_normal" (t = sigmoid(mean + std z), SD3).
    shift: s >= 1 moves mass towards the noise end (t = 0). It acts on the noise level 1 - t as in SD3,
    tau' = s tau / (1 + (s - 1) tau), so shift = 1 leaves the distribution unchanged.
    """

    kind: str = "uniform"
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "logit_normal"):
            raise ValueError(f"time sampling kind {self.kind!r} is not 'uniform' or 'logit_normal'")
        if not self.std > 0:
            raise ValueError(f"logit-normal std must be > 0, got {self.std}")
        if not self.shift >= 1.0:
            raise ValueError(f"time shift must be >= 1, got {self.shift}")

    @classmethod
    def from_spec(cls, spec: str | TimeSampler | Mapping[str, Any]) -> TimeSampler:
        """From "uniform" | "logit_normal" | "shifted" (uniform, shift 3), a TimeSampler, or a config mapping
        with keys time_sampling, logit_mean, logit_std, time_shift (the keys of conf/diffusion/*.yaml)."""
        if isinstance(spec, TimeSampler):
            return spec
        if isinstance(spec, str):
            if spec == "shifted":
                return cls("uniform", shift=DEFAULT_SHIFT)
            return cls(spec)
        if isinstance(spec, Mapping):
            kind = spec.get("time_sampling", "uniform")
            shift = float(spec.get("time_shift", DEFAULT_SHIFT if kind == "shifted" else 1.0))
            return cls("uniform" if kind == "shifted" else kind, float(spec.get("logit_mean", 0.0)),
                       float(spec.get("logit_std", 1.0)), shift)
        raise TypeError(f"time sampling spec must be a str, TimeSampler or mapping, got {type(spec).__name__}")

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
        """n float32 times in [0, 1]."""
        gdev = generator.device if generator is not None else torch.device("cpu")
        if self.kind == "uniform":
            t = torch.rand(n, generator=generator, device=gdev)
        else:
            t = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, device=gdev))
        return self._shifted(t).to(device if device is not None else gdev)

    def quantile(self, u: Tensor) -> Tensor:
        """The times at cumulative probabilities ``u`` in (0, 1) of this distribution (its inverse CDF; the shift
        is monotone, so it maps quantiles to quantiles)."""
        if self.kind == "uniform":
            t = u.float()
        else:
            t = torch.sigmoid(self.mean + self.std * 2.0 ** 0.5 * torch.erfinv(2.0 * u.float() - 1.0))
        return self._shifted(t)

    def _shifted(self, t: Tensor) -> Tensor:
        if self.shift == 1.0:
            return t
        tau = 1.0 - t
        return 1.0 - self.shift * tau / (1.0 + (self.shift - 1.0) * tau)


SIGMA_TV_DRAWS = ("window", "anchor")
REDUCTIONS = ("mean", "group_sum")


def group_timesteps(num_groups: int, group_size: int, *, sigma_tv: float = 0.0,
                    generator: torch.Generator | None = None, device: torch.device | str | None = None,
                    time_sampling: str | TimeSampler = "uniform", sigma_tv_draw: str = "window") -> Tensor:
    """Times for a group-major batch, shape (num_groups * group_size,): one base time b per group from the time
    sampler, spread by sigma_tv (model time units) within the group.

    sigma_tv_draw "window" (the released code): every member, the first too, draws uniformly from the window
    [max(0, b - sigma_tv), min(1, b + sigma_tv)]. "anchor" (this repo before the released recipe): the first
    member keeps b, the others draw b + U(-sigma_tv, sigma_tv) clamped to [0, 1]. sigma_tv = 0 gives one t per
    group either way.
    """
    if num_groups < 1 or group_size < 1:
        raise ValueError(f"need num_groups >= 1 and group_size >= 1, got {num_groups} and {group_size}")
    if not 0.0 <= sigma_tv <= 1.0:
        raise ValueError(f"sigma_tv must be in [0, 1] (model time units), got {sigma_tv}")
    if sigma_tv_draw not in SIGMA_TV_DRAWS:
        raise ValueError(f"sigma_tv_draw={sigma_tv_draw!r}: expected one of {SIGMA_TV_DRAWS}")
    sampler = TimeSampler.from_spec(time_sampling)
    gdev = generator.device if generator is not None else torch.device("cpu")
    base = sampler.sample(num_groups, generator, gdev)
    if group_size == 1 or sigma_tv == 0.0:
        t = base.repeat_interleave(group_size)
    elif sigma_tv_draw == "window":
        lo = (base - sigma_tv).clamp(min=0.0)[:, None]
        hi = (base + sigma_tv).clamp(max=1.0)[:, None]
        t = (lo + (hi - lo) * torch.rand(num_groups, group_size, generator=generator, device=gdev)).reshape(-1)
    else:
        offset = (2.0 * torch.rand(num_groups, group_size, generator=generator, device=gdev) - 1.0) * sigma_tv
        offset[:, 0] = 0.0
        t = (base[:, None] + offset).clamp_(0.0, 1.0).reshape(-1)
    return t.to(device if device is not None else gdev)


def group_loss(model: VelocityModel, x1: Tensor, y: Tensor, group_size: int, *, t: Tensor | None = None,
               noise: Tensor | None = None, sigma_tv: float = 0.0, generator: torch.Generator | None = None,
               time_sampling: str | TimeSampler = "uniform", path: Path | None = None,
               reduction: str = "mean", sigma_tv_draw: str = "window",
               shard: Shard | None = None) -> tuple[Tensor, Tensor]:
    """GroupDiff's objective for a group-major batch x1 of shape (G*N, C, H, W).

    Returns (loss, per_image_mse), per_image_mse the velocity MSE of each image (mean over C, H, W, in fp32).
    reduction "mean" (the released code): the mean over all images, so every image of a step weighs the same
    whatever its group size. "group_sum" (the paper's L_Group): summed over the N members of each group, then
    averaged over the G groups, so a group image weighs N times a conditional one. With N = 1 both are SiT's mean
    velocity MSE. ``model(x_t, t, y, group_size)`` must return a velocity of x1's shape; the time draws (t, then
    noise) come from ``generator`` in that order, see :func:`group_timesteps`.

    ``shard`` (group parallelism, gd.diffusion.plan.Shard): x1 and y are the replica's whole micro-batch; t and
    the noise are drawn for all of it, the model sees this rank's rows only, and the loss and per_image_mse are
    this rank's (:meth:`Shard.reduce`: the P ranks' losses add up to P times the replica's).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}")
    if x1.ndim < 2:
        raise ValueError(f"x1 must be (G*N, ...), got shape {tuple(x1.shape)}")
    batch = x1.shape[0]
    groups = check_groups(batch, group_size)
    if y.shape[0] != batch:
        raise ValueError(f"labels have {y.shape[0]} entries for a batch of {batch}")
    if t is None:
        t = group_timesteps(groups, group_size, sigma_tv=sigma_tv, generator=generator, device=x1.device,
                            time_sampling=time_sampling, sigma_tv_draw=sigma_tv_draw)
    elif t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
    if noise is None:
        gdev = generator.device if generator is not None else x1.device
        noise = torch.randn(x1.shape, generator=generator, device=gdev, dtype=x1.dtype).to(x1.device)
    elif noise.shape != x1.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x1 shape {tuple(x1.shape)}")
    path = path or LinearPath()
    x_t = path.x_t(t, noise, x1)
    target = path.velocity(t, noise, x1)
    shard = shard or Shard()
    x_t, t, y, target = (shard.take(v, group_size) for v in (x_t, t, y, target))
    pred = model(x_t, t, y, group_size)
    if pred.shape != x_t.shape:
        raise ValueError(f"model returned shape {tuple(pred.shape)}, expected the input's {tuple(x_t.shape)}")
    per_image = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, x1.ndim)))
    return shard.reduce(per_image, group_size, reduction), per_image

