"""The group loss against a float64 hand computation; time sampling and sigma_tv draws."""
from __future__ import annotations

import time

import pytest
import torch

from gd.diffusion import TimeSampler, group_loss, group_timesteps


def toy_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, group_size: int) -> torch.Tensor:
    """A velocity 'model' whose output depends on the whole group, so group_size must be honoured."""
    g = x.view(-1, group_size, *x.shape[1:])
    group_mean = g.mean(1, keepdim=True).expand_as(g).reshape(x.shape)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return 0.7 * x - 0.3 * group_mean + 0.1 * t.view(shape) + 0.01 * y.view(shape).to(x.dtype)


def hand_loss(x1, y, t, noise, n):
    """L_Group written out with explicit loops, float64."""
    x1, t, noise = x1.double(), t.double(), noise.double()
    groups = x1.shape[0] // n
    per_image, total = [], 0.0
    for gi in range(groups):
        members = range(gi * n, (gi + 1) * n)
        xt = {i: t[i] * x1[i] + (1 - t[i]) * noise[i] for i in members}
        mean = sum(xt[i] for i in members) / n
        group_sum = 0.0
        for i in members:
            pred = 0.7 * xt[i] - 0.3 * mean + 0.1 * t[i] + 0.01 * float(y[i])
            target = x1[i] - noise[i]
            err = 0.0
            for v in (pred - target).reshape(-1).tolist():
                err += v * v
            err /= x1[i].numel()
            per_image.append(err)
            group_sum += err
        total += group_sum
    return total / groups, torch.tensor(per_image, dtype=torch.float64)


@pytest.mark.parametrize("n,sigma_tv", [(1, 0.0), (4, 0.0), (4, 0.2)])
def test_loss_equals_float64_hand_computation(n: int, sigma_tv: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(8, 2, 3, 3, generator=gen)
    y = torch.randint(0, 5, (8,), generator=gen)
    loss, per_image = group_loss(toy_model, x1, y, n, sigma_tv=sigma_tv, generator=torch.Generator().manual_seed(1))
    # replay the draws: times first, then noise, from the same seed
    g2 = torch.Generator().manual_seed(1)
    t = group_timesteps(8 // n, n, sigma_tv=sigma_tv, generator=g2)
    noise = torch.randn(x1.shape, generator=g2)
    ref, ref_per = hand_loss(x1, y, t, noise, n)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert abs(float(loss) - ref) <= 1e-5 * abs(ref)
    assert torch.allclose(per_image.double(), ref_per, rtol=1e-5)
    explicit, _ = group_loss(toy_model, x1, y, n, t=t, noise=noise)
    assert float(explicit) == float(loss)


def test_loss_is_sum_over_members_mean_over_groups() -> None:
    x1 = torch.randn(12, 1, 2, 2, dtype=torch.float64)
    y = torch.zeros(12, dtype=torch.long)
    loss, per = group_loss(toy_model, x1, y, 3, generator=torch.Generator().manual_seed(0))
    assert torch.isclose(loss, per.view(4, 3).sum(1).mean())
    assert torch.isclose(loss, 3 * per.mean())


def test_loss_backpropagates_and_is_reproducible() -> None:
    w = torch.ones((), requires_grad=True)
    model = lambda x, t, y, n: w * x  # noqa: E731
    x1 = torch.randn(4, 1, 2, 2)
    y = torch.zeros(4, dtype=torch.long)
    a, _ = group_loss(model, x1, y, 2, generator=torch.Generator().manual_seed(5))
    a.backward()
    assert w.grad is not None and torch.isfinite(w.grad)
    b, _ = group_loss(model, x1, y, 2, generator=torch.Generator().manual_seed(5))
    assert a.item() == b.item()


def test_sigma_tv_draws_stay_in_range_and_respect_groups() -> None:
    g, n, s = 4000, 4, 0.15
    t = group_timesteps(g, n, sigma_tv=s, generator=torch.Generator().manual_seed(0)).view(g, n)
    assert t.min() >= 0.0 and t.max() <= 1.0
    base = t[:, :1]
    assert torch.all((t[:, 1:] - base).abs() <= s + 1e-6)
    inside = (base > s) & (base < 1 - s)  # away from the clip, offsets fill +-s
    off = (t[:, 1:] - base)[inside.expand(-1, n - 1)]
    assert off.min() < -0.9 * s and off.max() > 0.9 * s and abs(float(off.mean())) < 0.01
    assert (t == 0.0).any() and (t == 1.0).any()  # clipped at both ends
    first = base.squeeze(1)
    assert abs(float(first.mean()) - 0.5) < 0.02 and abs(float(first.var()) - 1 / 12) < 0.01
    # groups draw independent base times
    assert torch.unique(first).numel() >= g - 5  # float32 ties aside


def test_sigma_tv_zero_gives_one_time_per_group() -> None:
    t = group_timesteps(50, 4, sigma_tv=0.0, generator=torch.Generator().manual_seed(0)).view(50, 4)
    assert torch.all(t == t[:, :1])
    single = group_timesteps(50, 1, sigma_tv=0.3, generator=torch.Generator().manual_seed(0))
    assert single.shape == (50,)


def test_group_timesteps_is_vectorised() -> None:
    start = time.perf_counter()
    t = group_timesteps(200_000, 4, sigma_tv=0.1, generator=torch.Generator().manual_seed(0))
    assert t.shape == (800_000,) and time.perf_counter() - start < 1.0


def test_time_samplers() -> None:
    gen = torch.Generator().manual_seed(0)
    ln = TimeSampler.from_spec("logit_normal").sample(20000, gen)
    assert 0 < ln.min() and ln.max() < 1 and abs(float(ln.mean()) - 0.5) < 0.01
    assert float(ln.std()) < float(torch.rand(20000, generator=gen).std())  # concentrated mid-path
    shifted = TimeSampler("uniform", shift=3.0)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    raw, sh = torch.rand(5, generator=g1), shifted.sample(5, g2)
    tau = 1 - raw
    assert torch.allclose(sh, 1 - 3 * tau / (1 + 2 * tau))
    assert torch.all(sh <= raw + 1e-7)  # mass moves towards the noise end t = 0
    assert TimeSampler.from_spec("shifted").shift == 3.0
    cfg = {"time_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 2.0, "time_shift": 1.0}
    assert TimeSampler.from_spec(cfg) == TimeSampler("logit_normal", 0.5, 2.0, 1.0)


@pytest.mark.parametrize("call,match", [
    (lambda x, y: group_loss(toy_model, x, y, 3), "whole number of groups"),
    (lambda x, y: group_loss(toy_model, x, y, 2, t=torch.rand(3)), "t must have shape"),
    (lambda x, y: group_loss(toy_model, x, y, 2, noise=torch.randn(4, 1)), "noise shape"),
    (lambda x, y: group_loss(lambda a, b, c, d: a[:, :1], x, y, 2), "model returned shape"),
    (lambda x, y: group_loss(toy_model, x, y, 2, sigma_tv=1.5), "sigma_tv"),
    (lambda x, y: group_loss(toy_model, x, y, 2, time_sampling="cosine"), "time sampling kind"),
    (lambda x, y: TimeSampler(shift=0.5), "shift"),
])
def test_bad_input_is_refused(call, match: str) -> None:
    x1 = torch.randn(4, 2, 2, 2)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        call(x1, y)
