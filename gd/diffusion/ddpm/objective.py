"""The DiT training objective in DDPM time: timestep draws with GroupDiff's intra-group spread (σ_tv), the hybrid
loss (ε MSE + the variational bound on the learned variance) and its reduction over a group-major batch.

DiT (facebookresearch/DiT train.py, ``create_diffusion(timestep_respacing="")``): t ~ U{0, ..., 999} per image,
loss = mean over the batch of [mean_CHW (ε - ε̂)² + vb], vb in bits per dimension with the model mean frozen
(stop-gradient), not rescaled (LossType.MSE; ADM's RESCALED_MSE would multiply vb by T / 1000 = 1 here).
The released GroupDiff DiT code keeps that loss (mean over all G*N images) and draws σ_tv as below.
Every draw takes an explicit ``torch.Generator`` so a step can be replayed exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gd.diffusion.ddpm.likelihood import discretized_gaussian_log_likelihood, normal_kl
from gd.diffusion.ddpm.schedule import GaussianDiffusion
from gd.diffusion.plan import Shard

EpsModel = Callable[..., Tensor]
REDUCTIONS = ("mean", "group_sum")
LOG2 = math.log(2.0)


def group_timesteps(num_groups: int, group_size: int, num_timesteps: int, *, spread: int = 0,
                    keep_anchor: bool = False, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
    """Integer timesteps for a group-major batch, shape (num_groups * group_size,), dtype long.

    Each group draws a base b ~ U{0, ..., T-1}; with spread o > 0 its members draw uniformly from
    {max(0, b - o), ..., min(T - 1, b + o)} (GroupDiff's σ_tv in DDPM steps; the paper uses 50-200).
    keep_anchor: member 0 keeps b itself (the flow objective's rule); the released GroupDiff DiT code redraws
    every member, including the first (keep_anchor=False). spread = 0 gives one t per group.
    """
    if num_groups < 1 or group_size < 1:
        raise ValueError(f"need num_groups >= 1 and group_size >= 1, got {num_groups} and {group_size}")
    if int(num_timesteps) < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if isinstance(spread, bool) or int(spread) != spread or not 0 <= spread < num_timesteps:
        raise ValueError(f"spread must be an integer number of DDPM steps in [0, {num_timesteps - 1}], got {spread}")
    gdev = generator.device if generator is not None else torch.device("cpu")
    base = torch.randint(0, int(num_timesteps), (num_groups,), generator=generator, device=gdev)
    if group_size == 1 or spread == 0:
        t = base.repeat_interleave(group_size)
    else:
        lo = (base - int(spread)).clamp(min=0)
        hi = (base + int(spread)).clamp(max=int(num_timesteps) - 1)
        width = (hi - lo + 1).double()
        u = torch.rand(num_groups, group_size, generator=generator, device=gdev, dtype=torch.float64)
        # floor(u * width) is uniform on {0, ..., width-1}; min() guards the u -> 1 rounding edge.
        member = lo[:, None] + torch.minimum((u * width[:, None]).long(), (hi - lo)[:, None])
        if keep_anchor:
            member[:, 0] = base
        t = member.reshape(-1)
    return t.to(device if device is not None else gdev)


@dataclass
class LossTerms:
    """Per-image terms (B,), in float32 at least: loss = mse + vb (vb is zero for a fixed variance)."""

    loss: Tensor
    mse: Tensor
    vb: Tensor


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def vb_bits(diffusion: GaussianDiffusion, x0: Tensor, x_t: Tensor, t: Tensor, mean: Tensor,
            log_variance: Tensor) -> Tensor:
    """One term of the variational bound per image, in bits per dimension: at t > 0 the KL from the true
    posterior q(x_{t-1} | x_t, x_0) to p = N(mean, e^log_variance); at t = 0 the decoder's negative
    discretised log-likelihood of x_0."""
    true_mean, _, true_log_var = diffusion.q_posterior(x0, x_t, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_variance)) / LOG2
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)) / LOG2
    return torch.where(t.to(kl.device) == 0, nll, kl)


def hybrid_terms(diffusion: GaussianDiffusion, output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor,
                 noise: Tensor) -> LossTerms:
    """IDDPM's hybrid loss from a model output at x_t: MSE on ε, plus (learned variance) the VLB term with the
    ε half detached, so the bound trains only the variance channels. t: this diffusion's indices."""
    dtype = torch.promote_types(x0.dtype, torch.float32)
    x0, x_t, noise = x0.to(dtype), x_t.to(dtype), noise.to(dtype)
    eps, v = diffusion.split_output(output.to(dtype), x_t)
    mse = _mean_flat((noise - eps) ** 2)
    if v is None:
        return LossTerms(mse, mse, torch.zeros_like(mse))
    frozen = torch.cat([eps.detach(), v], dim=1)
    pred = diffusion.p_mean_variance(frozen, x_t, t)
    vb = vb_bits(diffusion, x0, x_t, t, pred.mean, pred.log_variance)
    if diffusion.rescale_vlb:
        vb = vb * (diffusion.num_timesteps / 1000.0)
    return LossTerms(mse + vb, mse, vb)


def group_loss(diffusion: GaussianDiffusion, model: EpsModel, x0: Tensor, y: Tensor, group_size: int, *,
               t: Tensor | None = None, noise: Tensor | None = None, spread: int = 0, keep_anchor: bool = False,
               generator: torch.Generator | None = None, reduction: str = "mean",
               shard: Shard | None = None) -> tuple[Tensor, LossTerms]:
    """The DiT objective on a group-major batch x0 (G*N, C, H, W); returns (loss, per-image terms).

    ``model(x_t, t_model, y, group_size)`` must return ε (and the variance values when learned: 2C channels;
    pass ``functools.partial(sit, full_output=True)`` for SiT); t_model are the original timestep indices.
    reduction: "mean" over all G*N images (DiT, the released GroupDiff code) or "group_sum" (per-image losses
    summed over each group's N members, then averaged over groups: N times "mean", the paper's L_Group).
    t (this diffusion's indices) and noise are drawn with `generator` when not given. ``shard`` (group
    parallelism): x0 and y are the replica's micro-batch, t and the noise are drawn for all of it and the model,
    the terms and the loss are this rank's rows (gd.diffusion.plan.Shard).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} is not one of {REDUCTIONS}")
    if x0.ndim < 2:
        raise ValueError(f"x0 must be (G*N, C, ...), got shape {tuple(x0.shape)}")
    batch = x0.shape[0]
    if group_size < 1 or batch % group_size != 0:
        raise ValueError(f"batch of {batch} images is not a whole number of groups of size {group_size}")
    if y.shape[0] != batch:
        raise ValueError(f"labels have {y.shape[0]} entries for a batch of {batch}")
    groups = batch // group_size
    if t is None:
        t = group_timesteps(groups, group_size, diffusion.num_timesteps, spread=spread, keep_anchor=keep_anchor,
                            generator=generator, device=x0.device)
    elif t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
    else:  # drawn ones are in range by construction (and reading values would break fake-tensor runs)
        diffusion.check_timesteps(t)
    if noise is None:
        gdev = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype).to(x0.device)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
    x_t = diffusion.q_sample(x0, t, noise)
    shard = shard or Shard()
    x0, x_t, t, noise, y = (shard.take(v, group_size) for v in (x0, x_t, t, noise, y))
    output = model(x_t, diffusion.model_timesteps(t), y, group_size)
    terms = hybrid_terms(diffusion, output, x0, x_t, t, noise)
    return shard.reduce(terms.loss, group_size, reduction), terms
