"""Group parallelism in the batch plan (gd.diffusion.plan): the layout check with train.group_parallel, the replica
every decision and draw belongs to, a rank's rows of the replica's batch (Shard) and the loss normalisation of both
objectives, each against an explicit construction."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from gd.diffusion import ddpm
from gd.diffusion.objective import group_loss
from gd.diffusion.plan import BatchPlan, Shard, batch_layout


def _layout(world: int, n: int, micro: int, p: int, global_batch: int = 256):
    return batch_layout({"global_batch": global_batch, "micro_batch": micro, "group_parallel": p}, world, n)


def test_groupdiff16_on_32_ranks_needs_two_ranks_per_group():
    """The paper's batch 256 at N=16 has 16 groups per step: 32 ranks are refused without group parallelism, with
    the message naming train.group_parallel=2, and accepted with it (16 replicas of 16 images, 8 members per rank).
    Catches a layout check that still counts ranks instead of replicas, or a refusal that does not say what fixes
    it."""
    with pytest.raises(ValueError) as err:
        _layout(32, 16, 8, 1)
    assert "only 16 groups" in str(err.value) and "set train.group_parallel=2" in str(err.value)
    layout = _layout(32, 16, 8, 2)
    assert (layout.replicas, layout.replica_batch, layout.grad_accum, layout.group_parallel) == (16, 16, 1, 2)
    assert _layout(32, 64, 16, 8, 512).replicas == 4  # N=64: 8 groups of 64 at batch 512, 8 members per rank


@pytest.mark.parametrize("world,n,micro,p,needle", [
    (8, 4, 8, 3, "diffusion.group_size=4 is not divisible by train.group_parallel=3"),
    (6, 4, 8, 4, "train.group_parallel=4 does not divide the 6 processes"),
    (8, 1, 32, 2, "diffusion.group_size=1 is not divisible by train.group_parallel=2"),
    (8, 16, 4, 2, "train.micro_batch=4 images is not divisible by diffusion.group_size=16 / train.group_parallel=2 = "
                  "8 members per rank"),
    (64, 16, 4, 2, "32 replicas but train.global_batch=256 holds only 16 groups"),
    (4, 4, 8, 0, "train.group_parallel=0: expected a positive integer"),
])
def test_layout_refusals_name_p(world, n, micro, p, needle):
    """Each impossible split is refused with the offending values (N and P, the world and P, the micro batch and
    N/P, replicas and groups)."""
    with pytest.raises(ValueError) as err:
        _layout(world, n, micro, p)
    assert needle in str(err.value)


def test_ranks_of_a_replica_share_the_plan_labels_and_draws():
    """With P=2, ranks 2k and 2k+1 get replica k's plan: the kind of every micro-batch (mix="micro" draws it per
    replica), the dropped labels and the generator are those rank k gets without group parallelism. Catches the
    released recipe's per-rank draw leaking through (the two ranks of a group would run different kinds and their
    collectives would not pair up) and draws seeded by the rank (the members of one group would get unrelated
    noise)."""
    kw = dict(mode="l", group_size=4, p_group=0.3, class_dropout_prob=0.4, num_classes=10, seed=3, mix="micro",
              accum=2)
    one, two = BatchPlan(**kw), BatchPlan(**kw, group_parallel=2)
    y = torch.arange(16) % 10
    for step in range(40):
        assert np.array_equal(two.group_micro_batches(step, 8), np.repeat(one.group_micro_batches(step, 4), 2, 0))
        for rank in range(8):
            for micro in range(2):
                assert two.micro(step, rank, micro) == one.micro(step, rank // 2, micro)
                assert torch.equal(two.labels(step, y, rank, micro), one.labels(step, y, rank // 2, micro))
                a, b = two.generator(step, rank, micro), one.generator(step, rank // 2, micro)
                assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    kinds = [one.micro(s, r, 0).is_group for s in range(40) for r in range(4)]
    assert len({tuple(kinds[r::4]) for r in range(4)}) > 1  # replicas do differ: the test is not vacuous


def _explicit_rows(batch: int, n: int, p: int, r: int) -> list[int]:
    if n == 1:
        per = batch // p
        return list(range(r * per, (r + 1) * per))
    m = n // p
    return [g * n + r * m + i for g in range(batch // n) for i in range(m)]


@pytest.mark.parametrize("n,p", [(4, 2), (8, 4), (4, 4), (1, 2), (1, 4)])
def test_shard_takes_members_of_every_group_or_a_contiguous_part(n, p):
    """Rank r's rows: members r*N/P .. (r+1)*N/P - 1 of every group (the layout gd.models.group_parallel computes),
    or the r-th contiguous part of single images; the P ranks' rows partition the batch."""
    batch = 3 * n * p
    x = torch.arange(batch * 2).view(batch, 2)
    seen = []
    for r in range(p):
        rows = _explicit_rows(batch, n, p, r)
        assert torch.equal(Shard(p, r).take(x, n), x[rows])
        seen += rows
    assert sorted(seen) == list(range(batch))
    assert torch.equal(Shard().take(x, n), x)


def _toy_model(x, t, y, group_size, **kwargs):
    """A per-image 'velocity' (no interaction between images), so a rank's rows compute exactly what they compute
    in the whole batch."""
    return torch.sin(x) * t.view(-1, 1, 1, 1) + 0.1 * y.view(-1, 1, 1, 1).to(x.dtype)


@pytest.mark.parametrize("reduction", ["mean", "group_sum"])
@pytest.mark.parametrize("n", [4, 1])
def test_flow_loss_of_the_ranks_adds_up_to_p_times_the_replicas(reduction, n):
    """The P ranks' losses add up to P times the unsplit loss (to fp32 rounding: the flow objective reduces in
    fp32), each rank's per-image MSE is its rows of the unsplit one, and the times (sigma_tv window, drawn per
    group) and noise are the replica's. Catches draws at the rank's shape (other times and noise), a per-group sum
    left unscaled by P (ZeRO would give 1/P of the gradient) and a mean scaled when it should not be."""
    p, groups = 2, 3
    x = torch.randn(groups * 4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(groups * 4) % 10

    def gen():
        return torch.Generator().manual_seed(11)

    kw = dict(sigma_tv=0.2, reduction=reduction)
    whole, per_image = group_loss(_toy_model, x, y, n, generator=gen(), **kw)
    parts = [group_loss(_toy_model, x, y, n, generator=gen(), shard=Shard(p, r), **kw) for r in range(p)]
    assert sum(float(loss) for loss, _ in parts) == pytest.approx(p * float(whole), rel=1e-6)
    for r, (_, mine) in enumerate(parts):
        assert torch.equal(mine, per_image[_explicit_rows(len(x), n, p, r)])
    expected = per_image.double().mean() if reduction == "mean" else per_image.double().view(-1, n).sum(1).mean()
    assert float(whole) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "group_sum"])
def test_ddpm_loss_of_the_ranks_adds_up_to_p_times_the_replicas(reduction):
    """The same contract for the DDPM objective (integer t spread per group, learned variance terms)."""
    diffusion = ddpm.build_ddpm(num_timesteps=1000, learn_sigma=True)
    p, n = 2, 4
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10

    def model(x, t, y, group_size):
        return torch.cat([torch.tanh(x) * (t.view(-1, 1, 1, 1) / 1000.0), 0.1 * torch.cos(x)], dim=1)

    run = functools.partial(ddpm.group_loss, diffusion, model, x, y, n, spread=50, reduction=reduction)
    whole, terms = run(generator=torch.Generator().manual_seed(5))
    parts = [run(generator=torch.Generator().manual_seed(5), shard=Shard(p, r)) for r in range(p)]
    assert sum(float(loss) for loss, _ in parts) == pytest.approx(p * float(whole), rel=1e-12)
    for r, (_, mine) in enumerate(parts):
        assert torch.allclose(mine.loss, terms.loss[_explicit_rows(8, n, p, r)], rtol=1e-12, atol=0)
