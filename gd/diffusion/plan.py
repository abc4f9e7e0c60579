"""The batch plan: the one owner of "which group size, which labels" for training batches and sampling branches.

GroupDiff-l and GroupDiff-f are expressed here, not as model surgery. A micro-batch (one rank's share of one
gradient-accumulation step) is either a *group* micro-batch (the group stream, groups of N related images) or a
*conditional* one (the plain stream, group size 1):
- mode "l": with probability p_group a micro-batch is a group micro-batch and every label in it is null (the
  unconditional CFG branch, learnt on groups only); otherwise it is a plain conditional SiT batch whose labels
  are dropped with probability ``class_dropout`` per image (0 in the released recipe: the null label is then
  seen on group images only, ~p_group of all images).
- mode "f": every micro-batch is a group micro-batch; with probability p_group all its labels are null,
  otherwise they are kept, with ``class_dropout`` drawn per group (a group is conditional or not as a whole).
- mode "none": plain SiT (group size 1, per-image class dropout).
``mix`` says who shares a draw: "micro" (as the released code: each rank holds its own kinds, so one optimizer step
mixes group and conditional micro-batches across ranks and accumulation steps; a single process without
accumulation cannot mix, and its steps are wholly one kind) or "step" (one draw per optimizer step for every rank
and micro-batch: whole group steps and whole conditional steps). Under "micro" each rank takes exactly p_group of
its micro-batches as group ones in every block of consecutive micro-batches (10 for p_group 0.1), at random
positions of its own: the released code's per-epoch plan, made exact per block, so that every rank reads the same
number of batches from each stream per block (:meth:`BatchPlan.block_fetches`), which streaming's lockstep epochs
need.
At sampling the plan gives each CFG branch its group size (GroupDiff-l: conditional 1, unconditional N).

Every decision and every dropout mask is a pure function of (seed, step, rank, micro), so a resumed run replays
the same plan without any saved state. Every micro-batch holds the same number of images; only how they are
split into groups changes, and :func:`batch_layout` is the one check that a batch splits as the plan needs.

Group parallelism (``train.group_parallel`` P, gd.models.group_parallel): P consecutive ranks compute one
*replica's* micro-batch together, a replica being what one rank is without it. The plan, the data and every draw
belong to the replica (index rank // P): the P ranks of a replica get the same kind in the same micro-batch (they
run collectives together), the same labels and the same generator, and each keeps its rows of the replica's
micro-batch (:class:`Shard`): members r*N/P .. (r+1)*N/P - 1 of every group in a group micro-batch, the r-th
contiguous P-th of the images in a conditional one (group size 1: nothing to share, each rank runs its images
alone). A run with P > 1 thus draws exactly what a run with world/P ranks and P times the micro batch draws.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gd.distributed.layout import ParallelLayout, members_per_rank
from gd.rng import mix_seed, seeded_generator

MODES = ("l", "f", "none")
MIXES = ("micro", "step")
_MAX_BLOCK = 1000  # p_group is realised exactly per block of this many micro-batches at most
_TAG_STEP, _TAG_LABELS, _TAG_NOISE, _TAG_MICRO = 0, 1, 2, 3


def check_groups(images: int, group_size: int, what: str = "batch") -> int:
    """The number of groups ``images`` images make; ValueError when they do not split into whole groups."""
    if int(group_size) < 1:
        raise ValueError(f"group_size={group_size}: expected >= 1")
    if int(images) < 1:
        raise ValueError(f"{what}: {images} images; expected at least one group of {group_size}")
    if int(images) % int(group_size):
        raise ValueError(f"{what}: {images} images do not split into groups of {group_size} (not a whole "
                         f"number of groups; batches are group-major: G groups x N members)")
    return int(images) // int(group_size)


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch (images per optimizer step) splits over processes and micro-steps; ``micro_batch``
    images per process, ``group_parallel`` P processes per replica (see the module docstring)."""

    global_batch: int
    micro_batch: int
    world_size: int
    grad_accum: int
    group_parallel: int = 1

    @property
    def replicas(self) -> int:
        """Data-parallel replicas: world size / P."""
        return self.world_size // self.group_parallel

    @property
    def replica_batch(self) -> int:
        """Images of one replica's micro-batch, what its P ranks read and draw for together: micro_batch x P."""
        return self.micro_batch * self.group_parallel


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def suggest_group_parallel(world_size: int, group_size: int, groups: int, degree: int = 1) -> int | None:
    """The smallest P > ``degree`` that divides N and the world and leaves at most ``groups`` replicas (None when
    there is none): what to suggest when a step's groups cannot give every replica whole groups."""
    for p in range(degree + 1, group_size + 1):
        if group_size % p == 0 and world_size % p == 0 and world_size // p <= groups:
            return p
    return None


def batch_layout(train_cfg: Mapping[str, Any], world_size: int, group_size: int = 1,
                 max_group_size: int | None = None) -> BatchLayout:
    """Check the batch arithmetic for ``train_cfg`` (global_batch, micro_batch, group_parallel) on ``world_size``
    processes with groups of ``group_size``; return the layout, or raise ValueError naming every bad value.

    global_batch images per optimizer step = micro_batch images per process per micro-step x world_size x
    gradient accumulation. With group_parallel P (default 1) the processes form world/P replicas of P consecutive
    ranks; a group micro-batch on a rank holds G groups x N/P members (its share of the replica's G groups), so
    the step's global_batch/N groups must cover the replicas, P must divide N and the world, and micro_batch must
    be a multiple of N/P.
    """
    gb, mb, n, world = train_cfg["global_batch"], train_cfg["micro_batch"], group_size, world_size
    p = train_cfg.get("group_parallel", 1)
    p = 1 if p is None else p
    errors = []
    for key, value in (("train.global_batch", gb), ("train.micro_batch", mb), ("diffusion.group_size", n),
                       ("world size", world), ("train.group_parallel", p)):
        if not _positive(value):
            errors.append(f"{key}={value!r}: expected a positive integer")
    if errors:
        raise ValueError("invalid batch configuration:\n  " + "\n  ".join(errors))
    if max_group_size is not None and n > max_group_size:
        errors.append(f"diffusion.group_size={n} exceeds model.max_group_size={max_group_size} "
                      "(the sample embedding has one row per group member)")
    errors += ParallelLayout(world, p, n, section="train").problems()  # P divides the world and N
    splits = world % p == 0 and n % p == 0
    if gb % n:
        errors.append(f"train.global_batch={gb} is not divisible by diffusion.group_size={n}: "
                      "a group step needs whole groups")
    elif splits and world // p > gb // n:
        groups, replicas = gb // n, world // p
        fix = suggest_group_parallel(world, n, groups, p)
        share = (f"set train.group_parallel={fix} ({fix} ranks share each group, holding {n // fix} of its members "
                 f"each: {world // fix} replicas)" if fix else "no group_parallel P dividing N and the world fits")
        who = f"{world} processes" if p == 1 else f"{world} processes / train.group_parallel={p} = {replicas} replicas"
        errors.append(f"{who} but train.global_batch={gb} holds only {groups} groups of diffusion.group_size={n}: "
                      f"every {'process' if p == 1 else 'replica'} needs whole groups; {share}. Or use at most "
                      f"{groups * p} processes (fewer nodes, or fewer tasks per node), or raise train.global_batch "
                      f"to a multiple of {replicas * n} (which changes the recipe and its learning-rate tuning)")
    if gb % (mb * world):
        errors.append(f"train.global_batch={gb} is not divisible by train.micro_batch={mb} x world size {world} "
                      f"= {mb * world}: not a multiple of {world} processes x the micro batch, so gradient "
                      "accumulation would not be a whole number of micro-batches"
                      + (f" (train.micro_batch={gb // world} gives one micro-batch per step)"
                         if gb % world == 0 and gb // world < mb else ""))
    if splits and mb % (n // p):
        share = f"diffusion.group_size={n}" if p == 1 else (f"diffusion.group_size={n} / train.group_parallel={p} "
                                                             f"= {n // p} members per rank")
        errors.append(f"train.micro_batch={mb} images is not divisible by {share}: a micro batch must hold whole "
                      + ("groups" if p == 1 else "shares of groups"))
    if errors:
        raise ValueError("invalid batch configuration:\n  " + "\n  ".join(errors))
    return BatchLayout(gb, mb, world, gb // (mb * world), p)


@dataclass(frozen=True)
class Shard:
    """This rank's rows of its replica's micro-batch under group parallelism: ``parts`` P ranks, this one ``index``
    r (P = 1: all of it). A group-major batch of G groups of N (N > 1) gives rank r members r*N/P .. (r+1)*N/P - 1
    of every group, the layout gd.models.group_parallel computes; a batch of single images (N = 1) gives it the
    r-th contiguous P-th. Draws (times, noise, slots, dropped labels) are made for the whole replica batch from a
    generator the P ranks seed alike, then taken, so every rank sees its part of the same draw."""

    parts: int = 1
    index: int = 0

    def __post_init__(self) -> None:
        if self.parts < 1 or not 0 <= self.index < self.parts:
            raise ValueError(f"Shard(parts={self.parts}, index={self.index}): expected 0 <= index < parts")

    def members(self, group_size: int) -> int:
        """Images of each group (N > 1) or rows per image (N = 1) this rank holds: N/P, or 1."""
        return 1 if group_size == 1 else members_per_rank(group_size, self.parts)

    def take(self, x: Tensor, group_size: int) -> Tensor:
        """This rank's rows of the replica-level ``x`` (B, ...) (B = G*N, group-major); 0-d tensors pass as they
        are."""
        if self.parts == 1 or x.dim() == 0:
            return x
        b, rest = x.shape[0], x.shape[1:]
        if group_size > 1:
            m = self.members(group_size)
            check_groups(b, group_size)
            return x.reshape(b // group_size, self.parts, m, *rest)[:, self.index].reshape(-1, *rest)
        if b % self.parts:
            raise ValueError(f"a batch of {b} single images does not split over group_parallel P={self.parts}")
        per = b // self.parts
        return x[self.index * per:(self.index + 1) * per]

    def reduce(self, per_image: Tensor, group_size: int, reduction: str) -> Tensor:
        """The rank's loss from its images' losses, such that the P ranks' losses add up to P times the replica's
        (gd.models.group_parallel: ZeRO then averages to the replica's gradient): "mean" over its images;
        "group_sum" its members' sum per group, averaged over groups, times P when groups are shared (N > 1)."""
        if reduction == "mean":
            return per_image.mean()
        m = self.members(group_size) if group_size > 1 else 1
        loss = per_image.view(-1, m).sum(dim=1).mean()
        return loss * self.parts if group_size > 1 and self.parts > 1 else loss


@dataclass(frozen=True)
class StepPlan:
    """What one micro-batch of training step ``step`` does (with mix="step": every micro-batch of the step).

    is_group: it reads grouped batches (related images, group-major) and runs group attention.
    group_size: the model's group size for it (1 on a conditional GroupDiff-l micro-batch).
    null_labels: every label in it is the null class.
    """

    step: int
    is_group: bool
    group_size: int
    null_labels: bool

    def num_groups(self, images: int) -> int:
        """How many groups `images` images make on this step; the image count is the same on every step."""
        return check_groups(images, self.group_size)


class BatchPlan:
    """Deterministic plan for GroupDiff-l ("l"), GroupDiff-f ("f") or plain SiT ("none"); see the module docstring.

    ``class_dropout_prob``: probability that a conditional image's (mode "f": group's) label is dropped.
    ``group_parallel`` P: ranks k*P .. k*P + P - 1 are replica k, and every per-rank decision and draw below is
    replica k's (see the module docstring); P = 1: the replica is the rank.
    """

    def __init__(self, mode: str, group_size: int, p_group: float = 0.0, class_dropout_prob: float = 0.0,
                 num_classes: int = 1, seed: int = 0, mix: str = "step", accum: int = 1,
                 group_parallel: int = 1) -> None:
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
        if mix not in MIXES:
            raise ValueError(f"mix {mix!r} is not one of {MIXES}")
        if int(accum) < 1:
            raise ValueError(f"accum must be >= 1, got {accum}")
        if int(group_parallel) < 1:
            raise ValueError(f"group_parallel must be >= 1, got {group_parallel}")
        self.mode = mode
        self.group_size = int(group_size) if mode != "none" else 1
        self.p_group = float(p_group) if mode != "none" else 0.0
        self.class_dropout_prob = float(class_dropout_prob)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.mix = mix
        self.accum = int(accum)
        self.group_parallel = int(group_parallel)
        share = Fraction(self.p_group).limit_denominator(_MAX_BLOCK)
        # mix="micro": every rank takes exactly `per_block` group micro-batches in each block of `block` consecutive
        # micro-batches (its own accumulation steps, step after step), at positions drawn per (block, rank).
        self.block = share.denominator if mix == "micro" else self.accum
        self.per_block = share.numerator
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def from_config(cls, diffusion: Mapping[str, Any], model: Mapping[str, Any] | None = None,
                    seed: int = 0, accum: int = 1, group_parallel: int = 1) -> BatchPlan:
        """The plan of a run from ``cfg.diffusion`` (mode, group_size, p_group, class_dropout, mix) and
        ``cfg.model`` (num_classes; optional for sampling-only use), for ``accum`` micro-batches per step and rank
        and ``group_parallel`` ranks per replica (``train.group_parallel``).
        Without ``diffusion.class_dropout`` the model's ``class_dropout_prob`` is the conditional dropout (configs
        written before the released recipe)."""
        model = model or {}
        dropout = diffusion.get("class_dropout")
        dropout = model.get("class_dropout_prob", 0.0) if dropout is None else dropout
        return cls(str(diffusion.get("mode", "none")), int(diffusion.get("group_size", 1)),
                   float(diffusion.get("p_group", 0.0)), float(dropout), int(model.get("num_classes", 1)),
                   int(seed), str(diffusion.get("mix", "step")), int(accum), int(group_parallel))

    def __repr__(self) -> str:
        return (f"BatchPlan(mode={self.mode!r}, group_size={self.group_size}, p_group={self.p_group}, "
                f"class_dropout_prob={self.class_dropout_prob}, num_classes={self.num_classes}, seed={self.seed}, "
                f"mix={self.mix!r}, accum={self.accum}, group_parallel={self.group_parallel})")

    # ---- group sizes ----------------------------------------------------------------------------------------
    @property
    def uses_groups(self) -> bool:
        """Whether any training step is a group step (so batches must split into groups and the group stream
        is read)."""
        return self.mode == "f" or (self.mode == "l" and self.p_group > 0.0)

    @property
    def train_group_size(self) -> int:
        """The largest group size any training step uses: what micro-batches and the group stream must serve."""
        return self.group_size if self.uses_groups else 1

    def sampling_group_sizes(self) -> tuple[int, int]:
        """(conditional, unconditional) CFG branch group sizes: GroupDiff-l (1, N), -f (N, N), plain (1, 1)."""
        return {"l": (1, self.group_size), "f": (self.group_size, self.group_size), "none": (1, 1)}[self.mode]

    def layout(self, train_cfg: Mapping[str, Any], world_size: int,
               max_group_size: int | None = None) -> BatchLayout:
        """:func:`batch_layout` at this plan's training group size (``train_cfg.group_parallel`` included)."""
        return batch_layout(train_cfg, world_size, self.train_group_size, max_group_size)

    # ---- per-micro-batch decisions ---------------------------------------------------------------------------
    def replica(self, rank: int) -> int:
        """The replica of ``rank``: rank // group_parallel (whose plan, labels and draws the rank shares)."""
        return int(rank) // self.group_parallel

    def block_kinds(self, block: int, rank: int) -> np.ndarray:
        """(self.block,) bool: which of the block's consecutive micro-batches (flat index step * accum + micro,
        from block * self.block on) are p_group events for replica ``rank`` (= rank // group_parallel).
        mix="micro": exactly ``per_block`` of them, at positions drawn from (seed, block, replica); mix="step": one
        draw per step, shared by every rank."""
        key = (int(block), int(rank) if self.mix == "micro" else 0)
        kinds = self._cache.get(key)
        if kinds is None:
            if self.mix == "step":
                u = np.random.default_rng(mix_seed(self.seed, _TAG_STEP, int(block))).random()
                kinds = np.full(self.block, u < self.p_group)
            else:
                order = np.random.default_rng(mix_seed(self.seed, _TAG_MICRO, *key)).permutation(self.block)
                kinds = order < self.per_block
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = kinds
        return kinds

    def _drawn(self, step: int, rank: int, micro: int) -> bool:
        flat = int(step) * self.accum + int(micro)
        return bool(self.block_kinds(flat // self.block, self.replica(rank))[flat % self.block])

    def _plan(self, step: int, drawn: bool) -> StepPlan:
        if self.mode == "none":
            return StepPlan(step, False, 1, False)
        if self.mode == "l":
            return StepPlan(step, drawn, self.group_size if drawn else 1, drawn)
        return StepPlan(step, True, self.group_size, drawn)

    def micro(self, step: int, rank: int = 0, micro: int = 0) -> StepPlan:
        """The plan of micro-batch ``micro`` (< accum) of rank ``rank`` in training step ``step`` (all >= 0)."""
        for name, value in (("step", step), ("rank", rank), ("micro", micro)):
            if int(value) < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if int(micro) >= self.accum:
            raise ValueError(f"micro={micro}: this plan has accum={self.accum} micro-batches per step")
        return self._plan(int(step), self._drawn(int(step), int(rank), int(micro)))

    def block_fetches(self, step: int, micro: int) -> tuple[int, int] | None:
        """When micro-batch (step, micro) starts a block: (group, plain) micro-batches every rank needs for the
        whole block, equal on all ranks (mix="micro": per_block group ones), else None. Reading each block's
        batches up front keeps every rank's streams in lockstep, as streaming's per-epoch barrier needs, while the
        ranks use them in different orders."""
        flat = int(step) * self.accum + int(micro)
        if flat % self.block:
            return None
        groups = int(self.block_kinds(flat // self.block, 0).sum()) if self.mode == "l" else (
            self.block if self.mode == "f" else 0)
        return groups, self.block - groups

    def step(self, step: int) -> StepPlan:
        """The plan of rank 0's first micro-batch of ``step``: with mix="step", that of every micro-batch."""
        return self.micro(step, 0, 0)

    def group_micro_batches(self, step: int, world_size: int) -> np.ndarray:
        """(world_size, accum) bool: which micro-batches of ``step`` are group micro-batches (every rank can count
        the whole step's images per group size without communication)."""
        return np.array([[self.micro(step, r, m).is_group for m in range(self.accum)] for r in range(world_size)],
                        dtype=bool).reshape(world_size, self.accum)

    def labels(self, step: int, y: Tensor, rank: int = 0, micro: int = 0) -> Tensor:
        """The labels the model sees in micro-batch (step, rank, micro) for its group-major labels `y`
        ((B,) or (G, N)).

        Null (= num_classes) everywhere in a null-label micro-batch; otherwise class dropout with a generator
        seeded from (seed, step, replica, micro) — per image, or per group in mode "f". `micro` is the gradient
        accumulation index, so micro-batches of one step get independent masks. Under group parallelism `y` is
        the replica's micro-batch (all P ranks' rows), and the P ranks get the same labels.
        """
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor, got {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}] (num_classes = null), "
                             f"got range [{int(y.min())}, {int(y.max())}]")
        plan = self.micro(step, rank, micro)
        flat = y.reshape(-1)
        groups = plan.num_groups(flat.shape[0])
        if plan.null_labels:
            return torch.full_like(y, self.num_classes)
        if self.class_dropout_prob == 0.0:
            return y.clone()
        gen = seeded_generator(self.seed, _TAG_LABELS, int(step), self.replica(rank), int(micro))
        per_group = self.mode == "f"
        drop = torch.rand(groups if per_group else flat.shape[0], generator=gen) < self.class_dropout_prob
        if per_group:
            drop = drop.repeat_interleave(plan.group_size)
        out = torch.where(drop.to(flat.device), torch.full_like(flat, self.num_classes), flat)
        return out.reshape(y.shape)

    def generator(self, step: int, rank: int = 0, micro: int = 0,
                  device: torch.device | str = "cpu") -> torch.Generator:
        """A generator for the step's time and noise draws, seeded from (seed, step, replica, micro): the P ranks
        of a replica draw alike (for the replica's whole micro-batch) and each takes its rows (:class:`Shard`)."""
        return seeded_generator(self.seed, _TAG_NOISE, int(step), self.replica(rank), int(micro), device=device)
