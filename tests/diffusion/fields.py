"""Closed-form marginal velocity fields of the linear path x_t = t x1 + (1 - t) x0 (x0 ~ N(0, I)), float64.

For data N(mu, diag(s^2)) the marginal is N(t mu, diag(t^2 s^2 + (1 - t)^2)) and the flow map is
x_t = t mu + sqrt(t^2 s^2 + (1 - t)^2) x0, so v(x, t) = mu + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) (x - t mu).
A mixture's marginal velocity is the posterior-weighted mix of its components' velocities.
Written independently of gd.diffusion (no shared code) so the samplers are checked against it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class GaussianField:
    """Data N(mu, diag(s^2)) in D dimensions; exact velocity and exact ODE solution."""

    def __init__(self, mu: list[float], s: list[float]) -> None:
        self.mu = torch.tensor(mu, dtype=torch.float64)
        self.s = torch.tensor(s, dtype=torch.float64)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        var = t * t * self.s**2 + (1 - t) ** 2
        return self.mu + (t * self.s**2 - (1 - t)) / var * (x - t * self.mu)

    def model(self, x: Tensor, t: Tensor, y: Tensor, group_size: int = 1) -> Tensor:
        return self.velocity(x, t)

    def solution(self, x0: Tensor) -> Tensor:
        return self.mu + self.s * x0

    def mean(self) -> Tensor:
        return self.mu

    def cov(self) -> Tensor:
        return torch.diag(self.s**2)


class MixtureField:
    """Data sum_k pi_k N(mu_k, s_k^2 I) in D dimensions; exact marginal velocity, mean and covariance."""

    def __init__(self, weights: list[float], mus: list[list[float]], scales: list[float]) -> None:
        self.pi = torch.tensor(weights, dtype=torch.float64)
        self.mus = torch.tensor(mus, dtype=torch.float64)  # (K, D)
        self.s = torch.tensor(scales, dtype=torch.float64)  # (K,)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.reshape(-1).to(x.dtype)
        if t.shape[0] == 1:
            t = t.expand(x.shape[0])
        d = x.shape[1]
        tt = t[:, None]  # (B, 1)
        var = tt**2 * self.s[None] ** 2 + (1 - tt) ** 2  # (B, K)
        diff = x[:, None, :] - tt[:, :, None] * self.mus[None]  # (B, K, D)
        logp = (torch.log(self.pi)[None] - 0.5 * d * torch.log(2 * math.pi * var)
                - 0.5 * (diff**2).sum(-1) / var)
        w = torch.softmax(logp, dim=1)  # (B, K)
        coef = (tt * self.s[None] ** 2 - (1 - tt)) / var  # (B, K)
        vk = self.mus[None] + coef[:, :, None] * diff  # (B, K, D)
        return (w[:, :, None] * vk).sum(1)

    def model(self, x: Tensor, t: Tensor, y: Tensor, group_size: int = 1) -> Tensor:
        return self.velocity(x, t)

    def mean(self) -> Tensor:
        return (self.pi[:, None] * self.mus).sum(0)

    def cov(self) -> Tensor:
        m = self.mean()
        d = self.mus.shape[1]
        c = torch.zeros(d, d, dtype=torch.float64)
        for k in range(self.pi.shape[0]):
            dm = self.mus[k] - m
            c += self.pi[k] * (self.s[k] ** 2 * torch.eye(d, dtype=torch.float64) + torch.outer(dm, dm))
        return c

    def draw(self, n: int, gen: torch.Generator) -> Tensor:
        k = torch.multinomial(self.pi, n, replacement=True, generator=gen)
        z = torch.randn(n, self.mus.shape[1], generator=gen, dtype=torch.float64)
        return self.mus[k] + self.s[k, None] * z
