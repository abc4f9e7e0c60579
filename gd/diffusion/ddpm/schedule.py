"""The discrete Gaussian diffusion of DDPM/ADM/DiT: β schedule, q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0),
the model's p(x_{t-1} | x_t) from an ε output (with learned variance), and timestep respacing.

Time convention (DDPM, not the flow convention of gd.diffusion): t is an integer index in {0, ..., T-1}; t = 0 is
the LEAST noisy step (one noising step from the clean x_0, ᾱ_0 = 1 - β_0), t = T-1 the noisiest. The data x_0
itself has no index. x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε.

Every table is float64 (as DiT/ADM compute them in numpy) and cast to the working dtype (at least float32) when
used. A respaced diffusion keeps a subset of the steps; its own indices run 0..T'-1 and ``timestep_map`` sends
them to the ORIGINAL indices, which is what the model is called with.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

SCHEDULES = ("linear",)
VARIANCES = ("learned_range", "fixed_large", "fixed_small")


def linear_betas(num_timesteps: int) -> Tensor:
    """Ho et al.'s linear β from 1e-4 to 0.02 for 1000 steps, both ends scaled by 1000 / T for other T
    (ADM's ``get_named_beta_schedule("linear", T)``), float64."""
    if int(num_timesteps) < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, int(num_timesteps), dtype=torch.float64)


def space_timesteps(num_timesteps: int, spec: int | str | Sequence[int]) -> list[int]:
    """The original steps a respaced diffusion keeps (sorted), in ADM/DiT's ``space_timesteps`` notation.

    spec: N or "N" (N evenly spread steps, both ends kept); "a,b,c" or [a, b, c] (the T steps cut into equal
    sections, section i keeps its count evenly spread); "ddimN" (the DDIM paper's 0, k, 2k, ... with the integer
    stride k that gives exactly N steps). Positions are rounded half-to-even from exact fractions.
    """
    t_total = int(num_timesteps)
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("ddim"):
            try:
                want = int(text[4:])
            except ValueError:
                raise ValueError(f"respacing {spec!r}: expected 'ddimN' with an integer N") from None
            for stride in range(1, t_total):
                if len(range(0, t_total, stride)) == want:
                    return list(range(0, t_total, stride))
            raise ValueError(f"respacing {spec!r}: no integer stride gives exactly {want} of {t_total} steps")
        try:
            counts = [int(c) for c in text.split(",")]
        except ValueError:
            raise ValueError(f"respacing {spec!r}: expected 'N', 'a,b,c' or 'ddimN'") from None
    elif isinstance(spec, int):
        counts = [spec]
    else:
        counts = [int(c) for c in spec]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"respacing {spec!r}: every section needs >= 1 step")
    size, extra = divmod(t_total, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if count > section:
            raise ValueError(f"respacing {spec!r}: cannot take {count} steps from a section of {section}")
        stride = Fraction(section - 1, count - 1) if count > 1 else Fraction(1)
        kept += [start + round(k * stride) for k in range(count)]
        start += section
    return sorted(set(kept))


@dataclass
class Prediction:
    """The model's reverse step p(x_{t-1} | x_t) at one t: mean, log-variance, the x_0 and ε it implies."""

    mean: Tensor
    log_variance: Tensor
    pred_x0: Tensor
    eps: Tensor


class GaussianDiffusion:
    """A DDPM forward process over T steps with an ε-predicting model (see the module docstring for time).

    variance: "learned_range" (the model's extra C channels v in [-1, 1] interpolate the log-variance between
    log β̃_t (v = -1) and log β_t (v = +1), IDDPM), "fixed_large" (β_t, with β̃_1 at t = 0) or "fixed_small" (β̃_t).
    rescale_vlb: multiply the VLB term of the hybrid loss by T / 1000 (ADM's RESCALED_MSE); DiT trains without it.
    """

    def __init__(self, betas: Tensor | Sequence[float], *, variance: str = "learned_range",
                 timestep_map: Tensor | Sequence[int] | None = None, rescale_vlb: bool = False) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(f"betas must be 1-D with >= 2 steps, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"betas must lie in (0, 1], got range [{float(betas.min())}, {float(betas.max())}]")
        if variance not in VARIANCES:
            raise ValueError(f"variance {variance!r} is not one of {VARIANCES}")
        self.variance = variance
        self.rescale_vlb = bool(rescale_vlb)
        self.num_timesteps = int(betas.shape[0])
        tmap = torch.arange(self.num_timesteps) if timestep_map is None else torch.as_tensor(timestep_map).long().cpu()
        if tmap.shape != (self.num_timesteps,):
            raise ValueError(f"timestep_map has shape {tuple(tmap.shape)}, expected ({self.num_timesteps},)")
        self.timestep_map = tmap

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        ac, acp = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - acp) / (1.0 - ac)
        # β̃_0 = 0: its log is clipped to log β̃_1, as in DDPM/ADM.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * acp.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * alphas.sqrt() / (1.0 - ac)
        if variance == "fixed_large":
            self.model_log_variance_fixed = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]]))
        else:
            self.model_log_variance_fixed = self.posterior_log_variance_clipped
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1.0).sqrt()
        self.log_betas = betas.log()
        self._cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(steps={self.num_timesteps}, variance={self.variance!r}, "
                f"map=[{int(self.timestep_map[0])}..{int(self.timestep_map[-1])}], rescale_vlb={self.rescale_vlb})")

    @property
    def learned_variance(self) -> bool:
        return self.variance == "learned_range"

    def output_channels(self, channels: int) -> int:
        """How many channels the model must return for data with `channels` channels."""
        return 2 * channels if self.learned_variance else channels

    def at(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """The float64 table `name` at this diffusion's indices t, shaped and typed to broadcast against `like`
        (a copy per device and dtype is kept, so sampling does not re-upload the tables every step)."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        key = (name, like.device, dtype)
        table = self._cache.get(key)
        if table is None:
            table = self._cache[key] = getattr(self, name).to(device=like.device, dtype=dtype)
        return table[t.to(like.device)].reshape(t.shape[0], *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The original timestep indices the model is called with, for this diffusion's indices t."""
        return self.timestep_map.to(t.device)[t]

    def check_timesteps(self, t: Tensor) -> None:
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"DDPM timesteps are integer indices, got dtype {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must be in [0, {self.num_timesteps - 1}], "
                             f"got range [{int(t.min())}, {int(t.max())}]")

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise."""
        return self.at("sqrt_alphas_cumprod", t, x0) * x0 + self.at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, variance, clipped log-variance) of q(x_{t-1} | x_t, x_0)."""
        mean = self.at("posterior_mean_coef1", t, x_t) * x0 + self.at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self.at("posterior_variance", t, x_t), self.at("posterior_log_variance_clipped", t, x_t)

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return self.at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self.at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return ((self.at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0)
                / self.at("sqrt_recipm1_alphas_cumprod", t, x_t))

    def split_output(self, output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """(ε, variance values v or None) from a model output of output_channels(C) channels."""
        channels = x_t.shape[1]
        want = self.output_channels(channels)
        if output.shape[0] != x_t.shape[0] or output.shape[1] != want or output.shape[2:] != x_t.shape[2:]:
            hint = " (for SiT call it with full_output=True)" if self.learned_variance else ""
            raise ValueError(f"model output has shape {tuple(output.shape)}; the {self.variance} variance needs "
                             f"({x_t.shape[0]}, {want}, {', '.join(map(str, x_t.shape[2:]))}){hint}")
        if not self.learned_variance:
            return output, None
        return output[:, :channels], output[:, channels:]

    def model_log_variance(self, v: Tensor | None, t: Tensor, x_t: Tensor) -> Tensor:
        """log σ_t² of p(x_{t-1} | x_t): interpolated from v when learned, else the fixed table."""
        if v is None:
            return self.at("model_log_variance_fixed", t, x_t).expand_as(x_t)
        min_log = self.at("posterior_log_variance_clipped", t, x_t)
        max_log = self.at("log_betas", t, x_t)
        frac = (v.to(min_log.dtype) + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(self, output: Tensor, x_t: Tensor, t: Tensor, *, clip_denoised: bool = False) -> Prediction:
        """p(x_{t-1} | x_t) from the model output at x_t: mean = posterior mean at the predicted x_0.

        clip_denoised clamps the predicted x_0 to [-1, 1] (pixel-space models; DiT samples latents unclipped).
        """
        eps, v = self.split_output(output, x_t)
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        eps = eps.to(dtype)
        pred_x0 = self.predict_x0(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            eps = self.predict_eps(x_t, t, pred_x0)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return Prediction(mean, self.model_log_variance(v, t, x_t), pred_x0, eps)

    def respace(self, spec: int | str | Sequence[int] | None) -> GaussianDiffusion:
        """The diffusion over the kept steps of ``space_timesteps(T, spec)`` (None or "" keeps all).

        β'_k = 1 - ᾱ_{s_k} / ᾱ_{s_{k-1}} over the kept steps s, so ᾱ' at every kept step equals the original ᾱ;
        the model still sees the original indices (the map composes when respacing twice).
        """
        if spec is None or spec == "":
            return self
        kept = torch.tensor(space_timesteps(self.num_timesteps, spec), dtype=torch.long)
        if kept.numel() < 2:
            raise ValueError(f"respacing {spec!r} keeps {kept.numel()} step; a diffusion needs >= 2")
        ac = self.alphas_cumprod[kept]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        return GaussianDiffusion(1.0 - ac / prev, variance=self.variance, timestep_map=self.timestep_map[kept],
                                 rescale_vlb=self.rescale_vlb)


def build_ddpm(*, num_timesteps: int = 1000, schedule: str = "linear", learn_sigma: bool = True,
               sigma_small: bool = False, respacing: int | str | Sequence[int] | None = None,
               rescale_vlb: bool = False) -> GaussianDiffusion:
    """One GaussianDiffusion from config values, DiT's ``create_diffusion`` defaults.

    learn_sigma: learned-range variance (DiT); else fixed β (sigma_small=False, DiT's choice) or fixed β̃.
    respacing: None/"" for training (all T steps); "250" for DiT's DDPM sampling, "ddim50" etc. for DDIM.
    rescale_vlb: ADM's T/1000 factor on the VLB term; DiT leaves it off (and with T = 1000 it is 1 anyway).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"noise schedule {schedule!r} is not one of {SCHEDULES}")
    variance = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    return GaussianDiffusion(linear_betas(num_timesteps), variance=variance,
                             rescale_vlb=rescale_vlb).respace(respacing)

