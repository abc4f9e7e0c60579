"""The diffusion a run trains and samples with, chosen by ``diffusion.objective``: one object owns the training
loss, the time the model sees and the samplers, as SiT's ``create_transport`` does, so the trainer and gd.sample
never ask which objective they run.

    objective = build_objective(cfg.diffusion, cfg.model)      # "flow" (SiT, the default) or "ddpm" (DiT)
    loss, per_image = objective.loss(objective.network(net), x, y, group_size, generator)
    sampler = objective.sampler(cfg.sample)                    # refuses a method of the other objective
    x = sampler(objective.network(model), noise, y, group_size=1, uncond_group_size=4, generator=g)

flow: SiT's linear flow matching (gd.diffusion): t in [0, 1] with t = 0 noise, velocity target; samplers sde, euler,
heun, dopri5. ddpm: DiT's discrete DDPM (gd.diffusion.ddpm): integer t in 0..T-1 with T-1 the noisiest, ε and
(when the model has learn_sigma) the learned variance, hybrid loss; samplers ddpm (ancestral) and ddim over
``sample.steps`` evenly respaced steps (DiT: 250).

Every time-valued option is in the objective's own time, since the model compares it with the t it is called with:
``diffusion.sigma_tv``, ``model.group_t_window`` and ``sample.cfg_interval`` are flow times in [0, 1] for flow and
original DDPM timestep indices for ddpm (the released DiT's fractions o become int(o * 1000) steps). The two scales
do not map onto each other by a formula (the paths differ), and their ends are swapped: the paper's "first 40% of
denoising" is [0, 0.4] in flow time and [600, 999] in DDPM indices. See docs/ddpm.md.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from gd.diffusion import METHODS as FLOW_METHODS
from gd.diffusion import ddpm
from gd.diffusion import sample as flow_sample
from gd.diffusion.convert import FromReverseTime
from gd.diffusion.guidance import CallStats
from gd.diffusion.objective import REDUCTIONS, SIGMA_TV_DRAWS, TimeSampler, group_loss
from gd.diffusion.path import LinearPath
from gd.diffusion.plan import Shard

OBJECTIVES = ("flow", "ddpm")
Net = Callable[..., Tensor]


class Sampler(Protocol):
    """A validated sampler of one objective: ``settings()`` for settings.json, a call for one batch."""

    def settings(self) -> dict[str, Any]: ...

    def __call__(self, net: Net, noise: Tensor, y: Tensor, *, group_size: int, uncond_group_size: int,
                 generator: torch.Generator | None, null_class: int | None,
                 stats: CallStats | None = None) -> Tensor: ...


class Objective(Protocol):
    """What the trainer and gd.sample ask of a diffusion objective (see the module docstring)."""

    name: str
    reduction: str

    def network(self, net: Net) -> Net: ...

    def loss(self, net: Net, x: Tensor, y: Tensor, group_size: int, generator: torch.Generator | None,
             shard: Shard | None = None, *, t: Tensor | None = None,
             noise: Tensor | None = None) -> tuple[Tensor, Tensor]: ...

    def check_model(self, model: Mapping[str, Any]) -> None: ...

    def probe_input(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]: ...

    def probe_times(self, count: int) -> Tensor: ...

    def from_released(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def sampler(self, sample: Mapping[str, Any]) -> Sampler: ...


def _methods_error(method: Any, objective: str, methods: tuple[str, ...]) -> ValueError:
    """The error for a sample.method that is not one of ``objective``'s ``methods``, naming whose it is."""
    if method in FLOW_METHODS or method in DDPM_METHODS:
        owner = "flow" if method in FLOW_METHODS else "ddpm"
        hint = (" (a DiT / DDPM model: diffusion=ddpm_groupdiff_l or +exp=groupdiff4_dit, sample.method=ddpm)"
                if owner == "ddpm" else "")
        return ValueError(f"sample.method={method!r} samples the {owner} objective, but diffusion.objective="
                          f"{objective}: its samplers are {' | '.join(methods)}{hint}")
    return ValueError(f"sample.method={method!r}: expected one of {' | '.join(methods)} "
                      f"(diffusion.objective={objective})")


def _window(value: Any) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


# ------------------------------------------------------------------------------------------------ flow


@dataclass(frozen=True)
class FlowSampler:
    """gd.diffusion.sample with ``cfg.sample``'s options; cfg_interval in flow time (null: everywhere)."""

    method: str
    steps: int
    cfg_scale: float
    cfg_interval: tuple[float, float]
    cfg_channels: int | None
    atol: float
    rtol: float
    sde: dict[str, Any]

    @classmethod
    def from_config(cls, s: Mapping[str, Any]) -> FlowSampler:
        method = s.get("method", "sde")
        if method not in FLOW_METHODS:
            raise _methods_error(method, "flow", FLOW_METHODS)
        interval = _window(s.get("cfg_interval")) or (0.0, 1.0)
        if not 0.0 <= interval[0] <= interval[1] <= 1.0:
            raise ValueError(f"sample.cfg_interval={list(interval)}: flow intervals are [t_lo, t_hi] with "
                             "0 <= t_lo <= t_hi <= 1 (t = 0 noise)")
        if int(s.get("steps", 250)) < 1:
            raise ValueError(f"sample.steps={s.get('steps')}: expected >= 1")
        sde = {}
        if method == "sde":  # SiT's defaults when unset
            sde = {"diffusion_form": str(s.get("diffusion_form", "sigma")),
                   "sample_eps": float(s.get("sample_eps", 1e-3)), "last_step": s.get("last_step", "Mean"),
                   "last_step_size": float(s.get("last_step_size", 0.04))}
        channels = s.get("cfg_channels")
        return cls(str(method), int(s.get("steps", 250)), float(s.get("cfg_scale", 1.0)), interval,
                   None if channels is None else int(channels), float(s.get("atol", 1e-6)),
                   float(s.get("rtol", 1e-3)), sde)

    def settings(self) -> dict[str, Any]:
        # The keys of sample folders written before the DDPM objective existed, so those folders still resume.
        return {"method": self.method, "steps": self.steps, "cfg_scale": self.cfg_scale,
                "cfg_interval": list(self.cfg_interval), "cfg_channels": self.cfg_channels, "atol": self.atol,
                "rtol": self.rtol, **self.sde}

    def __call__(self, net: Net, noise: Tensor, y: Tensor, *, group_size: int, uncond_group_size: int,
                 generator: torch.Generator | None, null_class: int | None,
                 stats: CallStats | None = None) -> Tensor:
        return flow_sample(net, noise, y, method=self.method, steps=self.steps, cfg_scale=self.cfg_scale,
                           cfg_interval=self.cfg_interval, cfg_channels=self.cfg_channels, group_size=group_size,
                           uncond_group_size=uncond_group_size, generator=generator, atol=self.atol,
                           rtol=self.rtol, null_class=null_class, stats=stats, **self.sde)


class FlowObjective:
    """SiT's linear flow matching with GroupDiff's group loss (gd.diffusion.objective)."""

    name = "flow"

    def __init__(self, *, sigma_tv: float = 0.0, sigma_tv_draw: str = "window",
                 time_sampling: str | Mapping[str, Any] = "uniform", reduction: str = "mean") -> None:
        if not 0.0 <= float(sigma_tv) <= 1.0:
            raise ValueError(f"diffusion.sigma_tv={sigma_tv}: with diffusion.objective=flow it is a half-width in "
                             "flow time, in [0, 1] (the paper's 50-200 DDPM steps are about 0.05-0.2)")
        if sigma_tv_draw not in SIGMA_TV_DRAWS:
            raise ValueError(f"diffusion.sigma_tv_draw={sigma_tv_draw!r}: expected one of {SIGMA_TV_DRAWS}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"diffusion.loss_reduction={reduction!r}: expected one of {REDUCTIONS}")
        self.sigma_tv = float(sigma_tv)
        self.sigma_tv_draw = sigma_tv_draw
        self.time_sampler = TimeSampler.from_spec(time_sampling)
        self.reduction = reduction

    def __repr__(self) -> str:
        return (f"FlowObjective(sigma_tv={self.sigma_tv}, sigma_tv_draw={self.sigma_tv_draw!r}, "
                f"time_sampler={self.time_sampler}, reduction={self.reduction!r})")

    def network(self, net: Net) -> Net:
        """``net`` as the flow loss and samplers call it: the velocity, the model's first C channels."""
        return net

    def loss(self, net: Net, x: Tensor, y: Tensor, group_size: int, generator: torch.Generator | None,
             shard: Shard | None = None, *, t: Tensor | None = None,
             noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(loss, per-image velocity MSE); t, then the noise, come from ``generator`` unless given (the probes'
        fixed draws); ``shard``: this rank's rows of the replica's batch under group parallelism
        (gd.diffusion.plan.Shard)."""
        return group_loss(net, x, y, group_size, t=t, noise=noise, sigma_tv=self.sigma_tv, generator=generator,
                          time_sampling=self.time_sampler, reduction=self.reduction, sigma_tv_draw=self.sigma_tv_draw,
                          shard=shard)

    def check_model(self, model: Mapping[str, Any]) -> None:
        window = _window(model.get("group_t_window"))
        if window is not None and not 0.0 <= window[0] <= window[1] <= 1.0:
            raise ValueError(f"model.group_t_window={list(window)}: with diffusion.objective=flow it is "
                             "[t_lo, t_hi] in flow time, 0 <= t_lo <= t_hi <= 1 (t = 0 noise)")

    def probe_input(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """The S_cross probe's point: t = 0.5 (signal-to-noise ratio 1)."""
        t = torch.full((x.shape[0],), 0.5, device=x.device)
        return LinearPath().x_t(t, noise, x), t

    def probe_times(self, count: int) -> Tensor:
        """``count`` fixed flow times: the training time distribution's quantiles at the midpoints (k + 1/2) / count
        of equal-probability strata, so their mean loss estimates the training loss's expectation over t."""
        return self.time_sampler.quantile((torch.arange(count, dtype=torch.float64) + 0.5) / count)

    def from_released(self, model: torch.nn.Module) -> torch.nn.Module:
        """A released GroupDiff SiT runs in the reverse time convention (REPA's): sample it through the bridge."""
        return FromReverseTime(model)

    def sampler(self, sample: Mapping[str, Any]) -> FlowSampler:
        return FlowSampler.from_config(sample)


# ------------------------------------------------------------------------------------------------ ddpm

DDPM_METHODS = ddpm.METHODS


@dataclass(frozen=True)
class DDPMSampler:
    """gd.diffusion.ddpm.sample over ``steps`` evenly respaced steps; cfg_interval in original DDPM indices
    (null: everywhere)."""

    diffusion: ddpm.GaussianDiffusion
    method: str
    steps: int
    eta: float
    cfg_scale: float
    cfg_interval: tuple[float, float] | None
    cfg_channels: int | None
    num_timesteps: int
    schedule: str

    def settings(self) -> dict[str, Any]:
        return {"objective": "ddpm", "num_timesteps": self.num_timesteps, "schedule": self.schedule,
                "variance": self.diffusion.variance, "method": self.method, "steps": self.steps, "eta": self.eta,
                "cfg_scale": self.cfg_scale,
                "cfg_interval": None if self.cfg_interval is None else list(self.cfg_interval),
                "cfg_channels": self.cfg_channels}

    def __call__(self, net: Net, noise: Tensor, y: Tensor, *, group_size: int, uncond_group_size: int,
                 generator: torch.Generator | None, null_class: int | None,
                 stats: CallStats | None = None) -> Tensor:
        return ddpm.sample(self.diffusion, net, noise, y, method=self.method, eta=self.eta, cfg_scale=self.cfg_scale,
                           cfg_interval=self.cfg_interval, cfg_channels=self.cfg_channels, group_size=group_size,
                           uncond_group_size=uncond_group_size, null_class=null_class, generator=generator,
                           stats=stats)


class DDPMObjective:
    """DiT's DDPM: ε prediction, learned variance when the model has ``learn_sigma`` (DiT; else DiT's fixed β),
    the hybrid loss, GroupDiff's group loss and σ_tv in DDPM steps (gd.diffusion.ddpm)."""

    name = "ddpm"

    def __init__(self, *, num_timesteps: int = 1000, schedule: str = "linear", learn_sigma: bool = True,
                 sigma_tv: float = 0, sigma_tv_draw: str = "window", reduction: str = "mean",
                 time_sampling: Any = "uniform") -> None:
        self.diffusion = ddpm.build_ddpm(num_timesteps=int(num_timesteps), schedule=str(schedule),
                                         learn_sigma=bool(learn_sigma))
        self.schedule = str(schedule)
        t_max = self.diffusion.num_timesteps - 1
        whole = not isinstance(sigma_tv, bool) and float(sigma_tv) == int(float(sigma_tv))
        if not whole or not 0 <= float(sigma_tv) <= t_max:
            raise ValueError(f"diffusion.sigma_tv={sigma_tv}: with diffusion.objective=ddpm it is a half-width in "
                             f"DDPM timesteps, an integer in [0, {t_max}] (the paper's 50-200; the released code's "
                             "timesteps_offset o is int(o * 1000) steps)")
        if sigma_tv_draw not in SIGMA_TV_DRAWS:
            raise ValueError(f"diffusion.sigma_tv_draw={sigma_tv_draw!r}: expected one of {SIGMA_TV_DRAWS}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"diffusion.loss_reduction={reduction!r}: expected one of {REDUCTIONS}")
        if time_sampling not in (None, "uniform"):
            raise ValueError(f"diffusion.time_sampling={time_sampling!r}: the ddpm objective draws t uniformly over "
                             "its steps (DiT); other time samplers are flow options")
        self.spread = int(float(sigma_tv))
        self.keep_anchor = sigma_tv_draw == "anchor"
        self.reduction = reduction
        alphas = self.diffusion.alphas_cumprod
        # The probe's t: where the signal-to-noise ratio ᾱ / (1 - ᾱ) is 1, as at flow t = 0.5.
        self.probe_t = int((alphas - 0.5).abs().argmin())

    def __repr__(self) -> str:
        return (f"DDPMObjective({self.diffusion!r}, spread={self.spread}, keep_anchor={self.keep_anchor}, "
                f"reduction={self.reduction!r})")

    @property
    def num_timesteps(self) -> int:
        return self.diffusion.num_timesteps

    def network(self, net: Net) -> Net:
        """``net`` as the DDPM loss and samplers call it: every output channel (ε, then the variance values)."""
        return functools.partial(net, full_output=True)

    def loss(self, net: Net, x: Tensor, y: Tensor, group_size: int, generator: torch.Generator | None,
             shard: Shard | None = None, *, t: Tensor | None = None,
             noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(loss, per-image hybrid loss ε MSE + VLB); t (this diffusion's indices), then the noise, come from
        ``generator`` unless given; ``shard`` as for the flow objective."""
        loss, terms = ddpm.group_loss(self.diffusion, net, x, y, group_size, t=t, noise=noise, spread=self.spread,
                                      keep_anchor=self.keep_anchor, generator=generator, reduction=self.reduction,
                                      shard=shard)
        return loss, terms.loss

    def check_model(self, model: Mapping[str, Any]) -> None:
        window = _window(model.get("group_t_window"))
        t_max = self.num_timesteps - 1
        if window is not None and not 0.0 <= window[0] <= window[1] <= t_max:
            raise ValueError(f"model.group_t_window={list(window)}: with diffusion.objective=ddpm it is [t_lo, t_hi] "
                             f"in DDPM timestep indices, 0 <= t_lo <= t_hi <= {t_max} ({t_max} noisiest; the "
                             f"paper's first 40% of denoising is [{round(0.6 * t_max)}, {t_max}])")
        if window is not None and window[1] <= 1.0:
            raise ValueError(f"model.group_t_window={list(window)} looks like flow time or a fraction: with "
                             f"diffusion.objective=ddpm it is in DDPM timestep indices 0..{t_max}")

    def probe_input(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """The S_cross probe's point: the DDPM step whose signal-to-noise ratio is 1, as flow's t = 0.5."""
        t = torch.full((x.shape[0],), self.probe_t, dtype=torch.long, device=x.device)
        return self.diffusion.q_sample(x, t, noise), t

    def probe_times(self, count: int) -> Tensor:
        """``count`` fixed DDPM indices at the midpoints of equal strata of the uniform 0..T-1 (long)."""
        u = (torch.arange(count, dtype=torch.float64) + 0.5) / count
        return (u * self.num_timesteps).floor().long()

    def from_released(self, model: torch.nn.Module) -> torch.nn.Module:
        """The released GroupDiff DiT is called with DDPM indices, as here: nothing to bridge."""
        return model

    def sampler(self, sample: Mapping[str, Any]) -> DDPMSampler:
        s = sample
        method = s.get("method")
        if method not in DDPM_METHODS:
            raise _methods_error(method, "ddpm", DDPM_METHODS)
        steps = s.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= self.num_timesteps:
            raise ValueError(f"sample.steps={steps!r}: with diffusion.objective=ddpm it is the number of respaced "
                             f"DDPM steps, an integer in [2, {self.num_timesteps}] (DiT: 250)")
        eta = float(s.get("eta") or 0.0)
        if eta < 0 or (eta and method != "ddim"):
            raise ValueError(f"sample.eta={eta}: DDIM's noise scale, >= 0, and only for sample.method=ddim")
        interval = _window(s.get("cfg_interval"))
        if interval is not None:
            if not 0.0 <= interval[0] <= interval[1] <= self.num_timesteps:
                raise ValueError(f"sample.cfg_interval={list(interval)}: with diffusion.objective=ddpm it is "
                                 f"[lo, hi] in original DDPM timestep indices, 0 <= lo <= hi <= {self.num_timesteps}, "
                                 "or null (guide every step)")
            if interval[1] <= 1.0:
                raise ValueError(f"sample.cfg_interval={list(interval)} looks like flow time or the released code's "
                                 f"fractions: with diffusion.objective=ddpm it is in DDPM timestep indices "
                                 f"(0..{self.num_timesteps - 1}, the released guidance_low/high times 1000), or null")
        channels = s.get("cfg_channels")
        if channels is not None and (isinstance(channels, bool) or int(channels) < 1):
            raise ValueError(f"sample.cfg_channels={channels!r}: expected null (all ε channels) or >= 1 (DiT: 3)")
        return DDPMSampler(self.diffusion.respace(str(steps)), str(method), int(steps), eta,
                           float(s.get("cfg_scale", 1.0)), interval, None if channels is None else int(channels),
                           self.num_timesteps, self.schedule)


# ------------------------------------------------------------------------------------------------ build


def build_objective(diffusion: Mapping[str, Any], model: Mapping[str, Any] | None = None) -> Objective:
    """The objective of ``cfg.diffusion`` (``objective``: flow when absent, as in configs written before DDPM),
    checked against ``cfg.model`` when given (time windows in the objective's units; learn_sigma picks DDPM's
    learned or fixed variance). ValueError naming the bad value, before any work."""
    name = diffusion.get("objective") or "flow"
    reduction = str(diffusion.get("loss_reduction", "mean"))
    draw = str(diffusion.get("sigma_tv_draw", "window"))
    if name == "flow":
        objective: Objective = FlowObjective(sigma_tv=float(diffusion.get("sigma_tv", 0.0)), sigma_tv_draw=draw,
                                             time_sampling=str(diffusion.get("time_sampling", "uniform")),
                                             reduction=reduction)
    elif name == "ddpm":
        objective = DDPMObjective(num_timesteps=int(diffusion.get("num_timesteps", 1000)),
                                  schedule=str(diffusion.get("schedule", "linear")),
                                  learn_sigma=bool((model or {}).get("learn_sigma", True)),
                                  sigma_tv=diffusion.get("sigma_tv", 0), sigma_tv_draw=draw, reduction=reduction,
                                  time_sampling=diffusion.get("time_sampling", "uniform"))
    else:
        raise ValueError(f"diffusion.objective={name!r}: expected one of {' | '.join(OBJECTIVES)}")
    if model is not None:
        objective.check_model(model)
    return objective
