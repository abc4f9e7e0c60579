"""The trainer's step under ``train.compile`` (DeepSpeed's engine.compile(), inductor on this CPU) against the same
step eager: same losses, weights and EMA, and no host sync added; ``train.compile_mode`` reaches torch.compile."""
from __future__ import annotations

import gc

import pytest
import torch

from gd.bench import train as bench
from gd.bench.step_cost import PHASES, _narrowed, count_syncs
from tests.bench.conftest import bench_cfg


def _run(cfg, spec: dict, device: torch.device, steps: int = 3) -> dict:
    """``steps`` steps of the spec's step (fp32, fused AdamW as on CUDA), then its state and one step's syncs."""
    step = bench.build_step(cfg, spec, device, fused=True, autocast=False)
    losses = []
    for _ in range(steps):
        loss = step.forward()
        losses.append(float(loss.detach()))
        step.backward(loss)
        step.update()
    trainer = step.keep
    weights = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    ema = {n: t.clone() for n, t in trainer.ema.full_state().items()}
    syncs = count_syncs(step, 1)
    del step, trainer
    gc.collect()
    return {"losses": losses, "weights": weights, "ema": ema, "syncs": syncs}


@pytest.mark.slow
@pytest.mark.long
def test_compiled_trainer_step_equals_eager_and_adds_no_host_sync():
    """ZeRO-2 (fp32 on this CPU) with group steps of N=4: forward (group loss, slots drawn from the step's
    generator), backward with the step's read-back, GuardedAdamW and the EMA. Catches: compile changing the
    numbers (a captured random draw, a dropped EMA or weight-decay update), a graph break in the model (more than
    one compiled region per forward), a host read that compile adds (an .item() at a graph break)."""
    device = bench.bench_device()
    cfg = _narrowed(bench_cfg("model.depth=2"))
    runs = {c: _run(cfg, {"mode": "engine", "variant": "z2_fp32", "n": 4, "compile": c}, device)
            for c in (False, True)}
    eager, compiled = runs[False], runs[True]
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    for name, weight in eager["weights"].items():
        torch.testing.assert_close(compiled["weights"][name], weight, rtol=1e-5, atol=1e-6)
    for name, value in eager["ema"].items():
        torch.testing.assert_close(compiled["ema"][name], value, rtol=1e-5, atol=1e-6)
    for phase in PHASES:
        assert compiled["syncs"][phase]["syncs"] == eager["syncs"][phase]["syncs"], phase
        assert eager["syncs"][phase]["regions"] == 0
    assert [compiled["syncs"][p]["syncs"] for p in PHASES] == [0, 1, 1]  # the loss read-back, the clip/skip read
    assert compiled["syncs"]["forward"]["regions"] == 1


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """``train.compile_mode`` is passed to torch.compile by the engine and by the plain reference step, and a mode
    torch does not know is refused before anything is built. Catches: the flag silently ignored (a CUDA-graphs row
    that measures the default compile)."""
    from gd.diffusion.plan import batch_layout
    from gd.train.engine import build_engine, deepspeed_config

    seen = []
    real = torch.compile

    def spy(*args, **kwargs):
        seen.append(kwargs.get("mode"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    device = bench.bench_device()
    cfg = _narrowed(bench_cfg("model.depth=1", "train.compile_mode=reduce-overhead"))
    bench.reference_step(cfg, 1, True, device, fused=True, autocast=False)
    t = {"zero_stage": 0, "precision": "fp32", "global_batch": 8, "micro_batch": 8, "lr": 1e-3, "compile": True,
         "compile_mode": "max-autotune-no-cudagraphs"}
    build_engine(bench._build(cfg), t, batch_layout(t, 1), device)
    assert seen == ["reduce-overhead", "max-autotune-no-cudagraphs"]
    with pytest.raises(ValueError, match="train.compile_mode='fastest'"):
        deepspeed_config({**t, "compile_mode": "fastest"}, batch_layout(t, 1))
