"""The trainer with diffusion.objective=ddpm (DiT): a tiny DiT-shaped SiT (learn_sigma, 2C output channels) trained
through the real Trainer, in-process DeepSpeed on one CPU process, on Fashion-MNIST shards with GroupDiff-l."""
from __future__ import annotations

import gc
import json
import math

import pytest
import torch

from gd.train.checkpoint import CheckpointMismatchError
from tests.train.conftest import clean_streaming_shm, overrides

DIT = ["diffusion=ddpm_groupdiff_l", "diffusion.group_size=4", "diffusion.p_group=0.5", "model.learn_sigma=true",
       "train.global_batch=16", "train.micro_batch=8", "train.ckpt_every=100"]


def compose(*args: str):
    from gd.train.__main__ import compose_config

    return compose_config(list(args))


def _losses(run) -> list[dict]:
    return [r for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _free(shards) -> None:
    gc.collect()
    clean_streaming_shm(shards)


@pytest.mark.slow
def test_ddpm_objective_trains_through_the_trainer(fm_shards, tmp_path):
    """What the model receives on every micro-batch (recorded at its input) and what the loss does over 40 steps:
    DDPM integer timesteps in [0, 999], a group's within 2 sigma_tv = 100 steps of each other, full_output=True
    (the learned variance is trained), group micro-batches at N = 4 with null labels; the hybrid loss falls (mean
    of the first 5 steps vs the last 5; measured 0.96 -> 0.23 on a 2-core CPU) and both per-kind losses are
    logged, and S_cross is probed at the DDPM step of signal-to-noise ratio 1 (index 258). Catches the trainer
    running the flow loss (float t in [0, 1], 4 output channels), sigma_tv taken as
    flow time, and a model fed respaced or fractional time."""
    from gd.train.trainer import Trainer

    run = tmp_path / "run"
    cfg = compose(*overrides(fm_shards, run, *DIT, "train.steps=40", "diffusion.sigma_tv=50",
                             "train.s_cross_every=20"))
    trainer = Trainer(cfg)
    seen = []
    hook = trainer.model.register_forward_pre_hook(
        lambda m, args, kw: seen.append((args[1].detach().clone(), args[2].clone(), kw["group_size"],
                                         kw.get("full_output"))), with_kwargs=True)
    trainer.train()
    hook.remove()
    _free(fm_shards)
    probes = [(t, n) for t, _, n, full in seen if full is None]  # the S_cross probe's forwards
    seen = [call for call in seen if call[3] is not None]
    assert len(seen) == 80 and probes and all(n == 4 and torch.all(t == 258) for t, n in probes)
    for t, y, n, full in seen:
        assert full is True and t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= 999
        groups = t.view(-1, n)
        assert int((groups.max(1).values - groups.min(1).values).max()) <= 100
        if n == 4:
            assert torch.all(y == cfg.model.num_classes)
    assert {n for _, _, n, _ in seen} == {1, 4}
    assert len({int(v) for t, *_ in seen for v in t}) > 60  # t spread over the schedule, not a constant
    recs = _losses(run)
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert any("loss_cond" in r for r in recs) and any("loss_group" in r for r in recs)
    scores = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "s_cross" in line]
    assert [r["step"] for r in scores] == [20, 40] and all(0.0 <= r["s_cross"] <= 1.0 for r in scores)
    exported = torch.load(run / "ema.pt", weights_only=True)
    assert exported["objective"] == "ddpm" and exported["config"]["learn_sigma"] is True
    assert exported["model"]["final_layer.linear.weight"].shape[0] == 2 * 2 * 2  # 2C channels, patch 2


@pytest.mark.slow
def test_ddpm_run_resumes_bitwise_and_refuses_the_flow_objective(fm_shards, tmp_path):
    """A ddpm run stopped after 3 of 6 steps and resumed ends with the same per-step losses and the same EMA bytes
    as the uninterrupted run (t, noise and slots come from the micro-batch's seeded generator, in that order).
    Resuming its checkpoint with diffusion.objective=flow is refused before any work. Catches DDPM draws from the
    global RNG, and a flow config silently continuing a DDPM checkpoint (or the reverse)."""
    from gd.train import train

    steps = ["train.steps=6", "diffusion.sigma_tv=20"]
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    train(compose(*overrides(fm_shards, ref, *DIT, *steps)))
    _free(fm_shards)
    polls = iter(range(100))
    result = train(compose(*overrides(fm_shards, stopped, *DIT, *steps)), stop_requested=lambda: next(polls) >= 2)
    _free(fm_shards)
    assert result["preempted"] and result["step"] == 3

    flow = compose(*overrides(fm_shards, stopped, *[a for a in DIT if not a.startswith("diffusion=")],
                              "train.steps=6"))
    with pytest.raises(CheckpointMismatchError, match="trained with diffusion.objective=ddpm, this run has flow"):
        train(flow)

    result = train(compose(*overrides(fm_shards, stopped, *DIT, *steps)))
    _free(fm_shards)
    assert result["step"] == 6 and math.isfinite(result["loss"])
    assert [r["loss"] for r in _losses(stopped)] == [r["loss"] for r in _losses(ref)]
    a = torch.load(ref / "ema.pt", weights_only=True)["model"]
    b = torch.load(stopped / "ema.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_bench_steps_run_the_ddpm_objective(capsys):
    """gd.bench.train with diffusion=ddpm_groupdiff_l: the plain-torch reference step and the trainer's engine step
    both run the DDPM loss (a flow loss on the 2C-channel call, or the DDPM loss without full_output, would end in an
    error row without img/s)."""
    from pathlib import Path

    from gd.bench.train import main

    args = [a for a in overrides(Path("unused"), Path("unused")) if not a.startswith("diffusion")]
    main([*args, "diffusion=ddpm_groupdiff_l", "model.learn_sigma=true", "bench.isolate=false", "bench.steps=2",
          "bench.warmup=1", "bench.batch=8", "bench.group_sizes=[4]", "bench.compile=[false]",
          "bench.variants=[z2_fp32]"])
    table = capsys.readouterr().out.split("| mode |")[-1].strip().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in table] == ["reference", "engine"]
    for row in table:
        assert float(row.split("|")[5]) > 0, row
