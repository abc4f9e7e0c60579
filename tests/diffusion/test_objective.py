"""The group loss against a float64 hand computation; time sampling and the sigma_tv draws (window, anchor)."""
from __future__ import annotations

import pytest
import torch

from gd.diffusion import TimeSampler, group_loss, group_timesteps


def toy_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, group_size: int) -> torch.Tensor:
    """A velocity 'model' whose output depends on the whole group, so group_size must be honoured."""
    g = x.view(-1, group_size, *x.shape[1:])
    group_mean = g.mean(1, keepdim=True).expand_as(g).reshape(x.shape)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return 0.7 * x - 0.3 * group_mean + 0.1 * t.view(shape) + 0.01 * y.view(shape).to(x.dtype)


def hand_times(gen: torch.Generator, groups: int, n: int, sigma_tv: float, draw: str) -> torch.Tensor:
    """The documented time draw written out in float64 from the generator's raw uniforms (not group_timesteps):
    one base b per group, then (N > 1, sigma_tv > 0) one uniform per member; "window": every member
    lo + (hi - lo) u with [lo, hi] = [b - s, b + s] clipped to [0, 1]; "anchor": member 0 keeps b, the others
    clamp(b + (2u - 1) s, 0, 1)."""
    base = torch.rand(groups, generator=gen).double()
    if n == 1 or sigma_tv == 0.0:
        return base.repeat_interleave(n)
    u = torch.rand(groups, n, generator=gen).double()
    t = []
    for g in range(groups):
        b = float(base[g])
        for i in range(n):
            if draw == "window":
                lo, hi = max(0.0, b - sigma_tv), min(1.0, b + sigma_tv)
                t.append(lo + (hi - lo) * float(u[g, i]))
            else:
                t.append(b if i == 0 else min(1.0, max(0.0, b + (2 * float(u[g, i]) - 1) * sigma_tv)))
    return torch.tensor(t, dtype=torch.float64)


def hand_loss(x1, y, t, noise, n, reduction):
    """The objective written out with explicit loops, float64: per-image velocity MSE, then the mean over images
    ("mean") or the sum over each group's members averaged over groups ("group_sum", the paper's L_Group)."""
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
    loss = total / groups if reduction == "group_sum" else sum(per_image) / len(per_image)
    return loss, torch.tensor(per_image, dtype=torch.float64)


@pytest.mark.parametrize("n,sigma_tv,reduction,draw", [
    (1, 0.0, "mean", "window"), (4, 0.0, "mean", "window"), (4, 0.2, "mean", "window"),
    (4, 0.2, "group_sum", "anchor"), (4, 0.0, "group_sum", "window"), (2, 0.45, "mean", "anchor"),
])
def test_loss_equals_float64_hand_computation(n: int, sigma_tv: float, reduction: str, draw: str) -> None:
    """The loss and its random draws against the rules written out: catches a wrong reduction (a sum where the
    released code averages, or a per-group weight), a time draw that differs from the documented rule (the anchor
    kept under "window", values clamped instead of the window clipped) or drawn in another order."""
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(8, 2, 3, 3, generator=gen)
    y = torch.randint(0, 5, (8,), generator=gen)
    loss, per_image = group_loss(toy_model, x1, y, n, sigma_tv=sigma_tv, generator=torch.Generator().manual_seed(1),
                                 reduction=reduction, sigma_tv_draw=draw)
    g2 = torch.Generator().manual_seed(1)  # the documented order: times first, then noise
    t = hand_times(g2, 8 // n, n, sigma_tv, draw)
    noise = torch.randn(x1.shape, generator=g2)
    ref, ref_per = hand_loss(x1, y, t, noise, n, reduction)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert abs(float(loss) - ref) <= 1e-5 * abs(ref)
    assert torch.allclose(per_image.double(), ref_per, rtol=1e-5)


def test_reductions_weigh_images_as_documented() -> None:
    """mean: every image of a batch weighs 1/B; group_sum: N/B, so a group batch's gradient is N times larger
    (catches the reductions swapped, or group_sum normalised by N)."""
    x1 = torch.randn(12, 1, 2, 2, dtype=torch.float64)
    y = torch.zeros(12, dtype=torch.long)
    mean, per = group_loss(toy_model, x1, y, 3, generator=torch.Generator().manual_seed(0))
    summed, per2 = group_loss(toy_model, x1, y, 3, generator=torch.Generator().manual_seed(0), reduction="group_sum")
    assert torch.equal(per, per2)
    assert torch.isclose(mean, per.mean()) and torch.isclose(summed, per.view(4, 3).sum(1).mean())
    assert torch.isclose(summed, 3 * mean)


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


def test_window_draw_is_uniform_in_the_clipped_window_for_every_member() -> None:
    """The released sigma_tv rule: each member, the first included, uniform in [max(0, b - s), min(1, b + s)].
    Catches the anchor kept at b, a clamp (point masses at 0 and 1) and a window not clipped at the ends."""
    g, n, s = 4000, 4, 0.15
    gen = torch.Generator().manual_seed(0)
    t = group_timesteps(g, n, sigma_tv=s, generator=gen).view(g, n).double()
    base = torch.rand(g, generator=torch.Generator().manual_seed(0)).double()  # the same stream's first draw
    lo, hi = (base - s).clamp(min=0.0)[:, None], (base + s).clamp(max=1.0)[:, None]
    assert torch.all((t >= lo - 1e-6) & (t <= hi + 1e-6))
    rel = ((t - lo) / (hi - lo)).reshape(-1)  # uniform on [0, 1] for every member if the rule holds
    assert abs(float(rel.mean()) - 0.5) < 4 * (1 / 12 / rel.numel()) ** 0.5
    assert abs(float(rel.var()) - 1 / 12) < 0.005
    first = rel.view(g, n)[:, 0]
    assert abs(float(first.mean()) - 0.5) < 0.02 and float(first.std()) > 0.25  # the first member moves too
    assert not (t == 0.0).any() and not (t == 1.0).any()  # no point mass at the ends


def test_anchor_draw_keeps_the_first_member_and_clamps_the_others() -> None:
    """This repo's earlier rule, kept as sigma_tv_draw=anchor: member 0 at b, the others b + U(-s, s) clamped."""
    g, n, s = 4000, 4, 0.15
    t = group_timesteps(g, n, sigma_tv=s, generator=torch.Generator().manual_seed(0), sigma_tv_draw="anchor").view(g, n)
    assert t.min() >= 0.0 and t.max() <= 1.0
    base = t[:, :1]
    assert torch.equal(base.squeeze(1), torch.rand(g, generator=torch.Generator().manual_seed(0)))
    assert torch.all((t[:, 1:] - base).abs() <= s + 1e-6)
    inside = (base > s) & (base < 1 - s)  # away from the clip, offsets fill +-s
    off = (t[:, 1:] - base)[inside.expand(-1, n - 1)]
    assert off.min() < -0.9 * s and off.max() > 0.9 * s and abs(float(off.mean())) < 0.01
    assert (t == 0.0).any() and (t == 1.0).any()  # clamped at both ends


def test_sigma_tv_zero_gives_one_time_per_group() -> None:
    for draw in ("window", "anchor"):
        t = group_timesteps(50, 4, sigma_tv=0.0, generator=torch.Generator().manual_seed(0),
                            sigma_tv_draw=draw).view(50, 4)
        assert torch.all(t == t[:, :1])
    single = group_timesteps(50, 1, sigma_tv=0.3, generator=torch.Generator().manual_seed(0))
    assert single.shape == (50,)


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
    (lambda x, y: group_loss(toy_model, x, y, 2, reduction="sum"), "reduction='sum'"),
    (lambda x, y: group_loss(toy_model, x, y, 2, sigma_tv=0.1, sigma_tv_draw="x"), "sigma_tv_draw='x'"),
])
def test_bad_input_is_refused(call, match: str) -> None:
    x1 = torch.randn(4, 2, 2, 2)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        call(x1, y)
