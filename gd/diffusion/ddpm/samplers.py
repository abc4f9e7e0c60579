"""Samplers for an ε model in DDPM time: ancestral DDPM and DDIM (eta), over a possibly respaced diffusion.

They see only ``output_fn(x, t_model) -> model output`` (t_model the original indices, shape (B,)) and step from
this diffusion's index T'-1 down to 0; the last step (index 0) adds no noise and returns the model mean (DDPM) or
the predicted x_0 (DDIM). DiT: DDPM over ``respace("250")``, clip_denoised=False.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gd.diffusion.ddpm.schedule import GaussianDiffusion

OutputFn = Callable[[Tensor, Tensor], Tensor]


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    gdev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)


def _steps(diffusion: GaussianDiffusion, x: Tensor) -> list[tuple[int, Tensor, Tensor]]:
    """(index, this diffusion's t, the model's t) from T'-1 down to 0, each of shape (B,)."""
    out = []
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out.append((i, t, diffusion.model_timesteps(t)))
    return out


def ddpm(diffusion: GaussianDiffusion, output_fn: OutputFn, noise: Tensor, *, clip_denoised: bool = False,
         generator: torch.Generator | None = None, trajectory: list[Tensor] | None = None) -> Tensor:
    """Ancestral sampling: x_{t-1} = mean + exp(log σ²/2) z, z ~ N(0, I), no noise at index 0."""
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))
    for i, t, t_model in _steps(diffusion, x):
        pred = diffusion.p_mean_variance(output_fn(x, t_model), x, t, clip_denoised=clip_denoised)
        x = pred.mean
        if i > 0:
            x = x + torch.exp(0.5 * pred.log_variance) * _noise_like(x, generator)
        if trajectory is not None:
            trajectory.append(x)
    return x


def ddim(diffusion: GaussianDiffusion, output_fn: OutputFn, noise: Tensor, *, eta: float = 0.0,
         clip_denoised: bool = False, generator: torch.Generator | None = None,
         trajectory: list[Tensor] | None = None) -> Tensor:
    """DDIM (Song et al. eq. 12): x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1 - ᾱ_{t-1} - σ²) ε̂ + σ z with
    σ = eta sqrt((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_{t-1}); eta = 0 is deterministic. The learned
    variance is not used."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))
    for i, t, t_model in _steps(diffusion, x):
        pred = diffusion.p_mean_variance(output_fn(x, t_model), x, t, clip_denoised=clip_denoised)
        ac = diffusion.at("alphas_cumprod", t, x)
        ac_prev = diffusion.at("alphas_cumprod_prev", t, x)
        sigma = eta * ((1 - ac_prev) / (1 - ac)).sqrt() * (1 - ac / ac_prev).sqrt()
        x = pred.pred_x0 * ac_prev.sqrt() + (1 - ac_prev - sigma ** 2).clamp(min=0).sqrt() * pred.eps
        if i > 0 and eta > 0:
            x = x + sigma * _noise_like(x, generator)
        if trajectory is not None:
            trajectory.append(x)
    return x
