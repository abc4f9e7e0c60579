"""DiT's DDPM objective and samplers (gd.diffusion.ddpm) against independent float64 references: the schedule's
closed forms, Gaussian conditioning, hand-written KL and erf likelihoods, an exact Gaussian toy, written-out CFG."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from gd.diffusion.ddpm import (GaussianDiffusion, GuidedEps, build_ddpm, discretized_gaussian_log_likelihood,
                               group_loss, group_timesteps, hybrid_terms, linear_betas, normal_kl, sample,
                               space_timesteps)
from gd.diffusion.guidance import CallStats

from .ddpm_toy import ABAR, BETAS, T, GaussianToy, evenly_kept

F64 = torch.float64


def _std_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


# ---------------------------------------------------------------- schedule


def test_betas_and_alphas_cumprod_match_the_closed_form() -> None:
    """Catches a wrong β range or scaling, float32 tables, or an off-by-one cumprod (ᾱ_0 must be 1 - β_0)."""
    d = build_ddpm()
    assert d.num_timesteps == T and d.betas.dtype == F64
    np.testing.assert_allclose(d.betas.numpy(), BETAS, rtol=1e-13, atol=0)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ABAR, rtol=1e-12, atol=0)
    assert d.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, abs=1e-15)
    assert d.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)  # DiT's ᾱ at t = 999
    # other T: both ends of the linear β scale by 1000 / T (ADM), so the schedule keeps its shape
    b500 = linear_betas(500).numpy()
    assert b500[0] == pytest.approx(2e-4) and b500[-1] == pytest.approx(0.04)


def test_q_sample_and_the_eps_x0_conversions() -> None:
    """Catches swapped sqrt(ᾱ) / sqrt(1 - ᾱ), or predict_x0 / predict_eps that do not invert q_sample."""
    d = build_ddpm()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 2, 2, generator=gen, dtype=F64)
    eps = torch.randn(5, 3, 2, 2, generator=gen, dtype=F64)
    t = torch.tensor([0, 1, 400, 998, 999])
    a = torch.from_numpy(ABAR[t.numpy()]).view(-1, 1, 1, 1)
    x_t = d.q_sample(x0, t, eps)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(d.predict_x0(x_t, t, eps), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d.predict_eps(x_t, t, x0), eps, rtol=1e-9, atol=1e-9)


def test_posterior_matches_gaussian_conditioning() -> None:
    """q(x_{t-1} | x_t, x_0) from Bayes' rule on x_{t-1} ~ N(sqrt(ᾱ_{t-1}) x_0, 1 - ᾱ_{t-1}),
    x_t | x_{t-1} ~ N(sqrt(α_t) x_{t-1}, β_t): catches a wrong posterior coefficient or variance, and a missing
    clip of log β̃_0 = log 0 (it must be log β̃_1)."""
    d = build_ddpm()
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 2, 17, 500, 999])
    x0 = torch.randn(6, 2, generator=gen, dtype=F64)
    x_t = torch.randn(6, 2, generator=gen, dtype=F64)
    mean, var, log_var = d.q_posterior(x0, x_t, t)
    for i, s in enumerate(t.tolist()):
        a_prev = ABAR[s - 1] if s > 0 else 1.0
        alpha, beta = 1.0 - BETAS[s], BETAS[s]
        if s == 0:  # x_{-1} is x_0 itself: a point mass
            exp_mean, exp_var = x0[i].numpy(), 0.0
        else:
            precision = 1.0 / (1.0 - a_prev) + alpha / beta
            exp_var = 1.0 / precision
            exp_mean = exp_var * (math.sqrt(a_prev) * x0[i].numpy() / (1.0 - a_prev)
                                  + math.sqrt(alpha) * x_t[i].numpy() / beta)
        np.testing.assert_allclose(mean[i].numpy(), exp_mean, rtol=1e-10, atol=1e-12)
        assert var[i].item() == pytest.approx(exp_var, rel=1e-10, abs=1e-300)
    tilde1 = BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1])
    assert log_var[0].item() == pytest.approx(math.log(tilde1), rel=1e-12)
    assert log_var[3].item() == pytest.approx(math.log(var[3].item()), rel=1e-12)


def test_learned_range_interpolates_log_variance_between_posterior_and_beta() -> None:
    """v = -1 is β̃_t, +1 is β_t, 0 their geometric mean: catches a swapped or linear (not log) interpolation,
    and wrong fixed_large / fixed_small tables (fixed_large uses β̃_1 at t = 0, as DDPM/ADM)."""
    d = build_ddpm()
    t = torch.tensor([0, 5, 999])
    x = torch.zeros(3, 1, dtype=F64)
    tilde = BETAS * np.concatenate([[1.0], 1 - ABAR[:-1]]) / (1 - ABAR)
    tilde_c = np.concatenate([[tilde[1]], tilde[1:]])
    for v, expect in ((-1.0, np.log(tilde_c)), (1.0, np.log(BETAS)), (0.0, 0.5 * np.log(tilde_c * BETAS))):
        out = torch.cat([torch.zeros(3, 1, dtype=F64), torch.full((3, 1), v, dtype=F64)], dim=1)
        got = d.p_mean_variance(out, x, t).log_variance[:, 0].numpy()
        np.testing.assert_allclose(got, expect[t.numpy()], rtol=1e-12)
    large = build_ddpm(learn_sigma=False).p_mean_variance(torch.zeros(3, 1, dtype=F64), x, t).log_variance
    np.testing.assert_allclose(large[:, 0].numpy(), np.log([tilde[1], BETAS[5], BETAS[999]]), rtol=1e-12)
    small = build_ddpm(learn_sigma=False, sigma_small=True).p_mean_variance(torch.zeros(3, 1, dtype=F64), x, t)
    np.testing.assert_allclose(small.log_variance[:, 0].numpy(), np.log(tilde_c[[0, 5, 999]]), rtol=1e-12)


def test_space_timesteps_notation() -> None:
    """Catches a respacing that drops an end, strides wrongly, or mis-splits sections (ADM's notation)."""
    assert space_timesteps(T, "250") == evenly_kept(250)
    assert space_timesteps(T, 250) == evenly_kept(250)
    assert space_timesteps(T, "ddim50") == list(range(0, T, 20))
    assert space_timesteps(T, "ddim25") == list(range(0, T, 40))
    # three sections of 100 steps: 10, 15, 20 steps spread evenly inside each
    got = space_timesteps(300, "10,15,20")
    assert got == ([round(i * 99 / 9) for i in range(10)] + [100 + round(i * 99 / 14) for i in range(15)]
                   + [200 + round(i * 99 / 19) for i in range(20)])
    assert space_timesteps(T, [T]) == list(range(T))
    for bad, match in (("ddim999", "no integer stride"), ("12x", "expected"), ("0", ">= 1"), ("1001", "cannot take")):
        with pytest.raises(ValueError, match=match):
            space_timesteps(T, bad)


def test_respacing_keeps_alphas_cumprod_and_the_original_model_timesteps() -> None:
    """ᾱ' at every kept step equals the original ᾱ (new β' = 1 - ᾱ_s / ᾱ_prev): catches respacing that keeps the
    original β's, and a model fed the respaced indices instead of the original ones (also after respacing twice)."""
    base = build_ddpm()
    for spec in ("250", "ddim50", "10,20,30", "7"):
        kept = space_timesteps(T, spec)
        d = base.respace(spec)
        assert d.num_timesteps == len(kept) and d.timestep_map.tolist() == kept
        np.testing.assert_allclose(d.alphas_cumprod.numpy(), ABAR[kept], rtol=1e-12, atol=0)
        assert d.model_timesteps(torch.arange(len(kept))).tolist() == kept
    twice = base.respace("250").respace("ddim25")
    assert twice.timestep_map.tolist() == [evenly_kept(250)[i] for i in range(0, 250, 10)]
    np.testing.assert_allclose(twice.alphas_cumprod.numpy(), ABAR[twice.timestep_map.numpy()], rtol=1e-12)
    assert build_ddpm(respacing="250").timestep_map.tolist() == evenly_kept(250)
    assert base.respace(None) is base and base.respace("") is base


# ---------------------------------------------------------------- likelihood and the hybrid loss


def test_normal_kl_matches_the_hand_formula() -> None:
    """KL(N(m1, s1²) || N(m2, s2²)) = log(s2 / s1) + (s1² + (m1 - m2)²) / (2 s2²) - 1/2: catches swapped
    arguments (KL is not symmetric) or a missing factor."""
    m1, m2 = torch.tensor([0.3, -1.0, 2.0], dtype=F64), torch.tensor([0.1, 0.5, 2.0], dtype=F64)
    s1, s2 = torch.tensor([0.5, 2.0, 1.0], dtype=F64), torch.tensor([1.5, 0.7, 1.0], dtype=F64)
    got = normal_kl(m1, 2 * s1.log(), m2, 2 * s2.log())
    for i in range(3):
        a, b, u, w = s1[i].item(), s2[i].item(), m1[i].item(), m2[i].item()
        assert got[i].item() == pytest.approx(math.log(b / a) + (a * a + (u - w) ** 2) / (2 * b * b) - 0.5, rel=1e-12)
    assert got[2].item() == 0.0


def test_discretized_likelihood_matches_erf_and_normalises() -> None:
    """Bin probabilities Φ((x ± 1/255 - m) / s) written with math.erf, open edge bins at ±1; over the 256 grid
    values they sum to 1: catches a wrong bin width, a missing edge case, or a scale passed as a variance."""
    grid = torch.arange(256, dtype=F64) / 127.5 - 1.0
    for m, s in ((0.1, 0.05), (-0.9, 0.3), (0.99, 0.01)):
        mean, log_s = torch.full_like(grid, m), torch.full_like(grid, math.log(s))
        logp = discretized_gaussian_log_likelihood(grid, mean, log_s)
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
        for k in (0, 3, 128, 200, 255):
            x = grid[k].item()
            if k == 0:
                p = _std_cdf((x + 1 / 255 - m) / s)
            elif k == 255:
                p = 1.0 - _std_cdf((x - 1 / 255 - m) / s)
            else:
                p = _std_cdf((x + 1 / 255 - m) / s) - _std_cdf((x - 1 / 255 - m) / s)
            assert logp[k].item() == pytest.approx(math.log(max(p, 1e-12)), rel=1e-7, abs=1e-9)


def _hand_terms(x0, x_t, s, noise, eps, v):
    """One image's (mse, vb in bits) from the formulas, with the posterior from Gaussian conditioning."""
    a, a_prev = ABAR[s], (ABAR[s - 1] if s > 0 else 1.0)
    alpha, beta = 1.0 - BETAS[s], BETAS[s]
    mse = float(np.mean((noise - eps) ** 2))
    tilde = lambda r: BETAS[r] * (1 - (ABAR[r - 1] if r > 0 else 1.0)) / (1 - ABAR[r])  # noqa: E731
    log_tilde = math.log(tilde(max(s, 1)))
    log_var = (v + 1) / 2 * math.log(beta) + (1 - (v + 1) / 2) * log_tilde
    pred_x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    if s == 0:
        mean = pred_x0
        probs = []
        for xi, mi, lv in zip(x0.ravel(), mean.ravel(), log_var.ravel()):
            sd = math.exp(0.5 * lv)
            hi = 1.0 if xi > 0.999 else _std_cdf((xi + 1 / 255 - mi) / sd)
            lo = 0.0 if xi < -0.999 else _std_cdf((xi - 1 / 255 - mi) / sd)
            probs.append(max(hi - lo, 1e-12))
        return mse, -float(np.mean(np.log(probs))) / math.log(2)
    var_q = 1.0 / (1.0 / (1.0 - a_prev) + alpha / beta)
    mean_of = lambda z0: var_q * (math.sqrt(a_prev) * z0 / (1 - a_prev) + math.sqrt(alpha) * x_t / beta)  # noqa: E731
    m_q, m_p, var_p = mean_of(x0), mean_of(pred_x0), np.exp(log_var)
    kl = np.log(np.sqrt(var_p / var_q)) + (var_q + (m_q - m_p) ** 2) / (2 * var_p) - 0.5
    return mse, float(np.mean(kl)) / math.log(2)


def test_hybrid_loss_matches_hand_computation() -> None:
    """MSE(ε) + the VLB term in bits per dim: Gaussian KL at t > 0, discretised decoder NLL at t = 0, against
    formulas written out per image. Catches nats instead of bits, a sum instead of a mean over dims, a KL with
    the arguments swapped, the t = 0 branch taken at the wrong step, and a rescaling DiT does not do."""
    d = build_ddpm()
    gen = torch.Generator().manual_seed(2)
    b, c = 5, 3
    x0 = (torch.randint(0, 256, (b, c, 2, 2), generator=gen).double() / 127.5 - 1.0)  # on the 8-bit grid
    noise = torch.randn(b, c, 2, 2, generator=gen, dtype=F64)
    t = torch.tensor([0, 1, 3, 600, 999])
    x_t = d.q_sample(x0, t, noise)
    eps = noise + 0.3 * torch.randn(b, c, 2, 2, generator=gen, dtype=F64)
    v = torch.rand(b, c, 2, 2, generator=gen, dtype=F64) * 2 - 1
    terms = hybrid_terms(d, torch.cat([eps, v], 1), x0, x_t, t, noise)
    for i, s in enumerate(t.tolist()):
        mse, vb = _hand_terms(x0[i].numpy(), x_t[i].numpy(), s, noise[i].numpy(), eps[i].numpy(), v[i].numpy())
        assert terms.mse[i].item() == pytest.approx(mse, rel=1e-12)
        assert terms.vb[i].item() == pytest.approx(vb, rel=1e-8, abs=1e-12), s
    torch.testing.assert_close(terms.loss, terms.mse + terms.vb)
    assert terms.vb[0] > 1.0 > terms.vb[1:].max()  # the t = 0 decoder term is the large one here


def test_vlb_trains_only_the_variance_channels() -> None:
    """The bound's gradient reaches v but not ε (stop-gradient on the mean), the MSE's reaches ε only:
    catches a missing detach, which lets the VB term pull on the ε prediction."""
    d = build_ddpm()
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 2, 3, 3, generator=gen)
    noise = torch.randn(4, 2, 3, 3, generator=gen)
    t = torch.tensor([0, 10, 300, 900])
    x_t = d.q_sample(x0, t, noise)
    out = torch.randn(4, 4, 3, 3, generator=gen).requires_grad_(True)
    terms = hybrid_terms(d, out, x0, x_t, t, noise)
    (g_vb,) = torch.autograd.grad(terms.vb.sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(terms.mse.sum(), out)
    assert g_vb[:, :2].abs().max() == 0 and g_vb[:, 2:].abs().min() > 0
    assert g_mse[:, 2:].abs().max() == 0 and g_mse[:, :2].abs().max() > 0


def test_rescale_vlb_is_T_over_1000_and_off_by_default() -> None:
    """ADM's RESCALED_MSE multiplies the VB term by T/1000; DiT trains without it (a factor 1 at T = 1000):
    catches the factor applied by default or inverted."""
    gen = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(3, 2, 2, 2, generator=gen), torch.randn(3, 2, 2, 2, generator=gen)
    out = torch.randn(3, 4, 2, 2, generator=gen)
    t = torch.tensor([1, 100, 499])
    plain = GaussianDiffusion(linear_betas(500))
    scaled = GaussianDiffusion(linear_betas(500), rescale_vlb=True)
    x_t = plain.q_sample(x0, t, noise)
    a, b = hybrid_terms(plain, out, x0, x_t, t, noise), hybrid_terms(scaled, out, x0, x_t, t, noise)
    torch.testing.assert_close(b.vb, 0.5 * a.vb)
    assert not build_ddpm().rescale_vlb


# ---------------------------------------------------------------- group timesteps and the group loss


def test_group_timesteps_bounds_anchor_rule_and_replay() -> None:
    """Members lie in [max(0, b - o), min(T - 1, b + o)] around their group's base b; keep_anchor puts b on member 0;
    the same generator replays the same draw. Catches an unclipped window, a spread in the wrong units, member 0
    redrawn when it should keep b, and draws from the global RNG."""
    g, n, o = 4000, 4, 100
    anchored = group_timesteps(g, n, T, spread=o, keep_anchor=True, generator=torch.Generator().manual_seed(7))
    free = group_timesteps(g, n, T, spread=o, generator=torch.Generator().manual_seed(7))
    replay = group_timesteps(g, n, T, spread=o, generator=torch.Generator().manual_seed(7))
    assert anchored.dtype == torch.long and anchored.shape == (g * n,)
    torch.testing.assert_close(free, replay, rtol=0, atol=0)
    base = anchored.view(g, n)[:, 0]  # the bases come first from the generator, whichever the rule
    for t in (anchored.view(g, n), free.view(g, n)):
        assert bool((t >= (base - o).clamp(min=0)[:, None]).all())
        assert bool((t <= (base + o).clamp(max=T - 1)[:, None]).all())
    assert (free.view(g, n)[:, 0] != base).float().mean() > 0.9  # the released rule redraws member 0
    assert bool((free.view(g, n) == 0).any()) and bool((free.view(g, n) == T - 1).any())  # the clipped edges
    flat = group_timesteps(g, n, T, generator=torch.Generator().manual_seed(8)).view(g, n)
    assert bool((flat == flat[:, :1]).all()) and flat.unique().numel() > 900  # spread 0: one t per group


def test_group_timesteps_members_are_uniform_in_the_window() -> None:
    """Offsets t - b of the members of interior groups are uniform on {-o, ..., o}: catches a window one step
    short at either end (a rounding bias of floor/ceil) with 5-sigma bounds on each of the 2o + 1 frequencies."""
    g, n, o, steps = 30000, 4, 5, 40
    t = group_timesteps(g, n, steps, spread=o, keep_anchor=True, generator=torch.Generator().manual_seed(9)).view(g, n)
    inner = (t[:, 0] >= o) & (t[:, 0] <= steps - 1 - o)
    offsets = (t[inner, 1:] - t[inner, :1]).reshape(-1)
    counts = torch.bincount(offsets + o, minlength=2 * o + 1).double()
    p, m = 1 / (2 * o + 1), offsets.numel()
    assert counts.shape == (2 * o + 1,)
    assert bool(((counts / m - p).abs() <= 5 * math.sqrt(p * (1 - p) / m)).all()), counts


def test_group_loss_reductions_and_what_the_model_sees() -> None:
    """"mean" averages all G*N per-image losses (DiT), "group_sum" sums each group then averages groups (N times
    the mean); the model gets x_t, the ORIGINAL timesteps of a respaced diffusion, the labels and the group size.
    Catches a wrong reduction and a model fed respaced indices."""
    seen = {}

    def model(x, t, y, group_size):
        seen.update(t=t.clone(), group_size=group_size, y=y.clone())
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1)

    d = build_ddpm(respacing="ddim10")  # kept steps 0, 100, ..., 900
    x0 = torch.randn(6, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6)
    t = torch.tensor([0, 1, 2, 3, 4, 9])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    mean, terms = group_loss(d, model, x0, y, 3, t=t, noise=noise)
    gsum, _ = group_loss(d, model, x0, y, 3, t=t, noise=noise, reduction="group_sum")
    assert seen["t"].tolist() == [0, 100, 200, 300, 400, 900] and seen["group_size"] == 3
    assert torch.equal(seen["y"], y)
    assert mean.item() == pytest.approx(terms.loss.mean().item(), rel=1e-6)
    assert gsum.item() == pytest.approx(terms.loss.view(2, 3).sum(1).mean().item(), rel=1e-6)
    assert gsum.item() == pytest.approx(3 * mean.item(), rel=1e-6)
    # drawn with a generator: replayable
    a, _ = group_loss(d, model, x0, y, 3, spread=2, generator=torch.Generator().manual_seed(5))
    b, _ = group_loss(d, model, x0, y, 3, spread=2, generator=torch.Generator().manual_seed(5))
    assert a.item() == b.item()


def test_bad_inputs_are_refused_with_the_value() -> None:
    """Clear errors before any work: catches a silently accepted float t, out-of-range t, 2C-less output,
    unknown names."""
    d = build_ddpm()
    x0, y = torch.zeros(4, 2, 2, 2), torch.zeros(4, dtype=torch.long)
    full = lambda x, t, y, n: torch.zeros(x.shape[0], 4, 2, 2)  # noqa: E731
    with pytest.raises(ValueError, match="integer indices"):
        group_loss(d, full, x0, y, 2, t=torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        group_loss(d, full, x0, y, 2, t=torch.tensor([0, 1, 2, 1000]))
    with pytest.raises(ValueError, match="full_output=True"):
        group_loss(d, lambda x, t, y, n: x, x0, y, 2, generator=torch.Generator())
    with pytest.raises(ValueError, match="reduction"):
        group_loss(d, full, x0, y, 2, reduction="sum")
    with pytest.raises(ValueError, match="groups of size 3"):
        group_loss(d, full, x0, y, 3)
    with pytest.raises(ValueError, match="spread"):
        group_timesteps(2, 2, T, spread=1.5)
    with pytest.raises(ValueError, match="schedule"):
        build_ddpm(schedule="cosine")
    with pytest.raises(ValueError, match="keeps 1 step"):
        build_ddpm(respacing="1")
    with pytest.raises(TypeError):
        build_ddpm(num_steps=10)
    with pytest.raises(ValueError, match="cfg_interval"):
        GuidedEps(full, y, null_class=4, cfg_scale=2.0, cfg_interval=(500, 100))
    with pytest.raises(ValueError, match="method"):
        sample(d, full, x0, y, method="euler")


# ---------------------------------------------------------------- samplers on the Gaussian toy

MU, S2 = [0.5, -1.0, 0.2], [0.25, 0.8, 0.04]


def _check_moments(x: torch.Tensor, mean: np.ndarray, var: np.ndarray) -> None:
    """Sample mean and covariance within 5 standard errors of the expected ones: SE(mean_i) = sqrt(var_i / n),
    SE(var_i) = var_i sqrt(2 / n), SE(cov_ij) = sqrt(var_i var_j / n) for independent dimensions."""
    n = x.shape[0]
    x = x.double().numpy()
    cov = np.cov(x, rowvar=False)
    se_mean = np.sqrt(var / n)
    assert np.all(np.abs(x.mean(0) - mean) <= 5 * se_mean), (x.mean(0), mean)
    se_var = var * math.sqrt(2 / n)
    assert np.all(np.abs(np.diag(cov) - var) <= 5 * se_var), (np.diag(cov), var)
    off = cov - np.diag(np.diag(cov))
    assert np.all(np.abs(off) <= 5 * np.sqrt(np.outer(var, var) / n)), off


def test_ddpm_respaced_250_samples_the_gaussian_toy() -> None:
    """DiT's sampler (ancestral DDPM over the 250 respaced steps, learned-range variance) with the exact ε and
    variance of N(mu, diag(s2)) data recovers the data's mean and covariance (n = 40000, 5 SE bounds, see
    _check_moments: 3.5 % of s2 on the variances). Catches wrong posterior coefficients, a wrong variance
    interpolation (even β̃ or β in its place), the model fed respaced indices, and respacing that keeps β."""
    kept = evenly_kept(250)
    toy = GaussianToy(MU, S2, kept)
    noise = torch.randn(40000, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = sample(build_ddpm(respacing="250"), toy, noise, torch.zeros(40000, dtype=torch.long),
                 generator=torch.Generator().manual_seed(1))
    assert toy.calls == kept[::-1]
    _check_moments(out, np.asarray(MU), toy.final_var())


def test_ddpm_last_step_returns_the_mean_without_noise() -> None:
    """Over "ddim2" (original steps 500, 0) the step at 500 adds noise and the last one returns the model's x_0
    estimate (x - sqrt(1 - ᾱ_0) ε) / sqrt(ᾱ_0) with none: catches noise added at the last step, or none at all."""
    d = build_ddpm(respacing="ddim2")
    eps = lambda x, t, y, n: torch.cat([0.5 * x, torch.zeros_like(x)], 1)  # noqa: E731
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    y = torch.zeros(16, dtype=torch.long)
    final, traj = sample(d, eps, noise, y, generator=torch.Generator().manual_seed(7), return_trajectory=True)
    other = sample(d, eps, noise, y, generator=torch.Generator().manual_seed(8))
    assert traj.shape == (3, 16, 2) and torch.equal(traj[0], noise) and torch.equal(traj[-1], final)
    x1 = traj[1]
    torch.testing.assert_close(final, (x1 - math.sqrt(1 - ABAR[0]) * 0.5 * x1) / math.sqrt(ABAR[0]), rtol=1e-12,
                               atol=1e-12)
    assert (final - other).abs().min() > 0  # the step at 500 did draw noise


def test_clip_denoised_clamps_x0_and_rederives_eps() -> None:
    """clip_denoised (pixel models; DiT samples latents without it) clamps x̂_0 to [-1, 1] and the mean and ε
    follow the clamped x̂_0: catches a clamp applied to the mean or ignored by DDIM's ε."""
    d = build_ddpm(learn_sigma=False)
    x = torch.tensor([[3.0, -0.2]], dtype=F64)
    t = torch.tensor([10])
    out = torch.tensor([[-5.0, 0.1]], dtype=F64)
    pred = d.p_mean_variance(out, x, t, clip_denoised=True)
    a = ABAR[10]
    raw = (x - math.sqrt(1 - a) * out) / math.sqrt(a)
    x0 = raw.clamp(-1, 1)
    assert raw[0, 0] > 1 and pred.pred_x0[0, 0].item() == 1.0
    torch.testing.assert_close(pred.pred_x0, x0)
    torch.testing.assert_close(pred.eps, (x - math.sqrt(a) * x0) / math.sqrt(1 - a))
    torch.testing.assert_close(pred.mean, d.q_posterior(x0, x, t)[0])


@pytest.mark.parametrize("spec", ["ddim50", None])
def test_ddim_matches_the_written_out_update_on_the_gaussian_toy(spec) -> None:
    """Deterministic DDIM (eta = 0) over "ddim50" and over all 1000 steps is a fixed map of the noise: equal to
    DDIM's eq. 12 written out in float64 over the kept steps, per sample. Catches a wrong ᾱ_prev (the previous
    KEPT step), the learned variance leaking into DDIM, or an eta term at eta = 0."""
    d = build_ddpm(respacing=spec)
    toy = GaussianToy(MU, S2, d.timestep_map.tolist())
    noise = torch.randn(200, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    out = sample(d, toy, noise, torch.zeros(200, dtype=torch.long), method="ddim")
    np.testing.assert_allclose(out.numpy(), toy.ddim_reference(noise.numpy()), rtol=1e-9, atol=1e-10)


def test_ddim_1000_steps_recovers_the_gaussian_toy_moments() -> None:
    """With the exact ε, DDIM's map from noise to samples is affine per dimension, so feeding it 0 and the unit
    vectors gives its output distribution for N(0, I) noise exactly: mean = out(0), cov = A A^T. Over all 1000
    steps that is the data's N(mu, diag(s2)) up to the ODE's discretisation (measured: mean within 0.006,
    variances within 1.3 %, no cross-covariance). Catches a DDIM that drifts, or a wrong ᾱ table."""
    toy = GaussianToy(MU, S2, list(range(T)))
    basis = torch.cat([torch.zeros(1, 3, dtype=F64), torch.eye(3, dtype=F64)])
    out = sample(build_ddpm(), toy, basis, torch.zeros(4, dtype=torch.long), method="ddim")
    mean, a = out[0].numpy(), (out[1:] - out[:1]).numpy()
    np.testing.assert_allclose(mean, MU, atol=0.01)
    cov = a @ a.T
    np.testing.assert_allclose(np.diag(cov), toy.final_var(), rtol=0.015)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-12


def test_ddim_eta_1_is_the_ddpm_step_with_posterior_variance() -> None:
    """DDIM with eta = 1 has σ² = β̃_t, so its step equals DDPM's posterior step with the fixed_small variance
    (same noise stream): two different formulas that must agree. Catches a wrong σ or noise scale in DDIM."""
    d = build_ddpm(learn_sigma=False, sigma_small=True, respacing="ddim20")
    eps = lambda x, t, y, n: 0.3 * x + 0.001 * t.view(-1, 1).to(x.dtype)  # noqa: E731
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    y = torch.zeros(64, dtype=torch.long)
    a = sample(d, eps, noise, y, method="ddim", eta=1.0, generator=torch.Generator().manual_seed(5))
    b = sample(d, eps, noise, y, method="ddpm", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- guidance

NULL = 4


class Recorder:
    """An ε 'model' (2C output channels) that records (batch, t, labels, group size) and whose output depends
    on the label, per channel."""

    num_classes = NULL

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, list[int], int]] = []

    def __call__(self, x, t, y, group_size):
        assert x.shape[0] % group_size == 0
        self.calls.append((x.shape[0], int(t[0]), y.tolist(), group_size))
        out = torch.cat([x, x], 1) * 0.01
        scale = torch.arange(1, 2 * x.shape[1] + 1, dtype=x.dtype).view(1, -1, *([1] * (x.ndim - 2)))
        return out + (y.view(-1, *([1] * (x.ndim - 1))).to(x.dtype) + 1) * scale


def test_cfg_guides_the_first_three_channels_only() -> None:
    """guided = u + s (c - u) on channels 0..2, channel 3 and the variance channels 4..7 from the conditional
    branch (DiT's forward_with_cfg), against the formula written out; cfg_channels=None guides all 4 ε channels
    and still never the variance. Catches guiding the variance, or taking the rest from the unconditional branch."""
    model = Recorder()
    x = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.tensor([1, 2])
    t = torch.full((2,), 500)
    c = model(x, t, y, 1)
    u = model(x, t, torch.full_like(y, NULL), 1)
    s = 4.0
    expect = c.clone()
    for ch in range(3):
        expect[:, ch] = u[:, ch] + s * (c[:, ch] - u[:, ch])
    torch.testing.assert_close(GuidedEps(model, y, cfg_scale=s)(x, t), expect, rtol=1e-12, atol=1e-12)
    for ch in range(3, 4):
        expect[:, ch] = u[:, ch] + s * (c[:, ch] - u[:, ch])
    torch.testing.assert_close(GuidedEps(model, y, cfg_scale=s, cfg_channels=None)(x, t), expect, rtol=1e-12,
                               atol=1e-12)


def test_cfg_interval_in_original_ddpm_timesteps_skips_unconditional_forwards() -> None:
    """Over "ddim10" (original steps 900, 800, ..., 0) with cfg_interval (250, 700), the unconditional branch runs
    at 700..300 only and the model always sees original indices. Catches an interval compared against respaced
    indices or in flow time, and an unconditional forward outside the interval."""
    model = Recorder()
    x = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    stats = CallStats()
    sample(build_ddpm(respacing="ddim10"), model, x, torch.tensor([0, 1, 2, 3]), cfg_scale=1.5,
           cfg_interval=(250, 700), stats=stats)
    assert [c[1] for c in model.calls] == list(range(900, -1, -100))
    assert [c[0] for c in model.calls] == [8 if 250 <= s <= 700 else 4 for s in range(900, -1, -100)]
    uncond = sorted({c[1] for c in model.calls if NULL in c[2]})
    assert uncond == [300, 400, 500, 600, 700]
    assert stats.nfe == 10 and stats.guided_nfe == 5 and stats.uncond_images == 20


def test_groupdiff_l_and_f_group_sizes_per_branch() -> None:
    """GroupDiff-l: conditional branch with group size 1, unconditional with N, two calls per guided step;
    GroupDiff-f: both N, one batched call of 2B, group-major halves. Catches the branches swapping group sizes
    or labels, and an unconditional group that mixes conditional images."""
    y = torch.tensor([3] * 4 + [1] * 4)
    x = torch.randn(8, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    lmodel = Recorder()
    sample(build_ddpm(respacing="ddim5"), lmodel, x, y, cfg_scale=2.0, group_size=1, uncond_group_size=4)
    assert [(c[0], c[3], NULL in c[2]) for c in lmodel.calls] == [(8, 1, False), (8, 4, True)] * 5
    assert all(c[2] == [NULL] * 8 for c in lmodel.calls if c[3] == 4)
    fmodel = Recorder()
    sample(build_ddpm(respacing="ddim5"), fmodel, x, y, cfg_scale=2.0, group_size=4, uncond_group_size=4)
    assert len(fmodel.calls) == 5
    assert all(c[0] == 16 and c[3] == 4 and c[2] == y.tolist() + [NULL] * 8 for c in fmodel.calls)


# ---------------------------------------------------------------- a tiny DiT


def test_tiny_dit_overfits_with_the_hybrid_loss() -> None:
    """A tiny DiT-shaped SiT (learn_sigma, 2C output through full_output) trained with the hybrid group loss on
    8 latents under a fixed pool of (t, noise) draws cuts its loss by more than 20x in 100 CPU steps (measured:
    0.957 -> 0.010, the VB part 8.5e-3 -> 8.3e-5; ~2 s on one core), and both parts fall. Catches a loss that
    does not reach the model's ε or variance outputs."""
    models = pytest.importorskip("gd.models")
    torch.manual_seed(0)
    sit = models.build_model("SiT-S/2", depth=2, hidden_size=64, num_heads=4, input_size=8, in_channels=4,
                             num_classes=4, max_group_size=4, class_dropout_prob=0.1, learn_sigma=True)
    model = functools.partial(sit, full_output=True)
    d = build_ddpm()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 8, 8, generator=gen) * 0.5
    y = torch.tensor([0] * 4 + [1] * 4)
    pool = [(group_timesteps(2, 4, T, spread=100, generator=gen), torch.randn(x0.shape, generator=gen))
            for _ in range(3)]
    opt = torch.optim.AdamW(sit.parameters(), lr=3e-3, weight_decay=0.0)

    def evaluate():
        with torch.no_grad():
            return group_loss(d, model, x0, y, 4, t=pool[0][0], noise=pool[0][1])

    first, first_terms = evaluate()
    for step in range(100):
        t, noise = pool[step % 3]
        loss, _ = group_loss(d, model, x0, y, 4, t=t, noise=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    last, last_terms = evaluate()
    assert last < first / 20, (first.item(), last.item())
    assert last_terms.mse.mean() < first_terms.mse.mean() / 20
    assert last_terms.vb.mean() < first_terms.vb.mean() / 5
