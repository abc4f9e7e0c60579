"""The batch plan: group-step frequency, exact repetition from a seed, labels per mode."""
from __future__ import annotations

import math

import pytest
import torch

from gd.diffusion import BatchPlan

STEPS = 20000


def _plan(mode: str = "l", p: float = 0.1, drop: float = 0.1, seed: int = 0, n: int = 4) -> BatchPlan:
    return BatchPlan(mode, group_size=n, p_group=p, class_dropout_prob=drop, num_classes=10, seed=seed)


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
