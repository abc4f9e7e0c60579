"""Resuming on another world size (gd.train.reshard) with real DeepSpeed ZeRO-2 on 2 and 1 CPU processes: 2 -> 1 and
1 -> 2 ranks must resume with exactly the state the same checkpoint gives on its own world size; what cannot be
carried over is refused, by the trainer and at launch."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gd.train.reshard import reshard_problems
from tests.train.conftest import clean_streaming_shm, overrides, torchrun, wait

RUN = ["train.ckpt_every=4", "train.keep_last=4"]


def _run(fm_shards: Path, run: Path, ranks: int, steps: int, log: Path, **dumps: int | None) -> None:
    """Train (or resume) ``run`` on ``ranks`` processes to ``steps``, dumping the state to each ``<name>.pt`` beside
    the run dir: at the resume (None) or after the given step."""
    nodes = ",".join(f"{{_target_:tests.train.reshard_worker.DumpState,path:{run.parent / name}.pt"
                     + ("" if at is None else f",at:{at}") + "}" for name, at in dumps.items())
    proc = torchrun(overrides(fm_shards, run, *RUN, f"train.steps={steps}", f"train.callbacks=[{nodes}]"), log,
                    nproc=ranks)
    assert wait(proc, log) == 0, log.read_text()[-3000:]
    clean_streaming_shm(fm_shards)


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_same(got: dict, want: dict) -> None:
    assert got["step"] == want["step"] and torch.equal(got["adam_step"], want["adam_step"])
    assert got["loaders"] == want["loaders"]
    for key in ("module", "master", "exp_avg", "exp_avg_sq", "ema"):
        assert got[key].keys() == want[key].keys()
        different = [n for n in want[key] if not torch.equal(got[key][n], want[key][n])]
        assert not different, f"{key}: {len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
@pytest.mark.long
def test_world_size_change_resumes_the_exact_state(fm_shards, tmp_path):
    """Fails before the fix: a checkpoint of 2 ranks was refused on 1 ("resume with the same world size"), and
    DeepSpeed itself refuses ZeRO partitions written by another world size. Now 2 -> 1 and 1 -> 2 resume with bit
    for bit the masters, Adam moments and step, module weights, EMA and stream positions the writing run had when it
    saved (three launches: 2 ranks to step 4, then 1 rank to step 8, then 2 ranks to step 10)."""
    two, one = tmp_path / "two", tmp_path / "one"
    _run(fm_shards, two, 2, 4, tmp_path / "two.log", saved2=4)           # checkpoint at step 4 on 2 ranks
    shutil.copytree(two, one, symlinks=True)
    _run(fm_shards, one, 1, 8, tmp_path / "one.log", resumed1=None, saved1=8)
    assert "re-split over 1 ranks" in (tmp_path / "one.log").read_text()
    saved2, resumed1 = _load(tmp_path / "saved2.pt"), _load(tmp_path / "resumed1.pt")
    _assert_same(resumed1, saved2)
    assert saved2["adam_step"].item() == 4 and saved2["loaders"]["plain"]["sample_in_epoch"] > 0
    steps = [json.loads(line)["step"] for line in (one / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]

    # 1 -> 2: the one-rank run went on to step 8 and checkpointed there.
    _run(fm_shards, one, 2, 10, tmp_path / "back.log", resumed2=None)
    saved1, resumed2 = _load(tmp_path / "saved1.pt"), _load(tmp_path / "resumed2.pt")
    _assert_same(resumed2, saved1)
    assert saved1["step"] == 8 and saved1["adam_step"].item() == 8
    assert (one / "checkpoints" / "step_00000010").is_dir()


SAVED = {"world_size": 2, "step": 6, "zero_stage": 2, "precision": "fp32", "micro_batch": 8, "global_batch": 16}
TRAIN = {"zero_stage": 2, "precision": "fp32"}


def test_what_cannot_change_world_size_is_refused() -> None:
    """Fails if a checkpoint were carried over where the state is not exact: ZeRO-3 and ZeRO-1 bf16 (other partition
    layouts), changed stage or precision, or a step inside a block of the batch plan (batches read ahead per rank)."""
    assert reshard_problems(SAVED, 2, TRAIN, 4, 1) == []                           # same world size
    assert reshard_problems({**SAVED, "step": 8}, 1, TRAIN, 4, 2) == []
    inside = reshard_problems(SAVED, 1, TRAIN, 4, 2)                                 # 6 * 1 % 4 != 0
    assert len(inside) == 1 and "step 6 is inside a block" in inside[0] and "multiple of 4 steps" in inside[0]
    assert reshard_problems(SAVED, 1, TRAIN, None, 2) == []                          # diffusion.mix=step
    z3 = reshard_problems({**SAVED, "step": 8, "zero_stage": 3}, 1, {**TRAIN, "zero_stage": 3}, 4, 2)
    assert len(z3) == 1 and "train.zero_stage=3" in z3[0]
    bf16 = reshard_problems({**SAVED, "step": 8, "zero_stage": 1, "precision": "bf16"}, 1,
                            {"zero_stage": 1, "precision": "bf16"}, 4, 2)
    assert len(bf16) == 1 and "ZeRO-1" not in bf16[0] and "train.zero_stage=1 train.precision=bf16" in bf16[0]
    changed = reshard_problems({**SAVED, "step": 8}, 1, {**TRAIN, "precision": "bf16"}, 4, 2)
    assert "written with train.zero_stage=2 train.precision=fp32" in changed[0]
