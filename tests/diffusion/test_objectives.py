"""diffusion.objective (gd.diffusion.objectives): the config's options reach the DDPM loss and samplers, every
time-valued option is checked in its objective's units, and a sampler of the other objective is refused.
References: the closed-form DDPM schedule (tests/diffusion/ddpm_toy.py), written-out draws and rules."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gd.diffusion.ddpm import group_timesteps
from gd.diffusion.objective import group_loss
from gd.diffusion.objectives import DDPMObjective, FlowObjective, build_objective

from .ddpm_toy import ABAR, T, evenly_kept

DDPM = {"objective": "ddpm", "num_timesteps": 1000, "schedule": "linear", "mode": "l", "group_size": 4,
        "loss_reduction": "mean", "sigma_tv": 0, "sigma_tv_draw": "window", "time_sampling": "uniform"}
SAMPLE = {"method": "ddpm", "steps": 250, "eta": 0.0, "cfg_scale": 1.65, "cfg_interval": None, "cfg_channels": None}


class Recorder:
    """An ε model with 2C output channels that records what it is called with."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, x, t, y, group_size, full_output=False):
        self.calls.append(dict(x=x.clone(), t=t.clone(), y=y.clone(), group_size=group_size, full=full_output))
        out = torch.cat([0.1 * x, torch.zeros_like(x)], 1)
        return out if full_output else out[:, :x.shape[1]]


def test_ddpm_loss_gets_the_configs_spread_anchor_rule_reduction_and_full_output() -> None:
    """diffusion.sigma_tv=100, sigma_tv_draw=anchor, loss_reduction=group_sum reach the DDPM loss: the model is
    called with all channels, integer t drawn first from the micro-batch generator (replayed with the phase-1
    draw at spread 100, member 0 keeping its base), then the noise, x_t = sqrt(ᾱ_t) x + sqrt(1 - ᾱ_t) ε with ᾱ
    from the closed form; group_sum is N times the mean. Catches sigma_tv ignored or read as flow time, the draw order
    swapped, the learned variance not requested, and the reduction not passed."""
    gen_seed, x = 11, torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(8, dtype=torch.long)
    cfg = {**DDPM, "sigma_tv": 100, "sigma_tv_draw": "anchor", "loss_reduction": "group_sum"}
    objective = build_objective(cfg, {"learn_sigma": True})
    model = Recorder()
    gsum, per_image = objective.loss(objective.network(model), x, y, 4, torch.Generator().manual_seed(gen_seed))
    (call,) = model.calls
    replay = torch.Generator().manual_seed(gen_seed)
    t = group_timesteps(2, 4, T, spread=100, keep_anchor=True, generator=replay)
    noise = torch.randn(x.shape, generator=replay)
    assert call["full"] is True and call["t"].dtype == torch.long and torch.equal(call["t"], t)
    a = torch.from_numpy(ABAR[t.numpy()]).view(-1, 1, 1, 1)
    torch.testing.assert_close(call["x"].double(), a.sqrt() * x.double() + (1 - a).sqrt() * noise.double(),
                               rtol=1e-6, atol=1e-6)
    assert gsum.item() == pytest.approx(per_image.view(2, 4).sum(1).mean().item(), rel=1e-6)
    plain = build_objective({**cfg, "loss_reduction": "mean"}, {"learn_sigma": True})
    mean, _ = plain.loss(plain.network(Recorder()), x, y, 4, torch.Generator().manual_seed(gen_seed))
    assert gsum.item() == pytest.approx(4 * mean.item(), rel=1e-6)
    fixed = build_objective(DDPM, {"learn_sigma": False})
    assert fixed.diffusion.variance == "fixed_large" and objective.diffusion.variance == "learned_range"


def test_flow_objective_is_the_group_loss_the_trainer_ran_before() -> None:
    """With the flow objective the trainer's loss is unchanged: gd.diffusion.objective.group_loss with the config's
    sigma_tv, draw, time sampling and reduction, bit for bit, and the model called without full_output. Catches the
    refactor changing what every existing SiT run trains on."""
    cfg = {"objective": "flow", "sigma_tv": 0.1, "sigma_tv_draw": "anchor", "time_sampling": "logit_normal",
           "loss_reduction": "group_sum"}
    objective = build_objective(cfg)
    assert isinstance(objective, FlowObjective)
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(8, dtype=torch.long)
    model = Recorder()
    got, _ = objective.loss(objective.network(model), x, y, 4, torch.Generator().manual_seed(3))
    want, _ = group_loss(Recorder(), x, y, 4, sigma_tv=0.1, sigma_tv_draw="anchor", time_sampling="logit_normal",
                         reduction="group_sum", generator=torch.Generator().manual_seed(3))
    assert got.item() == want.item() and model.calls[0]["full"] is False
    assert build_objective({}).name == "flow"  # configs written before the objective existed


@pytest.mark.parametrize("diffusion, model, match", [
    ({**DDPM, "sigma_tv": 0.1}, None, r"sigma_tv=0.1: with diffusion.objective=ddpm it is a half-width in DDPM"),
    ({**DDPM, "sigma_tv": 1000}, None, r"an integer in \[0, 999\]"),
    ({"objective": "flow", "sigma_tv": 100}, None, r"sigma_tv=100.0: with diffusion.objective=flow .* \[0, 1\]"),
    ({**DDPM, "time_sampling": "logit_normal"}, None, "draws t uniformly"),
    ({**DDPM, "schedule": "cosine"}, None, "schedule"),
    ({**DDPM, "loss_reduction": "sum"}, None, "loss_reduction='sum'"),
    ({"objective": "edm"}, None, r"diffusion.objective='edm': expected one of flow \| ddpm"),
    (DDPM, {"group_t_window": [700, 1200]}, r"DDPM timestep indices, 0 <= t_lo <= t_hi <= 999"),
])
def test_options_are_checked_in_their_objectives_units(diffusion, model, match) -> None:
    """Each bad value is named with the unit its objective expects, before any work: catches a DDPM run that would
    silently train with σ_tv = 0 steps (0.1 rounded) or never group (a window past T)."""
    with pytest.raises(ValueError, match=match):
        build_objective(diffusion, model)


@pytest.mark.parametrize("diffusion, sample, match", [
    ({"objective": "flow"}, {**SAMPLE, "method": "ddpm"},
     r"sample.method='ddpm' samples the ddpm objective, but diffusion.objective=flow: its samplers are sde"),
    (DDPM, {**SAMPLE, "method": "sde"},
     r"sample.method='sde' samples the flow objective, but diffusion.objective=ddpm: its samplers are ddpm \| ddim"),
    (DDPM, {**SAMPLE, "method": "plms"}, r"sample.method='plms': expected one of ddpm \| ddim"),
    (DDPM, {**SAMPLE, "cfg_interval": [0.25, 0.75]}, "looks like flow time or the released code's fractions"),
    (DDPM, {**SAMPLE, "cfg_interval": [500, 100]}, r"0 <= lo <= hi <= 1000"),
    (DDPM, {**SAMPLE, "steps": 1}, r"sample.steps=1: .* \[2, 1000\]"),
    (DDPM, {**SAMPLE, "eta": 0.5}, "only for sample.method=ddim"),
    (DDPM, {**SAMPLE, "cfg_channels": 0}, "cfg_channels=0"),
])
def test_sampler_settings_are_refused_for_the_wrong_objective(diffusion, sample, match) -> None:
    """A flow model with method=ddpm (or the reverse), a flow-time or fractional CFG interval for DDPM, and
    impossible step counts fail when the sampler is built, before a checkpoint is read."""
    with pytest.raises(ValueError, match=match):
        build_objective(diffusion).sampler(sample)


def test_ddpm_sampler_respaces_and_guides_as_configured() -> None:
    """sample.steps=250 keeps DiT's 250 evenly spread original steps with ᾱ unchanged there; the interval stays
    in original indices (null: every step); DDIM keeps eta; settings name the objective. Catches steps taken
    as DDIM's stride rule, an interval rescaled, or a flow settings record for a DDPM run."""
    objective = build_objective(DDPM, {"learn_sigma": True})
    sampler = objective.sampler(SAMPLE)
    assert sampler.diffusion.timestep_map.tolist() == evenly_kept(250)
    np.testing.assert_allclose(sampler.diffusion.alphas_cumprod.numpy(), ABAR[evenly_kept(250)], rtol=1e-12)
    settings = sampler.settings()
    assert settings == {"objective": "ddpm", "num_timesteps": 1000, "schedule": "linear",
                        "variance": "learned_range", "method": "ddpm", "steps": 250, "eta": 0.0, "cfg_scale": 1.65,
                        "cfg_interval": None, "cfg_channels": None}
    ddim = objective.sampler({**SAMPLE, "method": "ddim", "steps": 50, "eta": 0.5, "cfg_interval": [250, 1000],
                              "cfg_channels": 3})
    assert ddim.diffusion.timestep_map.tolist() == evenly_kept(50)
    assert (ddim.eta, ddim.cfg_interval, ddim.cfg_channels) == (0.5, (250.0, 1000.0), 3)


def test_probe_points_have_signal_to_noise_ratio_one() -> None:
    """S_cross is measured where ᾱ / (1 - ᾱ) = 1 in both objectives: flow t = 0.5, DDPM the index with ᾱ nearest
    1/2 (from the closed form) noised as q_sample. Catches the DDPM probe fed flow time 0.5 (index 0 after a
    cast), or the middle index 500 (SNR 0.09)."""
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    ddpm = DDPMObjective()
    x_t, t = ddpm.probe_input(x, noise)
    k = int(np.abs(ABAR - 0.5).argmin())
    assert t.dtype == torch.long and t.tolist() == [k] * 4 and 0.45 < ABAR[k] < 0.55
    torch.testing.assert_close(x_t, math.sqrt(ABAR[k]) * x + math.sqrt(1 - ABAR[k]) * noise)
    f_x, f_t = FlowObjective().probe_input(x, noise)
    assert f_t.tolist() == [0.5] * 4
    torch.testing.assert_close(f_x, 0.5 * x + 0.5 * noise)
