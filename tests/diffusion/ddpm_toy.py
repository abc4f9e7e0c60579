"""Closed-form pieces of the DDPM linear schedule and a Gaussian data toy, float64 numpy, written independently of
gd.diffusion.ddpm (no shared code) so its schedule, objective and samplers are checked against them.

Schedule: Ho et al.'s β_t = linspace(1e-4, 0.02, 1000), ᾱ_t = prod_{s <= t} (1 - β_s), t = 0 least noisy.
Toy: data x_0 ~ N(mu, diag(s2)), s2 <= 1. Then x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε is N(sqrt(ᾱ_t) mu, V_t) with
V_t = ᾱ_t s2 + 1 - ᾱ_t, and the Bayes-optimal ε-predictor is E[ε | x_t] = Cov(ε, x_t) V_t^-1 (x_t - sqrt(ᾱ_t) mu)
= sqrt(1 - ᾱ_t) (x_t - sqrt(ᾱ_t) mu) / V_t. On a chain of kept steps s_0 < ... < s_K (ᾱ'_k = ᾱ_{s_k}, ᾱ'_{-1} = 1,
α'_k = ᾱ'_k / ᾱ'_{k-1}) the true reverse kernel x_{k-1} | x_k is Gaussian (everything is jointly Gaussian) with
variance V_{k-1} - α'_k V_{k-1}^2 / V_k, between β̃'_k (s2 -> 0) and β'_k = 1 - α'_k (s2 = 1): the learned-range
variance can express it exactly, so an ancestral sampler with this model samples the data exactly at any step count.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

T = 1000
BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
ABAR = np.cumprod(1.0 - BETAS)


def evenly_kept(count: int, total: int = T) -> list[int]:
    """count steps spread evenly over [0, total - 1], both ends kept (ADM's respacing with one section)."""
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


class GaussianToy:
    """The exact ε model (and exact learned-range variance) for data N(mu, diag(s2)) on the chain `kept`."""

    num_classes = 4

    def __init__(self, mu: list[float], s2: list[float], kept: list[int]) -> None:
        self.mu = np.asarray(mu, dtype=np.float64)
        self.s2 = np.asarray(s2, dtype=np.float64)
        self.kept = list(kept)
        self.position = {s: k for k, s in enumerate(self.kept)}
        self.calls: list[int] = []
        ab = ABAR[self.kept]
        ab_prev = np.concatenate([[1.0], ab[:-1]])
        alpha = ab / ab_prev
        beta = 1.0 - alpha
        post = beta * (1.0 - ab_prev) / (1.0 - ab)
        post_clipped = np.concatenate([[post[1]], post[1:]])
        v_prev = ab_prev[:, None] * self.s2 + 1.0 - ab_prev[:, None]
        v_now = ab[:, None] * self.s2 + 1.0 - ab[:, None]
        true_var = v_prev - alpha[:, None] * v_prev**2 / v_now  # (K, D)
        lo, hi = np.log(post_clipped)[:, None], np.log(beta)[:, None]
        self.v = 2.0 * (np.log(true_var) - lo) / (hi - lo) - 1.0
        # index 0 adds no noise, so its variance is never used (and need not be in range)
        assert np.all(np.abs(self.v[1:]) <= 1.0 + 1e-9), "the toy's variance must lie in [β̃, β]"
        self.v = np.clip(self.v, -1.0, 1.0)

    def eps(self, x: np.ndarray, s: int) -> np.ndarray:
        a = ABAR[s]
        return math.sqrt(1.0 - a) * (x - math.sqrt(a) * self.mu) / (a * self.s2 + 1.0 - a)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor, group_size: int = 1) -> Tensor:
        s = int(t[0])
        assert bool((t == s).all())
        self.calls.append(s)
        eps = self.eps(x.numpy(), s)
        v = np.broadcast_to(self.v[self.position[s]], eps.shape)
        return torch.from_numpy(np.concatenate([eps, v], axis=1))

    def final_var(self) -> np.ndarray:
        """Variance of the sampler's output E[x_0 | x at step kept[0]] (the last step adds no noise)."""
        a = ABAR[self.kept[0]]
        return self.s2 - self.s2 * (1.0 - a) / (a * self.s2 + 1.0 - a)

    def ddim_reference(self, z: np.ndarray) -> np.ndarray:
        """DDIM with eta = 0 (Song et al. eq. 12) from z along the chain, written out step by step."""
        x = z.copy()
        for k in reversed(range(len(self.kept))):
            a = ABAR[self.kept[k]]
            a_prev = ABAR[self.kept[k - 1]] if k > 0 else 1.0
            e = self.eps(x, self.kept[k])
            x0 = (x - math.sqrt(1.0 - a) * e) / math.sqrt(a)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * e
        return x
