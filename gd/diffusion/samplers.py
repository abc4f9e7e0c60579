"""Integrators from noise (t = 0) to data (t = 1). They see only a drift function ``drift(x, t) -> Tensor``
(t a 0-d tensor) and know nothing about models, labels or guidance.

ODE: Euler and Heun on a fixed uniform grid, dopri5 (adaptive, torchdiffeq) with atol/rtol.
SDE: Euler-Maruyama for dx = [v + w(t) score] dt + sqrt(2 w(t)) dW, matching the official SiT sampler
(willisma/SiT transport/transport.py ``sample_sde`` and transport/integrators.py ``sde``): the grid is
linspace(t0, 1 - last_step_size, steps), one noisy step per grid interval, then a noise-free "Mean" step of size
last_step_size with the SDE drift at t = 1 - last_step_size; w(t) = sigma_t ("sigma" form, SiT's CLI default),
score from the velocity through the path. With steps = 250 that is 249 noisy steps + 1 last step = 250 NFE.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gd.diffusion.path import Path

Drift = Callable[[Tensor, Tensor], Tensor]


def uniform_grid(steps: int, t0: float = 0.0, t1: float = 1.0, *, like: Tensor) -> Tensor:
    """steps + 1 equally spaced times from t0 to t1, on like's device, in at least float32."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dtype = torch.promote_types(like.dtype, torch.float32)
    return torch.linspace(t0, t1, steps + 1, dtype=dtype, device=like.device)


def euler(drift: Drift, x: Tensor, grid: Tensor, trajectory: list[Tensor] | None = None) -> Tensor:
    """Explicit Euler on `grid` (first order): one drift evaluation per interval."""
    for i in range(grid.shape[0] - 1):
        x = x + (grid[i + 1] - grid[i]).to(x.dtype) * drift(x, grid[i])
        if trajectory is not None:
            trajectory.append(x)
    return x


def heun(drift: Drift, x: Tensor, grid: Tensor, trajectory: list[Tensor] | None = None) -> Tensor:
    """Heun's method (explicit trapezoid, second order) on `grid`: two drift evaluations per interval,
    including the last one (a velocity model is well defined at t = 1)."""
    for i in range(grid.shape[0] - 1):
        h = (grid[i + 1] - grid[i]).to(x.dtype)
        d1 = drift(x, grid[i])
        d2 = drift(x + h * d1, grid[i + 1])
        x = x + 0.5 * h * (d1 + d2)
        if trajectory is not None:
            trajectory.append(x)
    return x


def dopri5(drift: Drift, x: Tensor, t_out: Tensor, *, atol: float = 1e-6, rtol: float = 1e-3) -> Tensor:
    """Adaptive Dormand-Prince 5(4) through torchdiffeq; returns the states at t_out, shape (len(t_out), *x)."""
    from torchdiffeq import odeint

    if not (atol > 0 and rtol > 0):
        raise ValueError(f"atol and rtol must be > 0, got atol={atol}, rtol={rtol}")
    # step_t makes the solver land on the end time instead of stepping past it and interpolating back
    # (torchdiffeq's default, which the official SiT sampler inherits): a model is never asked for t > 1.
    return odeint(lambda t, state: drift(state, t), x, t_out, method="dopri5", atol=atol, rtol=rtol,
                  options={"step_t": t_out[-1:]})


def sde_from_velocity(velocity: Drift, path: Path, *, form: str = "sigma",
                      norm: float = 1.0) -> tuple[Drift, Callable[[Tensor, Tensor], Tensor]]:
    """(SDE drift, diffusion w) for a velocity field on `path`: drift = v + w(t) * score(v), as in SiT's
    ``Sampler.__get_sde_diffusion_and_drift`` with a velocity model."""

    def diffusion(x: Tensor, t: Tensor) -> Tensor:
        return path.diffusion(t.reshape(1).expand(x.shape[0]), x, form=form, norm=norm)

    def drift(x: Tensor, t: Tensor) -> Tensor:
        v = velocity(x, t)
        tb = t.reshape(1).expand(x.shape[0])
        return v + diffusion(x, t) * path.score_from_velocity(v, x, tb)

    return drift, diffusion


def euler_maruyama(drift: Drift, diffusion: Callable[[Tensor, Tensor], Tensor], x: Tensor, grid: Tensor, *,
                   last_drift: Drift | None = None, last_step_size: float = 0.0,
                   generator: torch.Generator | None = None, trajectory: list[Tensor] | None = None) -> Tensor:
    """Euler-Maruyama over the intervals of `grid`, then (if last_drift) one noise-free step of size
    last_step_size from grid[-1]: x <- x + last_drift(x, grid[-1]) * last_step_size (SiT's last step)."""
    gdev = generator.device if generator is not None else x.device
    for i in range(grid.shape[0] - 1):
        t, dt = grid[i], (grid[i + 1] - grid[i]).to(x.dtype)
        w = diffusion(x, t)
        dw = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device) * dt.sqrt()
        x = x + drift(x, t) * dt + torch.sqrt(2 * w) * dw
        if trajectory is not None:
            trajectory.append(x)
    if last_drift is not None:
        x = x + last_drift(x, grid[-1]) * last_step_size
        if trajectory is not None:
            trajectory.append(x)
    return x


def sde_grid(steps: int, *, like: Tensor, form: str = "sigma", last_step: str | None = "Mean",
             last_step_size: float = 0.04, sample_eps: float = 1e-3) -> Tensor:
    """SiT's SDE time grid for a velocity model on the linear path: linspace(t0, t1, steps) with
    t0 = sample_eps for the "SBDM" form (official SiT: 1e-3, where its unclamped diffusion is finite; the released
    GroupDiff sampler: 0, its diffusion clamped) else 0, and t1 = 1 - last_step_size when there is a last step,
    else 1 - sample_eps (``Transport.check_interval``)."""
    if steps < 2:
        raise ValueError(f"the SDE sampler needs steps >= 2, got {steps}")
    if last_step is not None and not 0.0 < last_step_size < 1.0:
        raise ValueError(f"last_step_size must be in (0, 1), got {last_step_size}")
    t0 = sample_eps if form == "SBDM" else 0.0
    t1 = 1.0 - last_step_size if last_step is not None else 1.0 - sample_eps
    return uniform_grid(steps - 1, t0, t1, like=like)
