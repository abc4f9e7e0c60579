"""The batch plan: which training steps are group steps, their group size, and the labels they see.

GroupDiff-l and GroupDiff-f are expressed here, not as model surgery:
- mode "l": with probability p_group a step is a group step (group loader, group size N, every label null);
  otherwise a plain conditional SiT step (group size 1, per-image class dropout).
- mode "f": every step is a group step (group size N); with probability p_group its labels are all null,
  otherwise they are kept with class dropout drawn per group (a group is conditional or unconditional as a whole).
- mode "none": plain SiT (group size 1, per-image class dropout).
Every step decision and every dropout mask is a pure function of (seed, step[, rank, micro]), so a resumed run
replays the same plan without any saved state. Each step holds the same number of images; only how they are
split into groups changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

MODES = ("l", "f", "none")
_TAG_STEP, _TAG_LABELS, _TAG_NOISE = 0, 1, 2


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class StepPlan:
    """What one training step does.

    is_group: the step reads grouped batches (related images, group-major) and runs group attention.
    group_size: the model's group size for this step (1 on a conditional GroupDiff-l step).
    null_labels: every label of the step is the null class.
    """

    step: int
    is_group: bool
    group_size: int
    null_labels: bool

    def num_groups(self, images: int) -> int:
        """How many groups `images` images make on this step; the image count is the same on every step."""
        if images % self.group_size != 0:
            raise ValueError(f"{images} images per batch do not split into groups of {self.group_size}")
        return images // self.group_size


class BatchPlan:
    """Deterministic per-step plan for GroupDiff-l ("l"), GroupDiff-f ("f") or plain SiT ("none")."""

    def __init__(self, mode: str, group_size: int, p_group: float, class_dropout_prob: float,
                 num_classes: int, seed: int) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if int(group_size) < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if not 0.0 <= p_group <= 1.0:
            raise ValueError(f"p_group must be in [0, 1], got {p_group}")
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob}")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.mode = mode
        self.group_size = int(group_size) if mode != "none" else 1
        self.p_group = float(p_group) if mode != "none" else 0.0
        self.class_dropout_prob = float(class_dropout_prob)
        self.num_classes = int(num_classes)
        self.seed = int(seed)

    def __repr__(self) -> str:
        return (f"BatchPlan(mode={self.mode!r}, group_size={self.group_size}, p_group={self.p_group}, "
                f"class_dropout_prob={self.class_dropout_prob}, num_classes={self.num_classes}, seed={self.seed})")

    def step(self, step: int) -> StepPlan:
        """The plan of training step `step` (>= 0)."""
        if int(step) < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        step = int(step)
        drawn = bool(np.random.default_rng(_seed(self.seed, _TAG_STEP, step)).random() < self.p_group)
        if self.mode == "none":
            return StepPlan(step, False, 1, False)
        if self.mode == "l":
            return StepPlan(step, drawn, self.group_size if drawn else 1, drawn)
        return StepPlan(step, True, self.group_size, drawn)

    def labels(self, step: int, y: Tensor, rank: int = 0, micro: int = 0) -> Tensor:
        """The labels the model sees on `step` for the group-major labels `y` ((B,) or (G, N)).

        Null (= num_classes) everywhere on a null-label step; otherwise class dropout with a generator seeded
        from (seed, step, rank, micro) — per image, or per group in mode "f". `micro` is the gradient
        accumulation index, so micro-batches of one step get independent masks.
        """
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor, got {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}] (num_classes = null), "
                             f"got range [{int(y.min())}, {int(y.max())}]")
        plan = self.step(step)
        flat = y.reshape(-1)
        if flat.shape[0] % plan.group_size != 0:
            raise ValueError(f"{flat.shape[0]} labels do not split into groups of {plan.group_size}")
        if plan.null_labels:
            return torch.full_like(y, self.num_classes)
        if self.class_dropout_prob == 0.0:
            return y.clone()
        gen = torch.Generator().manual_seed(_seed(self.seed, _TAG_LABELS, int(step), int(rank), int(micro)))
        per_group = self.mode == "f"
        n_draws = flat.shape[0] // plan.group_size if per_group else flat.shape[0]
        drop = torch.rand(n_draws, generator=gen) < self.class_dropout_prob
        if per_group:
            drop = drop.repeat_interleave(plan.group_size)
        out = torch.where(drop.to(flat.device), torch.full_like(flat, self.num_classes), flat)
        return out.reshape(y.shape)

    def generator(self, step: int, rank: int = 0, micro: int = 0,
                  device: torch.device | str = "cpu") -> torch.Generator:
        """A generator for the step's time and noise draws, seeded from (seed, step, rank, micro)."""
        return torch.Generator(device=device).manual_seed(
            _seed(self.seed, _TAG_NOISE, int(step), int(rank), int(micro)))

    def group_fraction(self, steps: int, start: int = 0) -> float:
        """Fraction of null-label steps among `steps` steps from `start` (the empirical p_group)."""
        return sum(self.step(s).null_labels for s in range(start, start + steps)) / max(steps, 1)
