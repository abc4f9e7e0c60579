"""Probes of the training model that run on their own cadence: S_cross, the paper's cross-sample attention score,
and the held-out probes (losses of the conditional and unconditional branches, alone and in groups, and member
selectivity) on a fixed set with fixed draws. What each measures: docs/probes.md."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gd.diffusion.objectives import FlowObjective, Objective
from gd.rng import seeded_generator

_TAG_NOISE, _TAG_SLOTS, _TAG_ORDER = 1, 2, 3


@contextlib.contextmanager
def full_weights(module: torch.nn.Module, zero3: bool) -> Iterator[None]:
    """``module``'s whole weights on this rank for the block (a collective under ZeRO-3: every rank enters it),
    with group parallelism switched off (a probe needs each group's attention in one place)."""
    split = module.group_parallel
    module.set_group_parallel(None)
    try:
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                yield
        else:
            yield
    finally:
        module.set_group_parallel(split)


class SCrossProbe:
    """Every ``every`` steps, S_cross per layer of the training model on the last group batch at signal-to-noise
    ratio 1 (flow t = 0.5; the DDPM step where ᾱ is nearest 1/2), noised as the run's ``objective`` does.

    The trainer shows it each group micro-batch (:meth:`observe`); :meth:`maybe_measure` returns the metrics to log
    when the step is due (a collective under ZeRO-3: every rank calls it). ``every`` = 0 turns it off. Under group
    parallelism the trainer shows it the replica's whole groups and it measures them on every rank of the replica
    with the model's group parallelism switched off (the score needs each group's attention in one place).
    """

    def __init__(self, every: int, zero3: bool, objective: Objective | None = None) -> None:
        self.every = int(every or 0)
        self.zero3 = zero3
        self.objective = objective if objective is not None else FlowObjective()
        self._last: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def observe(self, x1: torch.Tensor, y: torch.Tensor, group_size: int) -> None:
        if self.every and group_size > 1:
            self._last = (x1.detach(), y.detach(), group_size)

    def maybe_measure(self, step: int, engine: Any) -> dict[str, float] | None:
        if not self.every or step % self.every or self._last is None:
            return None
        scores = self.measure(engine.module)
        return {"s_cross": float(np.mean(list(scores.values())) if scores else 0.0),
                **{f"s_cross_l{k}": v for k, v in scores.items()}}

    def measure(self, module: torch.nn.Module) -> dict[int, float]:
        from gd.models import cross_attention_score

        x1, y, n = self._last
        gen = torch.Generator(device=x1.device).manual_seed(0)
        noise = torch.randn(x1.shape, generator=gen, device=x1.device, dtype=x1.dtype)
        x_t, t = self.objective.probe_input(x1, noise)
        slots = module.draw_slots(x1.shape[0], n, gen, whole=True) if module.embed_mode == "cond" else None
        with full_weights(module, self.zero3):
            return cross_attention_score(module, x_t, t, y, n, slots=slots)


# ---- held-out probes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSet:
    """A fixed held-out set: ``x`` (M, C, H, W) float32 latents and ``y`` (M,) labels, ordered as M/N same-class
    groups of ``group_size`` N consecutive images, with ``times`` fixed times and ``seed`` fixing every draw.

    Built by :meth:`from_records`: records are read in order (index order of the shards for :meth:`from_shards`),
    each put in its class's bucket, and a bucket that reaches N images becomes the next group; reading stops at
    ``images`` images (so the set is the first complete same-class groups of the stream: with N = 1 its first
    ``images`` records). Random groups are the same images in a seeded permutation (:meth:`random_order`); the
    noise of image i at time k is the same in every arrangement (:meth:`noise`). Nothing here is random at
    measurement time, so a probe is identical every time it is measured, across steps and across runs.
    """

    x: Tensor
    y: Tensor
    group_size: int
    times: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        m = self.x.shape[0]
        if self.group_size < 1 or m == 0 or m % self.group_size:
            raise ValueError(f"a probe set of {m} images is not a whole number of groups of {self.group_size}")
        if self.times < 1:
            raise ValueError(f"probe times={self.times}: expected >= 1")

    @staticmethod
    def check(images: int, group_size: int, times: int) -> None:
        """ValueError naming a bad size, before any record is read."""
        if group_size < 1 or images < group_size or images % group_size:
            raise ValueError(f"train.probe_images={images}: expected a positive multiple of the probe group size "
                             f"{group_size}")
        if times < 1:
            raise ValueError(f"train.probe_times={times}: expected >= 1")

    @classmethod
    def from_records(cls, records: Iterable[tuple[Any, int]], images: int, group_size: int, times: int = 4,
                     seed: int = 0) -> ProbeSet:
        """The first ``images`` images (a multiple of ``group_size``) of ``records`` ((latent, label) pairs) in
        complete same-class groups (class docstring)."""
        cls.check(images, group_size, times)
        buckets: dict[int, list[Any]] = {}
        xs: list[Any] = []
        ys: list[int] = []
        for latent, label in records:
            bucket = buckets.setdefault(int(label), [])
            bucket.append(latent)
            if len(bucket) == group_size:
                xs += bucket
                ys += [int(label)] * group_size
                bucket.clear()
                if len(xs) == images:
                    break
        if len(xs) < images:
            raise ValueError(f"train.probe_images={images}: the probe data holds only {len(xs)} images in complete "
                             f"same-class groups of {group_size}")
        x = torch.stack([torch.tensor(np.array(v), dtype=torch.float32) for v in xs])
        return cls(x, torch.tensor(ys, dtype=torch.long), group_size, times, seed)

    @classmethod
    def from_shards(cls, root: str, cache: str, images: int, group_size: int, times: int = 4,
                    seed: int = 0) -> ProbeSet:
        """:meth:`from_records` over the plain records of the shards at ``root`` in index order (``cache``: a
        node-local folder of its own)."""
        from gd.data.loader import plain_records

        cls.check(images, group_size, times)
        ds = plain_records(root, cache)

        def records() -> Iterator[tuple[Any, int]]:
            for i in range(ds.num_samples):
                rec = ds.get_item(i)
                yield rec["latent"], int(rec["label"])

        try:
            return cls.from_records(records(), images, group_size, times, seed)
        finally:
            del ds

    def random_order(self) -> Tensor:
        """The seeded permutation that makes the random groups (consecutive N of the permuted set)."""
        return torch.randperm(self.x.shape[0], generator=seeded_generator(self.seed, _TAG_ORDER))

    def noise(self, k: int) -> Tensor:
        """The fixed noise (M, C, H, W) of every image at time ``k`` (in the set's order)."""
        return torch.randn(self.x.shape, generator=seeded_generator(self.seed, _TAG_NOISE, k))


@torch.no_grad()
def measure_probes(model: torch.nn.Module, objective: Objective, probes: ProbeSet, batch: int = 64,
                   layers: Iterable[int] | None = None, per_time: bool = False) -> dict[str, float]:
    """The held-out probes of ``model`` (a gd SiT, whole weights here: see :func:`full_weights`) on ``probes``.

    At each of ``objective.probe_times(probes.times)`` (every image of a pass at the same t, so a group shares
    its time as in training without sigma_tv) and with each image's fixed noise and seeded sample-embedding slots,
    the mean per-image training loss of the objective (flow velocity MSE, DDPM hybrid loss), averaged over the
    times, of: ``probe_loss_cond`` (true labels, group size 1), ``probe_loss_uncond`` (null label, alone), and
    with N = ``probes.group_size`` > 1 ``probe_loss_uncond_class`` / ``probe_loss_uncond_random`` (null label, in
    same-class / random groups of N) and their differences ``probe_loss_class_minus_alone`` /
    ``probe_loss_random_minus_alone`` (negative: grouping helps). During the grouped passes, per layer of
    ``layers`` (default ``model.group_layers``) the own-member attention share ``probe_own_{class,random}_l{i}``,
    its mean over layers ``probe_own_{class,random}``, the uniform share ``probe_own_uniform`` = 1/N, and
    S_cross ``probe_s_cross_{class,random}`` (mean over layers). Without a null-label row (class_dropout_prob 0)
    only the conditional loss. ``batch``: images per forward (rounded down to whole groups). ``per_time``: also
    each loss at each time, as ``<key>@t<time>``. Runs in eval mode (restored afterwards).
    """
    from gd.models import GroupAttentionStats

    n = probes.group_size
    m = probes.x.shape[0]
    chunk = max(batch // n, 1) * n
    device = next(model.parameters()).device
    times = objective.probe_times(probes.times)
    null = int(model.num_classes)
    has_null = model.y_embedder.embedding_table.num_embeddings > null
    order = probes.random_order()
    arrangements: list[tuple[str, Tensor | None, bool, int]] = [("cond", None, False, 1)]
    if has_null:
        arrangements.append(("uncond", None, True, 1))
        if n > 1:
            arrangements += [("uncond_class", None, True, n), ("uncond_random", order, True, n)]
    net_of = objective.network
    out: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for tag, (name, perm, uncond, size) in enumerate(arrangements):
            stats = GroupAttentionStats(model, layers) if size > 1 else contextlib.nullcontext()
            per_t = []
            with stats:
                for k, t_k in enumerate(times.tolist()):
                    x, y, noise = probes.x, probes.y, probes.noise(k)
                    if perm is not None:
                        x, y, noise = x[perm], y[perm], noise[perm]
                    if uncond:
                        y = torch.full_like(y, null)
                    slots = None
                    if model.embed_mode == "cond":
                        slots = model.draw_slots(m, size, seeded_generator(probes.seed, _TAG_SLOTS, tag, k),
                                                 whole=True)
                    total = 0.0
                    for lo in range(0, m, chunk):
                        hi = min(lo + chunk, m)
                        s = None if slots is None else slots[lo:hi].to(device)

                        def call(xt: Tensor, t: Tensor, yy: Tensor, group_size: int, full_output: bool = False,
                                 _s: Tensor | None = s) -> Tensor:
                            return model(xt, t, yy, group_size=group_size, slots=_s, full_output=full_output)

                        t = torch.full((hi - lo,), t_k, dtype=times.dtype, device=device)
                        _, per_image = objective.loss(net_of(call), x[lo:hi].to(device), y[lo:hi].to(device), size,
                                                      None, t=t, noise=noise[lo:hi].to(device))
                        total += float(per_image.double().sum())
                    per_t.append(total / m)
            out[f"probe_loss_{name}"] = float(np.mean(per_t))
            if per_time:
                out.update({f"probe_loss_{name}@t{t_k:g}": v for t_k, v in zip(times.tolist(), per_t)})
            if size > 1:
                kind = name.split("_")[-1]
                own = {i: v for i, v in stats.own_share().items() if v is not None}
                out.update({f"probe_own_{kind}_l{i}": v for i, v in own.items()})
                if own:
                    out[f"probe_own_{kind}"] = float(np.mean(list(own.values())))
                scores = stats.s_cross()
                out[f"probe_s_cross_{kind}"] = float(np.mean(list(scores.values()))) if scores else 0.0
    finally:
        model.train(was_training)
    if "probe_loss_uncond_class" in out:
        out["probe_loss_class_minus_alone"] = out["probe_loss_uncond_class"] - out["probe_loss_uncond"]
        out["probe_loss_random_minus_alone"] = out["probe_loss_uncond_random"] - out["probe_loss_uncond"]
        out["probe_own_uniform"] = 1.0 / n
    return out


class HeldOutProbe:
    """Every ``every`` steps (``train.probe_every``; 0 = off) the held-out probes (:func:`measure_probes`) of the
    training model on ``probes``; a collective under ZeRO-3 (every rank calls :meth:`maybe_measure` and measures
    the whole set, so every rank gets the same values)."""

    def __init__(self, every: int, zero3: bool, objective: Objective, probes: ProbeSet | None,
                 batch: int = 64) -> None:
        self.every = int(every or 0)
        self.zero3 = zero3
        self.objective = objective
        self.probes = probes
        self.batch = int(batch)
        if self.every and probes is None:
            raise ValueError(f"train.probe_every={self.every} needs a probe set")

    @classmethod
    def from_config(cls, cfg: Any, zero3: bool, objective: Objective, run_group_size: int) -> HeldOutProbe:
        """From ``cfg.train``'s probe_* keys (conf/train/default.yaml); reads the set only when probes are on.
        ValueError naming a bad value, before the set is read."""
        t = cfg.train
        every = int(t.get("probe_every") or 0)
        if every < 0:
            raise ValueError(f"train.probe_every={every}: expected >= 0 (0 = off)")
        if not every:
            return cls(0, zero3, objective, None)
        size = t.get("probe_group_size")
        size = int(size) if size is not None else max(int(run_group_size), 1)
        if not 1 <= size <= int(cfg.model.max_group_size):
            raise ValueError(f"train.probe_group_size={size}: expected 1..model.max_group_size="
                             f"{cfg.model.max_group_size}")
        images = int(t.get("probe_images") or 0)
        root = str(t.get("probe_data") or cfg.data.root)
        cache = f"{cfg.data.cache}/probe"
        probes = ProbeSet.from_shards(root, cache, images, size, int(t.get("probe_times") or 0),
                                      int(t.get("probe_seed") or 0))
        return cls(every, zero3, objective, probes, int(t.get("micro_batch") or 64))

    def maybe_measure(self, step: int, engine: Any) -> dict[str, float] | None:
        if not self.every or step % self.every:
            return None
        module = engine.module
        with full_weights(module, self.zero3):
            return measure_probes(module, self.objective, self.probes, self.batch)
