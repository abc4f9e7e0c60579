"""Interpolants between noise x0 and data x1: x_t = alpha(t) * x1 + sigma(t) * x0.

Official SiT time convention: t = 0 is pure noise, t = 1 is data. A path only knows its coefficients; the
objective (objective.py) and the samplers (samplers.py) are built on top of it, as in SiT's ``transport/``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample time (B,) so it broadcasts against x (B, ...)."""
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)


# The released sampler clamps its reverse time to [1e-4, 0.999] for w; in this repo's time that is [1e-3, 1 - 1e-4].
SBDM_T_MIN, SBDM_T_MAX = 1e-3, 1.0 - 1e-4


class Path:
    """An interpolant x_t = alpha(t) x1 + sigma(t) x0; subclasses give the coefficients and derivatives."""

    def alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, d alpha_t / dt): the data coefficient."""
        raise NotImplementedError

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(sigma_t, d sigma_t / dt): the noise coefficient."""
        raise NotImplementedError

    def x_t(self, t: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
        """The point of the path at time t (t of shape (B,))."""
        tt = expand_like(t, x1)
        return self.alpha(tt)[0] * x1 + self.sigma(tt)[0] * x0

    def velocity(self, t: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
        """The conditional velocity d x_t / dt, the regression target of a velocity model."""
        tt = expand_like(t, x1)
        return self.alpha(tt)[1] * x1 + self.sigma(tt)[1] * x0

    def score_from_velocity(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """grad log p_t(x) from the marginal velocity v(x, t).

        From E[x1|x] and E[x0|x] solved out of x and v; undefined where sigma_t = 0 (the data end).
        """
        tt = expand_like(t, x)
        a, da = self.alpha(tt)
        s, ds = self.sigma(tt)
        ratio = a / da
        var = s * s - ratio * ds * s
        return (ratio * v - x) / var

    def diffusion(self, t: Tensor, x: Tensor, form: str = "sigma", norm: float = 1.0) -> Tensor:
        """The SDE diffusion coefficient w(t) of SiT's sampler (its ``compute_diffusion``).

        The reverse-time SDE is dx = [v + w(t) score] dt + sqrt(2 w(t)) dW; any w >= 0 has the same marginals.
        "SBDM" (score-based diffusion: w = alpha'/alpha sigma^2 - sigma sigma', (1 - t) / t on the linear path) is
        evaluated at t clamped to [SBDM_T_MIN, SBDM_T_MAX], as the released GroupDiff (REPA) sampler does, so it
        stays finite at the noise end (w = 999 at t = 0) and the grid may start there.
        """
        tt = expand_like(t, x)
        if form == "sigma":
            return norm * self.sigma(tt)[0]
        if form == "constant":
            return torch.full_like(tt, norm)
        if form == "linear":
            return norm * (1 - tt)
        if form == "SBDM":
            tc = tt.clamp(SBDM_T_MIN, SBDM_T_MAX)
            a, da = self.alpha(tc)
            s, ds = self.sigma(tc)
            return norm * ((da / a) * s * s - s * ds)
        raise ValueError(f"diffusion form {form!r} is not one of 'sigma', 'constant', 'linear', 'SBDM'")


class LinearPath(Path):
    """SiT's "Linear" interpolant: alpha_t = t, sigma_t = 1 - t, target velocity x1 - x0."""

    def alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return t, torch.ones_like(t)

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - t, -torch.ones_like(t)


PATHS: dict[str, type[Path]] = {"linear": LinearPath}


def build_path(name: str = "linear") -> Path:
    """A path by name (only "linear" for now: the GroupDiff/SiT setting)."""
    if name not in PATHS:
        raise ValueError(f"path {name!r} is not one of {sorted(PATHS)}")
    return PATHS[name]()
