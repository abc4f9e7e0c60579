"""CFG: the interval skips unconditional forwards (counted), the guidance formula, group sizes per branch."""
from __future__ import annotations

import pytest
import torch

from gd.diffusion import CallStats, GuidedVelocity, interval_from_reverse_time, sample

NULL = 5


class Recorder:
    """A velocity 'model' that records every call: (batch, t, labels, group_size)."""

    num_classes = NULL

    def __init__(self) -> None:
        self.calls: list[tuple[int, float, list[int], int]] = []

    def __call__(self, x, t, y, group_size):
        assert x.shape[0] % group_size == 0
        self.calls.append((x.shape[0], float(t[0]), y.tolist(), group_size))
        # conditional and unconditional outputs differ by the label, per channel
        return -x + y.view(-1, 1, 1, 1).to(x.dtype) * torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1, 1)


def _x(b: int = 8) -> torch.Tensor:
    return torch.randn(b, 4, 2, 2, generator=torch.Generator().manual_seed(0))


def test_interval_skips_unconditional_forward() -> None:
    model = Recorder()
    y = torch.tensor([1, 1, 1, 1, 2, 2, 2, 2])
    stats = CallStats()
    sample(model, _x(), y, method="euler", steps=10, cfg_scale=4.0, cfg_interval=(0.25, 0.75), stats=stats)
    grid = [i / 10 for i in range(10)]
    inside = [t for t in grid if 0.25 <= t <= 0.75]
    uncond = [c for c in model.calls if NULL in c[2]]
    assert sorted({round(c[1], 6) for c in uncond}) == [round(t, 6) for t in inside]
    # equal group sizes: one forward per step, of 2B images where guided, of B images elsewhere
    assert [c[0] for c in model.calls] == [16 if 0.25 <= t <= 0.75 else 8 for t in grid]
    assert stats.nfe == 10 and stats.guided_nfe == len(inside)
    assert stats.uncond_images == 8 * len(inside) and stats.cond_images == 80


def test_equal_group_sizes_batch_both_branches_in_one_call() -> None:
    model = Recorder()
    y = torch.tensor([1, 1, 2, 2])
    sample(model, _x(4), y, method="euler", steps=4, cfg_scale=2.0, group_size=2, uncond_group_size=2)
    assert len(model.calls) == 4
    for batch, _, labels, gs in model.calls:
        assert batch == 8 and gs == 2 and labels == [1, 1, 2, 2] + [NULL] * 4  # group-major halves


def test_groupdiff_l_runs_two_calls_with_their_group_sizes() -> None:
    model = Recorder()
    y = torch.tensor([3] * 4 + [1] * 4)
    sample(model, _x(), y, method="euler", steps=3, cfg_scale=2.0, group_size=1, uncond_group_size=4)
    assert [(c[0], c[3], NULL in c[2]) for c in model.calls] == [(8, 1, False), (8, 4, True)] * 3
    assert all(c[2] == [NULL] * 8 for c in model.calls if c[3] == 4)


def test_no_unconditional_forward_when_scale_is_one() -> None:
    model = Recorder()
    sample(model, _x(), torch.ones(8, dtype=torch.long), method="heun", steps=3, cfg_scale=1.0)
    assert all(NULL not in c[2] for c in model.calls) and len(model.calls) == 6


def test_guidance_formula_and_first_channels_variant() -> None:
    model = Recorder()
    x = _x(2)
    y = torch.tensor([2, 2])
    t = torch.tensor(0.5)
    cond, uncond = model(x, t.expand(2), y, 1), model(x, t.expand(2), torch.full_like(y, NULL), 1)
    full = GuidedVelocity(model, y, cfg_scale=3.0)(x, t)
    assert torch.allclose(full, uncond + 3.0 * (cond - uncond))
    first3 = GuidedVelocity(model, y, cfg_scale=3.0, cfg_channels=3)(x, t)
    assert torch.allclose(first3[:, :3], full[:, :3]) and torch.allclose(first3[:, 3:], cond[:, 3:])
    outside = GuidedVelocity(model, y, cfg_scale=3.0, cfg_interval=(0.6, 1.0))(x, t)
    assert torch.allclose(outside, cond)


def test_interval_bounds_are_inclusive() -> None:
    g = GuidedVelocity(Recorder(), torch.zeros(1, dtype=torch.long), cfg_scale=2.0, cfg_interval=(0.2, 0.4))
    assert [g.guided_at(t) for t in (0.19, 0.2, 0.3, 0.4, 0.41)] == [False, True, True, True, False]


def test_reverse_time_interval_conversion() -> None:
    # REPA / released GroupDiff: guidance_low=0.0, guidance_high=0.7 in their time (t = 1 noise)
    assert interval_from_reverse_time(0.0, 0.7) == pytest.approx((0.3, 1.0))
    with pytest.raises(ValueError):
        interval_from_reverse_time(0.8, 0.1)
