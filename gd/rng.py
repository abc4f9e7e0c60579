"""Seeds derived from tuples of integers: the one mixer behind every reproducible draw of training and sampling.

A step's label dropout, times and noise, and a sampling slot's starting noise, each come from a generator seeded by
``mix_seed(seed, tag, ...)``; the same tuple gives the same stream on any rank, device or resumed run, and tuples
that differ in any position give unrelated streams (numpy's SeedSequence hashing).
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
