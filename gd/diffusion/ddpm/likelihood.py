"""The two likelihood pieces of the DDPM variational bound: the KL between Gaussians and the discretised Gaussian
log-likelihood of the decoder at t = 0. Elementwise, in nats."""
from __future__ import annotations

import math

import torch
from torch import Tensor

# 8-bit data rescaled to [-1, 1]: 256 bins of width 2/255, the outermost open towards ±infinity.
BIN_HALF_WIDTH = 1.0 / 255.0
EDGE = 0.999
LOG_FLOOR = 1e-12


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x), exact (erf). DiT/ADM use the tanh approximation of GELU here (|error| < 1.8e-4 in Φ); it only moves the
    t = 0 variance target, which sampling never uses (the last step adds no noise)."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) for x on the 8-bit grid of [-1, 1] under N(mean, e^(2 log_scale)) integrated over x's bin;
    the bins at -1 and +1 extend to -inf and +inf. Probabilities are floored at 1e-12 before the log."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = standard_normal_cdf(inv_std * (centered + BIN_HALF_WIDTH))
    cdf_min = standard_normal_cdf(inv_std * (centered - BIN_HALF_WIDTH))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=LOG_FLOOR))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=LOG_FLOOR))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=LOG_FLOOR))
    return torch.where(x < -EDGE, log_cdf_plus, torch.where(x > EDGE, log_one_minus_cdf_min, log_delta))
