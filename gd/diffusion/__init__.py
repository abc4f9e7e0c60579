"""Group flow matching (GroupDiff on SiT's linear interpolant): objective, batch plan, samplers, guidance.

Time convention everywhere: official SiT, t = 0 noise, t = 1 data, x_t = t x1 + (1 - t) x0, u = x1 - x0.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gd.diffusion.convert import FromReverseTime, ToReverseTime, interval_from_reverse_time
from gd.diffusion.guidance import CallStats, GuidedVelocity
from gd.diffusion.objective import TimeSampler, group_loss, group_timesteps
from gd.diffusion.path import LinearPath, Path, build_path
from gd.diffusion.plan import BatchPlan, StepPlan
from gd.diffusion import samplers as _s

METHODS = ("sde", "euler", "heun", "dopri5")
LAST_STEPS = ("Mean", "Euler", None)

__all__ = [
    "sample", "group_loss", "group_timesteps", "TimeSampler", "BatchPlan", "StepPlan", "GuidedVelocity",
    "CallStats", "LinearPath", "Path", "build_path", "FromReverseTime", "ToReverseTime",
    "interval_from_reverse_time", "METHODS",
]


@torch.no_grad()
def sample(model: Callable[..., Tensor], noise: Tensor, y: Tensor, method: str = "sde", steps: int = 250,
           cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0), cfg_channels: int | None = None,
           group_size: int = 1, uncond_group_size: int | None = None, generator: torch.Generator | None = None,
           return_trajectory: bool = False, atol: float = 1e-6, rtol: float = 1e-3, *,
           null_class: int | None = None, diffusion_form: str = "sigma", diffusion_norm: float = 1.0,
           last_step: str | None = "Mean", last_step_size: float = 0.04, sample_eps: float = 1e-3,
           path: Path | None = None, stats: CallStats | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate from `noise` (t = 0) to data (t = 1) with the velocity callable ``model(x, t, y, group_size)``.

    method: "euler" / "heun" (fixed grid of `steps` intervals; NFE = steps, resp. 2 * steps), "dopri5" (adaptive with
    atol/rtol; `steps` only sets how many trajectory points are returned), "sde" (SiT's Euler-Maruyama, see
    samplers.py; NFE = steps). `generator` drives the SDE noise. Guidance: see guidance.GuidedVelocity
    (cfg_interval in this repo's time, t = 0 noise). Batches are group-major; `group_size` is the conditional
    branch's group size and `uncond_group_size` (default: group_size) the unconditional one's.
    Returns the final sample, or (final, trajectory) with trajectory of shape (T, *noise.shape) and
    trajectory[0] = noise. Pass a CallStats as `stats` to read the NFE and forward counts afterwards.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if noise.ndim < 2:
        raise ValueError(f"noise must be (B, ...), got shape {tuple(noise.shape)}")
    batch = noise.shape[0]
    if y.shape != (batch,):
        raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ugs = group_size if uncond_group_size is None else uncond_group_size
    for name, n in (("group_size", group_size), ("uncond_group_size", ugs)):
        if int(n) < 1 or batch % int(n) != 0:
            raise ValueError(f"{name}={n} does not divide the batch of {batch} images")
    if cfg_channels is not None and not 1 <= int(cfg_channels) <= noise.shape[1]:
        raise ValueError(f"cfg_channels must be in [1, {noise.shape[1]}] or None, got {cfg_channels}")
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step {last_step!r} is not one of {LAST_STEPS}")
    velocity = GuidedVelocity(model, y, null_class=null_class, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                              cfg_channels=cfg_channels, group_size=group_size, uncond_group_size=ugs)
    if stats is not None:
        velocity.stats = stats
    path = path or LinearPath()
    traj: list[Tensor] | None = [noise] if return_trajectory else None

    if method in ("euler", "heun"):
        grid = _s.uniform_grid(int(steps), like=noise)
        step_fn = _s.euler if method == "euler" else _s.heun
        final = step_fn(velocity, noise, grid, traj)
    elif method == "dopri5":
        n_out = int(steps) if return_trajectory else 1
        states = _s.dopri5(velocity, noise, _s.uniform_grid(n_out, like=noise), atol=atol, rtol=rtol)
        final = states[-1]
        if traj is not None:
            traj = list(states)
    else:
        grid = _s.sde_grid(int(steps), like=noise, form=diffusion_form, last_step=last_step,
                           last_step_size=last_step_size, sample_eps=sample_eps)
        drift, diffusion = _s.sde_from_velocity(velocity, path, form=diffusion_form, norm=diffusion_norm)
        last = {"Mean": drift, "Euler": velocity, None: None}[last_step]
        final = _s.euler_maruyama(drift, diffusion, noise, grid, last_drift=last, last_step_size=last_step_size,
                                  generator=generator, trajectory=traj)
    if traj is not None:
        return final, torch.stack(traj)
    return final
