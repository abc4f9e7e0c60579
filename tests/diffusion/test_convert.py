"""A model trained in the reverse convention (REPA / released GroupDiff) samples correctly here."""
from __future__ import annotations

import torch

from gd.diffusion import FromReverseTime, ToReverseTime, sample
from tests.diffusion.fields import GaussianField

FIELD = GaussianField(mu=[0.5, -1.0], s=[0.7, 1.5])


def reverse_model(x, s, y, group_size=1):
    """The same data's exact velocity in the reverse convention: x_s = (1 - s) x + s eps, v' = eps - x.
    Written in its own time: with t = 1 - s, v'(x, s) = -v(x, t) — computed here from the flow map directly."""
    t = (1 - s).reshape(-1, 1)
    var = t * t * FIELD.s**2 + (1 - t) ** 2
    # d x_s / ds along the flow x_s = (1 - s) mu + sqrt((1-s)^2 s_d^2 + s^2) eps0
    d_std_ds = (-(1 - s.reshape(-1, 1)) * FIELD.s**2 + s.reshape(-1, 1)) / var.sqrt()
    return -FIELD.mu + d_std_ds * (x - t * FIELD.mu) / var.sqrt(), "features"


def test_wrapped_reverse_model_equals_this_convention_pointwise() -> None:
    wrapped = FromReverseTime(reverse_model)
    x = torch.randn(16, 2, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * 0.98 + 0.01
    assert torch.allclose(wrapped(x, t, torch.zeros(16, dtype=torch.long), 1), FIELD.velocity(x, t))


def test_wrapped_reverse_model_samples_the_right_distribution() -> None:
    x0 = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample(FromReverseTime(reverse_model), x0, torch.zeros(256, dtype=torch.long), method="dopri5",
                 atol=1e-9, rtol=1e-9)
    assert torch.allclose(out, FIELD.solution(x0), atol=1e-6)


def test_round_trip_and_attribute_passthrough() -> None:
    class Model(torch.nn.Module):
        num_classes = 7

        def forward(self, x, t, y, group_size=1):
            return FIELD.velocity(x, t)

    there = ToReverseTime(Model())
    back = FromReverseTime(there)
    x = torch.randn(4, 2, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    assert torch.allclose(back(x, t, y, 1), FIELD.velocity(x, t))
    assert torch.allclose(there(x, 1 - t, y, 1), -FIELD.velocity(x, t))
    assert back.num_classes == 7
    assert len(list(back.parameters())) == 0
