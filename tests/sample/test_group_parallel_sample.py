"""Sampling with group parallelism (sample.group_parallel): 4 spawned gloo ranks = 2 replicas x P=2, each rank
running the model on 2 of every group's 4 members, must write the files one process writes, byte for byte."""
from __future__ import annotations

import json

import pytest

from gd.sample import generate
from tests.models.test_group_parallel import spawn
from tests.sample.conftest import compose_cfg, sample_overrides
from tests.sample.group_parallel_worker import tiny_model
from tests.sample.test_sample import tree_bytes

# GroupDiff-l with CFG on an interval (conditional branch at group size 1 on each rank's members, unconditional at
# N=4 across the ranks) with the SDE's noise; GroupDiff-f (both branches in one batch of 2G groups) with dopri5,
# whose adaptive steps every rank must take alike or its collectives would not pair up.
CASES = {"sde_l": dict(mode="l", method="sde", cfg_interval="[0.2,0.9]"),
         "dopri5_f": dict(mode="f", method="dopri5", cfg_scale=1.5, atol=1e-3, rtol=1e-2)}


def _overrides(out, name: str, **extra) -> list[str]:
    return sample_overrides("unused.pt", out / name, num_images=40, batch_groups=2, **CASES[name], **extra)


@pytest.mark.slow
def test_p2_writes_the_bytes_of_one_process(tmp_path):
    """Every output file (chunks, PNG tars, samples.npz, grid, settings) equals the single-process run's bytes.
    Catches a rank integrating only its members (its SDE noise or dopri5 steps would differ from one process's),
    slots or noise drawn per rank, members gathered in the wrong order, a chunk written by both ranks of a replica
    or by none, and chunks assigned per rank instead of per replica (some missing: rank 0 would wait forever)."""
    one, split = tmp_path / "one", tmp_path / "split"
    for name in CASES:
        generate(compose_cfg(_overrides(one, name)), 0, 1, model=tiny_model())
    (split / "cases.json").parent.mkdir()
    (split / "cases.json").write_text(json.dumps({n: _overrides(split, n, group_parallel=2) for n in CASES}))
    from tests.sample.group_parallel_worker import run

    spawn(run, 4, split)
    for name in CASES:
        a, b = tree_bytes(one / name), tree_bytes(split / name)
        assert sorted(a) == sorted(b) and len(a) > 10, name
        assert [k for k in a if a[k] != b[k]] == [], name


@pytest.mark.parametrize("extra,needle", [
    (dict(group_parallel=3), "sample.group_size=4 is not divisible by sample.group_parallel=3"),
    (dict(group_parallel=2, mode="none", group_size=1),
     "sample.group_size=1 is not divisible by sample.group_parallel=2"),
    (dict(group_parallel=4), "sample.group_parallel=4 does not divide the 2 processes"),
])
def test_refusals_before_any_work(tmp_path, extra, needle):
    """N not divisible by P, plain sampling (nothing to share) and a world P does not divide are refused naming the
    values, before a model is loaded (the checkpoint does not exist) or the output folder made."""
    cfg = compose_cfg(sample_overrides(tmp_path / "missing.pt", tmp_path / "out", **extra))
    with pytest.raises(ValueError, match=needle):
        generate(cfg, 0, 2)
    assert not (tmp_path / "out").exists()
