"""DiT's objective and samplers: a DDPM Gaussian diffusion with an ε model and learned variance, in DDPM time.

Time convention here (unlike the rest of gd.diffusion, where t in [0, 1] with t = 0 noise): t is an integer
index in {0, ..., T-1}, t = 0 the least noisy step, T-1 the noisiest; the model is called with these indices
(the ORIGINAL ones, also under respacing). See docs/ddpm.md.

    diffusion = build_ddpm()                                    # DiT training: 1000 linear steps, learned σ
    loss, terms = group_loss(diffusion, partial(sit, full_output=True), x0, y, group_size, generator=g)
    x = sample(diffusion.respace("250"), partial(sit, full_output=True), noise, y, cfg_scale=1.5)
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gd.diffusion.ddpm import samplers as _s
from gd.diffusion.ddpm.guidance import DIT_CFG_CHANNELS, GuidedEps
from gd.diffusion.ddpm.likelihood import discretized_gaussian_log_likelihood, normal_kl
from gd.diffusion.ddpm.objective import LossTerms, group_loss, group_timesteps, hybrid_terms, vb_bits
from gd.diffusion.ddpm.schedule import (GaussianDiffusion, Prediction, build_ddpm, linear_betas,
                                        space_timesteps)
from gd.diffusion.guidance import CallStats

METHODS = ("ddpm", "ddim")

__all__ = [
    "build_ddpm", "GaussianDiffusion", "Prediction", "linear_betas", "space_timesteps", "group_loss",
    "group_timesteps", "hybrid_terms", "vb_bits", "LossTerms", "normal_kl", "discretized_gaussian_log_likelihood",
    "GuidedEps", "DIT_CFG_CHANNELS", "sample", "METHODS",
]


@torch.no_grad()
def sample(diffusion: GaussianDiffusion, model: Callable[..., Tensor], noise: Tensor, y: Tensor, *,
           method: str = "ddpm", eta: float = 0.0, cfg_scale: float = 1.0,
           cfg_interval: tuple[float, float] | None = None, cfg_channels: int | None = DIT_CFG_CHANNELS,
           group_size: int = 1, uncond_group_size: int | None = None, null_class: int | None = None,
           clip_denoised: bool = False, generator: torch.Generator | None = None, return_trajectory: bool = False,
           stats: CallStats | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Sample from `noise` (the noisiest step) to data over every step of `diffusion` (respace it first:
    DiT uses ``respace("250")`` with DDPM; "ddim50" etc. with DDIM).

    ``model(x, t, y, group_size)`` returns ε (B, C, ...) or, with learned variance, ε and v (B, 2C, ...); t are
    the original DDPM indices. method: "ddpm" (ancestral) or "ddim" (eta = 0 deterministic). Guidance: see
    GuidedEps (cfg_interval in original DDPM timesteps; cfg_channels 3 is DiT's). Batches are group-major;
    group_size / uncond_group_size are the branches' group sizes (GroupDiff-l: 1 / N). `generator` drives
    the sampler's noise. Returns the sample, or (sample, trajectory) with trajectory[0] = noise.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if noise.ndim < 2:
        raise ValueError(f"noise must be (B, C, ...), got shape {tuple(noise.shape)}")
    batch = noise.shape[0]
    if y.shape != (batch,):
        raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")
    ugs = group_size if uncond_group_size is None else uncond_group_size
    for name, n in (("group_size", group_size), ("uncond_group_size", ugs)):
        if int(n) < 1 or batch % int(n) != 0:
            raise ValueError(f"{name}={n} does not divide the batch of {batch} images")
    guided = GuidedEps(model, y, null_class=null_class, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                       cfg_channels=cfg_channels, group_size=group_size, uncond_group_size=ugs)
    if stats is not None:
        guided.stats = stats
    traj: list[Tensor] | None = [noise] if return_trajectory else None
    if method == "ddpm":
        final = _s.ddpm(diffusion, guided, noise, clip_denoised=clip_denoised, generator=generator, trajectory=traj)
    else:
        final = _s.ddim(diffusion, guided, noise, eta=eta, clip_denoised=clip_denoised, generator=generator,
                        trajectory=traj)
    if traj is not None:
        return final, torch.stack(traj)
    return final
