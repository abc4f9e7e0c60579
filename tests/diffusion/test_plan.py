"""The batch plan: group-step frequency, exact repetition from a seed, labels per mode."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gd.diffusion import BatchPlan

STEPS = 20000


def _plan(mode: str = "l", p: float = 0.1, drop: float = 0.1, seed: int = 0, n: int = 4, accum: int = 2) -> BatchPlan:
    return BatchPlan(mode, group_size=n, p_group=p, class_dropout_prob=drop, num_classes=10, seed=seed, accum=accum)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_group_frequency_matches_p_group(p: float) -> None:
    plan = _plan(p=p)
    hits = sum(plan.step(s).is_group for s in range(STEPS))
    tol = 4 * math.sqrt(STEPS * p * (1 - p))  # binomial, 4 standard deviations
    assert abs(hits - STEPS * p) <= tol


def test_plan_repeats_exactly_from_seed_and_is_pure_in_the_step() -> None:
    a, b, c = _plan(seed=7), _plan(seed=7), _plan(seed=8)
    seq_a = [a.step(s) for s in range(2000)]
    assert seq_a == [b.step(s) for s in reversed(range(2000))][::-1]  # order of queries does not matter
    assert [s.is_group for s in seq_a] != [c.step(s).is_group for s in range(2000)]
    y = torch.arange(8) % 10
    for s in (0, 5, 1234):
        assert torch.equal(a.labels(s, y, rank=1), b.labels(s, y, rank=1))


def test_mode_l_steps_and_labels() -> None:
    plan = _plan("l", p=0.3, drop=0.25)
    y = torch.randint(0, 10, (4000,), generator=torch.Generator().manual_seed(0))
    steps = [plan.step(s) for s in range(200)]
    group = next(s for s in steps if s.is_group)
    cond = next(s for s in steps if not s.is_group)
    assert (group.group_size, group.null_labels) == (4, True)
    assert (cond.group_size, cond.null_labels) == (1, False)
    assert torch.all(plan.labels(group.step, y) == 10)
    lab = plan.labels(cond.step, y)
    dropped = lab == 10
    assert torch.equal(lab[~dropped], y[~dropped])
    assert abs(float(dropped.float().mean()) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)
    # ranks and micro-batches get independent masks
    assert not torch.equal(plan.labels(cond.step, y, rank=1), lab)
    assert not torch.equal(plan.labels(cond.step, y, micro=1), lab)


def test_mode_f_groups_everywhere_and_drops_labels_per_group() -> None:
    plan = _plan("f", p=0.2, drop=0.5)
    steps = [plan.step(s) for s in range(500)]
    assert all(s.is_group and s.group_size == 4 for s in steps)
    nulls = sum(s.null_labels for s in steps)
    assert abs(nulls - 100) <= 4 * math.sqrt(500 * 0.2 * 0.8)
    cond = next(s for s in steps if not s.null_labels)
    y = torch.randint(0, 10, (400,), generator=torch.Generator().manual_seed(0))
    lab = plan.labels(cond.step, y).view(100, 4)
    dropped = lab == 10
    assert torch.all(dropped.all(1) | (~dropped).all(1))  # a group is dropped as a whole
    assert 20 < int(dropped.all(1).sum()) < 80
    # (G, N)-shaped labels give the same answer as the flat group-major ones
    assert torch.equal(plan.labels(cond.step, y.view(100, 4)), lab)


def test_mode_none_is_plain_sit() -> None:
    plan = BatchPlan("none", group_size=4, p_group=0.5, class_dropout_prob=0.1, num_classes=10, seed=0)
    assert all(not s.is_group and s.group_size == 1 and not s.null_labels for s in map(plan.step, range(200)))


def test_same_images_on_every_step() -> None:
    plan = _plan("l", p=0.5)
    for s in range(50):
        st = plan.step(s)
        assert st.num_groups(32) * st.group_size == 32
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        next(st for st in map(plan.step, range(50)) if st.is_group).num_groups(30)


def test_noise_generator_is_seeded_by_step_rank_micro() -> None:
    plan = _plan()
    draw = lambda **kw: torch.rand(3, generator=plan.generator(**kw))  # noqa: E731
    assert torch.equal(draw(step=3), draw(step=3))
    assert not torch.equal(draw(step=3), draw(step=4))
    assert not torch.equal(draw(step=3), draw(step=3, rank=1))
    assert not torch.equal(draw(step=3), draw(step=3, micro=1))


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="x"), "mode"), (dict(group_size=0), "group_size"), (dict(p_group=1.5), "p_group"),
    (dict(class_dropout_prob=-0.1), "class_dropout_prob"), (dict(num_classes=0), "num_classes"),
    (dict(seed=-1), "seed"),
])
def test_bad_config_is_refused(kwargs: dict, match: str) -> None:
    base = dict(mode="l", group_size=4, p_group=0.1, class_dropout_prob=0.1, num_classes=10, seed=0)
    with pytest.raises(ValueError, match=match):
        BatchPlan(**{**base, **kwargs})


def test_bad_labels_are_refused() -> None:
    plan = _plan()
    with pytest.raises(ValueError, match="labels must be in"):
        plan.labels(0, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="integer"):
        plan.labels(0, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="step must be"):
        plan.step(-1)


# ---- the released recipe: null labels only on group images, micro-batches of one step mixed -----------------------
def _released(p: float = 0.1, seed: int = 0, n: int = 4, accum: int = 1) -> BatchPlan:
    return BatchPlan("l", group_size=n, p_group=p, class_dropout_prob=0.0, num_classes=10, seed=seed, mix="micro",
                     accum=accum)


def test_released_null_labels_are_exactly_the_group_images() -> None:
    """4 ranks x 2 micro-batches x 2,000 steps: exactly p_group of every rank's micro-batches (per block of 10) are
    group micro-batches of N with every label null, and no conditional image is ever null. Catches the class
    dropout applied again on conditional micro-batches (19% null instead of 10%), p_group read per image, or a
    rank whose share drifts from p_group."""
    plan = _released(accum=2)
    assert (plan.block, plan.per_block) == (10, 1)
    y = torch.arange(32) % 10
    for r in range(4):
        null_micro = 0
        for s in range(2000):
            for m in range(2):
                mp = plan.micro(s, r, m)
                lab = plan.labels(s, y, rank=r, micro=m)
                nulls = int((lab == 10).sum())
                if mp.is_group:
                    assert mp.group_size == 4 and mp.null_labels and nulls == 32
                else:
                    assert mp.group_size == 1 and not mp.null_labels and nulls == 0 and torch.equal(lab, y)
                null_micro += mp.null_labels
        assert null_micro == 400  # 4,000 micro-batches, 1 in every block of 10


def test_micro_mix_mixes_group_and_conditional_micro_batches_within_a_step() -> None:
    """With 8 ranks each taking 1 group micro-batch per block of 10 at its own random position, a step holds both
    kinds with probability 1 - 0.9^8 - 0.1^8 and the group share of a step varies like the released code's; mix=step
    keeps whole steps of one kind. Catches positions shared by all ranks (no mixing) or fixed positions."""
    mixed = _released()
    steps = 3000
    grids = [mixed.group_micro_batches(s, 8) for s in range(steps)]
    both = sum(bool(g.any() and not g.all()) for g in grids)
    p_both = 1 - 0.9**8 - 0.1**8
    assert abs(both / steps - p_both) <= 4 * math.sqrt(p_both * (1 - p_both) / steps)
    per_rank_step = np.array([g[:, 0] for g in grids])  # (steps, ranks)
    assert len({tuple(np.flatnonzero(per_rank_step[:10, r])) for r in range(8)}) > 1  # ranks differ in position
    whole = BatchPlan("l", 4, 0.1, 0.0, 10, 0, mix="step", accum=2)
    assert all(g.all() or not g.any() for g in (whole.group_micro_batches(s, 8) for s in range(500)))


def test_block_fetches_are_equal_on_every_rank_and_cover_the_block() -> None:
    """Every rank reads the same number of group and plain batches per block (streaming's lockstep epochs), and
    exactly as many as its own micro-batches of that block use. Catches a rank that would read one more batch
    from a stream than another (a deadlock at the next epoch barrier) or a block that runs out of batches."""
    for plan in (_released(accum=3), _released(p=0.25, accum=2), BatchPlan("l", 4, 0.3, 0.0, 10, 1, "step", 2),
                 BatchPlan("f", 4, 0.1, 0.0, 10, 0, "micro", 1), BatchPlan("none", 1, 0.0, 0.1, 10, 0, "micro", 2)):
        for r in range(5):
            need = {"group": 0, "plain": 0}
            for s in range(60):
                for m in range(plan.accum):
                    fetched = plan.block_fetches(s, m)
                    if fetched is not None:
                        assert not any(need.values()), "a block started before the last one was used up"
                        need = {"group": fetched[0], "plain": fetched[1]}
                    need["group" if plan.micro(s, r, m).is_group else "plain"] -= 1
                    assert min(need.values()) >= 0, (plan, s, m)


def test_group_micro_batches_agree_with_micro_and_are_pure() -> None:
    """The step composition (used for FLOPs and metrics on every rank) equals the per-micro-batch plan each rank
    follows, in any query order; a different seed gives a different plan."""
    plan = _released(p=0.3, seed=5, accum=3)
    for s in (0, 1, 17, 123456):
        grid = plan.group_micro_batches(s, 6)
        assert grid.tolist() == [[plan.micro(s, r, m).is_group for m in range(3)] for r in range(6)]
    a = [_released(seed=5).micro(s, 2, 0) for s in range(300)]
    assert a == [_released(seed=5).micro(s, 2, 0) for s in reversed(range(300))][::-1]
    assert [x.is_group for x in a] != [_released(seed=6).micro(s, 2, 0).is_group for s in range(300)]


def test_one_process_without_accumulation_cannot_mix() -> None:
    """A single micro-batch per step: each step is wholly one kind, exactly p_group of them per block."""
    plan = _released(p=0.25)
    kinds = [bool(plan.group_micro_batches(s, 1).all()) for s in range(4000)]
    assert sum(kinds) == 1000 and all(sum(kinds[i:i + 4]) == 1 for i in range(0, 4000, 4))


def test_from_config_reads_the_released_keys() -> None:
    """diffusion.class_dropout / mix come from the diffusion config; older configs without them fall back to the
    model's class_dropout_prob and one draw per step."""
    plan = BatchPlan.from_config({"mode": "l", "group_size": 4, "p_group": 0.1, "class_dropout": 0.0, "mix": "micro"},
                                 {"num_classes": 1000, "class_dropout_prob": 0.1}, seed=3, accum=2)
    assert (plan.class_dropout_prob, plan.mix, plan.num_classes, plan.seed, plan.accum) == (0.0, "micro", 1000, 3, 2)
    old = BatchPlan.from_config({"mode": "l", "group_size": 4, "p_group": 0.1}, {"class_dropout_prob": 0.1})
    assert (old.class_dropout_prob, old.mix) == (0.1, "step")
    with pytest.raises(ValueError, match="mix 'x'"):
        BatchPlan("l", 4, mix="x")
    with pytest.raises(ValueError, match="accum=1 micro-batches"):
        BatchPlan("l", 4).micro(0, 0, 1)
