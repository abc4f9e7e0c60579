"""Draws derived from tuples of integers: the mixers behind every reproducible draw of training and sampling.

A step's label dropout, times and noise, and a sampling slot's starting noise, each come from a generator seeded by
``mix_seed(seed, tag, ...)``; the same tuple gives the same stream on any rank, device or resumed run, and tuples
that differ in any position give unrelated streams (numpy's SeedSequence hashing). Where a generator per draw
would cost too much (a group per loader sample), counter-based uniforms (splitmix64 of the tuple) give the same
guarantees.
"""
from __future__ import annotations

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed (fits torch's manual_seed) hashed from non-negative integers."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def seeded_generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with :func:`mix_seed` of ``parts``."""
    return torch.Generator(device=device).manual_seed(mix_seed(*parts))


_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _unit(z: np.ndarray) -> np.ndarray:
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def hash_uniform(seed: int, epoch: int, index: int, n: int) -> np.ndarray:
    """n uniforms in [0, 1) from splitmix64 of (seed, epoch, index, j): a counter-based generator, ~50x cheaper per
    sample than seeding a numpy Generator, so drawing groups never limits loader throughput."""
    with np.errstate(over="ignore"):
        base = (np.uint64(seed & 0xFFFFFFFF) * _GOLDEN
                ^ np.uint64(epoch & 0xFFFFFFFF) * np.uint64(0xC2B2AE3D27D4EB4F)
                ^ np.uint64(index & 0xFFFFFFFFFFFF) * np.uint64(0x165667B19E3779F9))
        return _unit(_splitmix(base + np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN))

