"""How ranks share a group: ParallelLayout owns the divisibility checks and the rank -> member mapping."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from gd.diffusion.plan import Shard, batch_layout
from gd.distributed.layout import ParallelLayout
from gd.sample import sample_layout


def test_rank_maps_to_its_replica_and_member_slice():
    layout = ParallelLayout.resolve(world=8, group_parallel=4, group_size=16)
    assert layout.replicas == 2 and layout.members == 4
    # Written out: rank 6 is replica 1, member rank 2, members 8..11 of every group.
    assert (layout.replica(6), layout.member_rank(6), layout.member_slice(6)) == (1, 2, slice(8, 12))
    assert [layout.member_slice(r).start for r in range(8)] == [0, 4, 8, 12, 0, 4, 8, 12]


def test_every_broken_rule_is_named_once_with_its_values():
    with pytest.raises(ValueError) as err:
        ParallelLayout.resolve(world=6, group_parallel=4, group_size=6, heads=6, impl="ulysses")
    msg = str(err.value)
    assert "group_parallel P=4 does not divide the 6 processes" in msg
    assert "group_size N=6 is not divisible by group_parallel P=4" in msg
    assert "num_heads=6 is not divisible by group_parallel P=4" in msg
    assert ParallelLayout.resolve(world=6, group_parallel=2, group_size=6, heads=6).replicas == 3
    with pytest.raises(ValueError, match="sample.group_parallel_impl='ring': expected one of ulysses, allgather"):
        ParallelLayout.resolve(world=2, group_parallel=2, impl="ring", section="sample")


def test_training_sampling_and_the_shard_refuse_P_not_dividing_N_alike():
    with pytest.raises(ValueError, match="diffusion.group_size=6 is not divisible by train.group_parallel=4"):
        batch_layout({"global_batch": 48, "micro_batch": 12, "group_parallel": 4}, 4, 6)
    s = OmegaConf.create({"group_parallel": 4, "group_size": 6})
    with pytest.raises(ValueError, match="sample.group_size=6 is not divisible by sample.group_parallel=4"):
        sample_layout(s, 4)
    with pytest.raises(ValueError, match="group_size N=6 is not divisible by group_parallel P=4"):
        Shard(4, 1).members(6)
