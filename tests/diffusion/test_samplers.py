"""Samplers against closed-form velocity fields (float64): distributions, convergence orders, SiT's SDE."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from gd.diffusion import CallStats, sample
from tests.diffusion.fields import GaussianField, MixtureField

GAUSS = GaussianField(mu=[1.0, -2.0], s=[0.5, 2.0])
MIX = MixtureField(weights=[0.5, 0.3, 0.2], mus=[[-2.0, 0.0], [2.0, 1.0], [0.0, 3.0]], scales=[0.5, 0.8, 0.3])


def _noise(n: int, d: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _labels(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


def _check_moments(x: torch.Tensor, field, mean_slack: float, cov_rtol: float) -> None:
    n = x.shape[0]
    mean, cov = x.mean(0), torch.cov(x.T)
    se = (torch.diag(field.cov()) / n).sqrt()
    assert torch.all((mean - field.mean()).abs() <= 4 * se + mean_slack), (mean, field.mean())
    scale = torch.sqrt(torch.outer(torch.diag(field.cov()), torch.diag(field.cov())))
    assert torch.all((cov - field.cov()).abs() <= cov_rtol * scale), (cov, field.cov())


@pytest.mark.parametrize("method,steps", [("euler", 200), ("heun", 40), ("dopri5", 10), ("sde", 250)])
def test_gaussian_distribution(method: str, steps: int) -> None:
    x0 = _noise(20000)
    out = sample(GAUSS.model, x0, _labels(x0.shape[0]), method=method, steps=steps,
                 generator=torch.Generator().manual_seed(1), atol=1e-8, rtol=1e-8)
    _check_moments(out, GAUSS, mean_slack=0.02, cov_rtol=0.06)


@pytest.mark.parametrize("method,steps", [("euler", 200), ("heun", 40), ("dopri5", 10), ("sde", 250)])
def test_mixture_distribution(method: str, steps: int) -> None:
    x0 = _noise(20000, seed=2)
    out = sample(MIX.model, x0, _labels(x0.shape[0]), method=method, steps=steps,
                 generator=torch.Generator().manual_seed(3), atol=1e-7, rtol=1e-7)
    _check_moments(out, MIX, mean_slack=0.03, cov_rtol=0.06)
    # the reference: exact draws from the mixture, compared on the same statistics with the same tolerance
    ref = MIX.draw(20000, torch.Generator().manual_seed(4))
    _check_moments(ref, MIX, mean_slack=0.03, cov_rtol=0.06)
    # Moments alone pass a sampler that loses or merges a mode: every component must hold its weight of the samples
    # (assigned by posterior responsibility at t = 1), within 4 binomial sigmas plus 1% for assignment overlap.
    share = _component_shares(out)
    for k, w in enumerate(MIX.pi.tolist()):
        assert abs(share[k] - w) <= 4 * math.sqrt(w * (1 - w) / out.shape[0]) + 0.01, (method, share, MIX.pi)


def _component_shares(x: torch.Tensor) -> list[float]:
    """Fraction of samples whose most likely component (Gaussian log-density plus log weight) is k."""
    d = x.shape[1]
    logp = (torch.log(MIX.pi)[None] - d * torch.log(MIX.s)[None]
            - 0.5 * ((x[:, None, :] - MIX.mus[None]) ** 2).sum(-1) / MIX.s[None] ** 2)
    return torch.bincount(logp.argmax(1), minlength=len(MIX.pi)).double().div(x.shape[0]).tolist()


def _ode_error(method: str, steps: int) -> float:
    x0 = _noise(64, seed=5)
    out = sample(GAUSS.model, x0, _labels(64), method=method, steps=steps)
    return float((out - GAUSS.solution(x0)).abs().max())


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_convergence_order(method: str, order: int) -> None:
    errs = [_ode_error(method, n) for n in (16, 32, 64, 128)]
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    target = 2.0**order
    assert all(0.8 * target <= r <= 1.2 * target for r in ratios), (errs, ratios)


def test_dopri5_tight_tolerance_matches_exact_solution() -> None:
    x0 = _noise(64, seed=6)
    out = sample(GAUSS.model, x0, _labels(64), method="dopri5", atol=1e-10, rtol=1e-10)
    assert float((out - GAUSS.solution(x0)).abs().max()) < 1e-7
    loose = sample(GAUSS.model, x0, _labels(64), method="dopri5", atol=1e-3, rtol=1e-3)
    assert float((loose - GAUSS.solution(x0)).abs().max()) > 1e-7


def test_dopri5_converges_as_tolerance_tightens() -> None:
    """atol = rtol from 1e-3 to 1e-9: the error against the closed-form solution tracks the tolerance (falls by
    orders of magnitude, never rises by more than noise) while the adaptive step count, hence NFE, grows."""
    x0 = _noise(64, seed=7)
    tols = [10.0**-e for e in range(3, 10)]
    errs, nfes = [], []
    for tol in tols:
        stats = CallStats()
        out = sample(GAUSS.model, x0, _labels(64), method="dopri5", atol=tol, rtol=tol, stats=stats)
        errs.append(float((out - GAUSS.solution(x0)).abs().max()))
        nfes.append(stats.nfe)
    assert all(b <= 1.5 * a for a, b in itertools.pairwise(errs)), errs
    assert errs[0] / errs[-1] > 1e5 and errs[-1] < 1e-8, errs
    assert all(e <= 100 * tol for e, tol in zip(errs, tols)), (errs, tols)
    assert all(b >= a for a, b in itertools.pairwise(nfes)) and nfes[-1] >= 4 * nfes[0], nfes


def test_dopri5_never_evaluates_past_t1() -> None:
    seen: list[float] = []

    def model(x, t, y, g):
        seen.append(float(t[0]))
        return GAUSS.velocity(x, t)

    sample(model, _noise(8), _labels(8), method="dopri5")
    assert min(seen) >= 0.0 and max(seen) <= 1.0


def _sit_sde_reference(x: torch.Tensor, steps: int, gen: torch.Generator, last: float = 0.04) -> torch.Tensor:
    """SiT's sample_sde for a velocity model, linear path, diffusion form "sigma", last step "Mean", written out
    as an explicit per-sample loop in float64."""
    ts = [i * (1.0 - last) / (steps - 1) for i in range(steps)]
    dt = ts[1] - ts[0]

    def sde_drift(xi: torch.Tensor, t: float) -> torch.Tensor:
        v = GAUSS.velocity(xi[None], torch.tensor([t], dtype=torch.float64))[0]
        score = (t * v - xi) / (1.0 - t)  # var = sigma^2 - (alpha / alpha') sigma' sigma = 1 - t
        return v + (1.0 - t) * score

    x = x.clone()
    for t in ts[:-1]:
        dw = torch.randn(x.shape, generator=gen, dtype=torch.float64) * math.sqrt(dt)
        for i in range(x.shape[0]):
            x[i] = x[i] + sde_drift(x[i], t) * dt + math.sqrt(2 * (1.0 - t)) * dw[i]
    for i in range(x.shape[0]):
        x[i] = x[i] + sde_drift(x[i], ts[-1]) * last
    return x


def test_sde_matches_sit_conventions_exactly() -> None:
    x0 = _noise(6, seed=7)
    ref = _sit_sde_reference(x0, 20, torch.Generator().manual_seed(8))
    stats = CallStats()
    out = sample(GAUSS.model, x0, _labels(6), method="sde", steps=20, generator=torch.Generator().manual_seed(8),
                 stats=stats)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    assert stats.nfe == 20  # 19 noisy steps + the "Mean" last step, like SiT's num_steps


def _released_sde_reference(x: torch.Tensor, steps: int, gen: torch.Generator, last: float = 0.04) -> torch.Tensor:
    """The released GroupDiff (REPA transport) sampler in ITS time s (1 = noise), written out per sample in float64:
    grid s_k = 1 - k (1 - last) / (steps - 1); drift v' - w(s) score, w = s_c / (1 - s_c), s_c = clamp(s, 1e-4,
    0.999); score from v' with the unclamped s; x <- x - drift ds + sqrt(2 w) dW, then the noise-free "Mean" step
    of size `last`. The model v'(x, s) = -v(x, 1 - s)."""
    ss = [1.0 - i * (1.0 - last) / (steps - 1) for i in range(steps)]

    def drift(xi: torch.Tensor, s: float) -> torch.Tensor:
        v = -GAUSS.velocity(xi[None], torch.tensor([1.0 - s], dtype=torch.float64))[0]
        score = (-(1.0 - s) * v - xi) / s
        sc = min(max(s, 1e-4), 0.999)
        return v - sc / (1.0 - sc) * score

    x = x.clone()
    for k in range(steps - 1):
        s, ds = ss[k], ss[k] - ss[k + 1]
        sc = min(max(s, 1e-4), 0.999)
        dw = torch.randn(x.shape, generator=gen, dtype=torch.float64) * math.sqrt(ds)
        for i in range(x.shape[0]):
            x[i] = x[i] - drift(x[i], s) * ds + math.sqrt(2 * sc / (1.0 - sc)) * dw[i]
    for i in range(x.shape[0]):
        x[i] = x[i] - drift(x[i], ss[-1]) * last
    return x


def test_sbdm_sde_from_t0_matches_the_released_sampler() -> None:
    """diffusion_form=SBDM with sample_eps=0 is the released GroupDiff sampler transcribed in its own time: the
    clamped w (999 at the noise end), the grid starting at pure noise, the score at t = 0. Catches an unclamped w
    (infinite at t = 0), a grid starting at 1e-3, or a time/sign error in the translation."""
    x0 = _noise(6, seed=3)
    ref = _released_sde_reference(x0, 30, torch.Generator().manual_seed(4))
    out = sample(GAUSS.model, x0, _labels(6), method="sde", steps=30, generator=torch.Generator().manual_seed(4),
                 diffusion_form="SBDM", sample_eps=0.0)
    assert torch.allclose(out, ref, atol=1e-10, rtol=0)


def test_sbdm_sde_samples_the_distribution() -> None:
    """The released SDE (250 steps from pure noise) reaches the data distribution of a Gaussian toy."""
    x0 = _noise(20000, seed=5)
    out = sample(GAUSS.model, x0, _labels(x0.shape[0]), method="sde", steps=250,
                 generator=torch.Generator().manual_seed(6), diffusion_form="SBDM", sample_eps=0.0)
    _check_moments(out, GAUSS, mean_slack=0.02, cov_rtol=0.06)


@pytest.mark.parametrize("method,steps,nfe", [("euler", 7, 7), ("heun", 7, 14), ("sde", 7, 7)])
def test_nfe_and_trajectory(method: str, steps: int, nfe: int) -> None:
    x0 = _noise(4)
    stats = CallStats()
    final, traj = sample(GAUSS.model, x0, _labels(4), method=method, steps=steps, return_trajectory=True,
                         stats=stats, generator=torch.Generator().manual_seed(0))
    assert stats.nfe == nfe and stats.forward_calls == nfe
    assert traj.shape == (steps + 1, 4, 2)
    assert torch.equal(traj[0], x0) and torch.equal(traj[-1], final)


def test_dopri5_trajectory_points() -> None:
    x0 = _noise(4)
    final, traj = sample(GAUSS.model, x0, _labels(4), method="dopri5", steps=5, return_trajectory=True,
                         atol=1e-10, rtol=1e-10)
    assert traj.shape == (6, 4, 2) and torch.equal(traj[-1], final)
    t = torch.tensor(0.4, dtype=torch.float64)
    exact = t * GAUSS.mu + torch.sqrt(t**2 * GAUSS.s**2 + (1 - t) ** 2) * x0
    assert torch.allclose(traj[2], exact, atol=1e-7)


def test_sde_is_reproducible_from_generator() -> None:
    x0 = _noise(8)
    a = sample(GAUSS.model, x0, _labels(8), steps=10, generator=torch.Generator().manual_seed(3))
    b = sample(GAUSS.model, x0, _labels(8), steps=10, generator=torch.Generator().manual_seed(3))
    c = sample(GAUSS.model, x0, _labels(8), steps=10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="rk4"), "method"),
    (dict(steps=0), "steps"),
    (dict(method="sde", steps=1), "steps >= 2"),
    (dict(group_size=3), "group_size=3"),
    (dict(uncond_group_size=3), "uncond_group_size=3"),
    (dict(cfg_interval=(0.8, 0.2), cfg_scale=2.0, null_class=1), "cfg_interval"),
    (dict(cfg_scale=2.0), "null class"),
    (dict(cfg_channels=5), "cfg_channels"),
    (dict(last_step="Tweedie"), "last_step"),
])
def test_bad_input_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sample(GAUSS.model, _noise(4), _labels(4), **kwargs)
