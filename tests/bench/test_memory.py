"""gd.bench.memory: the fake-tensor peak equals a real run's, and the state is what AdamW + EMA must hold."""
from __future__ import annotations

import pytest

from gd.bench.memory import measure
from gd.bench.step_cost import _narrowed
from gd.bench.train import _build
from tests.bench.conftest import bench_cfg


def test_fake_peak_equals_real_peak_and_holds_the_optimizer_state():
    from gd.train.engine import init_distributed

    device = init_distributed().device
    # The real run uses the same batch and latents as the fake one, so both peaks must agree.
    cfg = _narrowed(bench_cfg("bench.memory_batch=8", "bench.memory_input_size=8"))
    row = measure(cfg, {"mode": "reference", "variant": "-", "n": 4, "compile": False}, device)
    assert not row["error"], row["error"]
    assert row["full"] == pytest.approx(row["small"], rel=0.01)
    params = sum(p.numel() for p in _build(cfg).parameters())
    # fp32 weights, gradients, Adam's two moments and the EMA: 20 bytes per parameter, plus activations.
    assert 20 * params <= row["small"] <= 20 * params + 8 * 2**20
    bad = measure(bench_cfg("bench.memory_batch=6"), {"mode": "reference", "variant": "-", "n": 4,
                                                             "compile": False}, device)
    assert "memory_batch=6 is not a multiple of N=4" in bad["error"]


def test_fake_peak_of_the_ddpm_objective_equals_real_peak():
    """The DDPM loss (diffusion=ddpm_groupdiff_l, 2C output channels) runs under FakeTensorMode, its schedule built
    outside it, and the fake peak matches the real one up to that schedule (float64 tables of T = 1000 steps, ~0.1 MB,
    which the real run allocates inside the tracker). Catches a DDPM loss that reads tensor values (a fake run
    cannot) or a schedule built from fake tensors."""
    from gd.train.engine import init_distributed

    device = init_distributed().device
    cfg = _narrowed(bench_cfg("bench.memory_batch=8", "bench.memory_input_size=8", "diffusion=ddpm_groupdiff_l",
                              "model.learn_sigma=true"))
    row = measure(cfg, {"mode": "reference", "variant": "-", "n": 4, "compile": False}, device)
    assert not row["error"], row["error"]
    tables = 16 * 1000 * 8
    assert row["full"] <= row["small"] <= row["full"] + tables
