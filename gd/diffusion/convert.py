"""Bridges to the reverse time convention of REPA and the released GroupDiff code.

There: x_s = (1 - s) x + s eps, s = 1 noise, s = 0 data, velocity v' = eps - x.
Here (official SiT): x_t = t x + (1 - t) eps, so the same point has t = 1 - s and velocity u = x - eps = -v'.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


def _first(out: Tensor | tuple) -> Tensor:
    # REPA's SiT returns (velocity, projected features); only the velocity matters for sampling.
    return out[0] if isinstance(out, (tuple, list)) else out


class FromReverseTime(nn.Module):
    """Wrap a velocity model of the reverse convention so it samples here: u(x, t) = -v'(x, 1 - t).

    ``inner(x, s, y, group_size, **kwargs)`` (or ``inner(x, s, y)`` with pass_group_size=False) is the reverse-time
    model; keyword arguments (e.g. SiT's ``slots``) pass through. Attributes such as num_classes are looked up on
    the inner model.
    """

    def __init__(self, inner: Callable[..., Tensor], *, pass_group_size: bool = True) -> None:
        super().__init__()
        self.inner = inner
        self.pass_group_size = pass_group_size

    def forward(self, x: Tensor, t: Tensor, y: Tensor, group_size: int = 1, **kwargs) -> Tensor:
        s = 1.0 - t
        out = self.inner(x, s, y, group_size, **kwargs) if self.pass_group_size else self.inner(x, s, y)
        return -_first(out)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


class ToReverseTime(FromReverseTime):
    """The inverse wrapper: a model of this repository seen in the reverse convention, v'(x, s) = -u(x, 1 - s).
    The map t -> 1 - t with a sign flip is its own inverse, so it is the same operation."""


def interval_from_reverse_time(low: float, high: float) -> tuple[float, float]:
    """A guidance interval [low, high] in reverse time (REPA/GroupDiff ``guidance_low/high``) as
    (t_low, t_high) here."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got ({low}, {high})")
    return 1.0 - high, 1.0 - low


def time_to_reverse(t: Tensor | float) -> Tensor | float:
    """t here -> s there (and back)."""
    return 1.0 - t
