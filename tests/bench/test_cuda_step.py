"""The trainer's step on a GPU (run there by gd.bench.gpu_check's tests part): DeepSpeed bf16 on CUDA with NCCL,
and engine.compile() with inductor's CUDA kernels, which no CPU test can reach."""
from __future__ import annotations

import math

import pytest
import torch

from gd.bench import train as bench
from gd.bench.step_cost import PHASES, _narrowed, count_syncs
from tests.bench.conftest import bench_cfg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _losses(step: bench.Step, steps: int = 3) -> list[float]:
    out = []
    for _ in range(steps):
        loss = step.forward()
        out.append(float(loss.detach()))
        step.backward(loss)
        step.update()
    return out


def test_deepspeed_bf16_step_compiled_matches_eager_on_cuda():
    """ZeRO-2 bf16 (bf16 weights, fp32 masters) with group steps of N=4, eager and compiled: finite losses that
    agree to bf16 precision, one compiled region per forward and the eager step's host syncs. Catches: a dtype
    mismatch between fp32 and bf16 parts of the model under DeepSpeed bf16, NCCL or compile failing on the device,
    compile adding a sync or breaking the graph there."""
    device = bench.bench_device()
    assert device.type == "cuda"
    cfg = _narrowed(bench_cfg("model.depth=2"))
    runs = {}
    for compile_ in (False, True):
        step = bench.build_step(cfg, {"mode": "engine", "variant": "z2", "n": 4, "compile": compile_}, device)
        runs[compile_] = (_losses(step), count_syncs(step, 1))
        del step
    (eager, eager_syncs), (compiled, compiled_syncs) = runs[False], runs[True]
    assert all(math.isfinite(v) for v in eager + compiled)
    assert compiled == pytest.approx(eager, rel=3e-2)
    assert [compiled_syncs[p]["syncs"] for p in PHASES] == [eager_syncs[p]["syncs"] for p in PHASES]
    assert compiled_syncs["forward"]["regions"] == 1


def test_autocast_step_on_cuda():
    """ZeRO-0 bf16_autocast (the one-GPU engine) and the plain step run on CUDA with finite losses (random data:
    nothing more to compare). Catches: autocast or the fused CUDA AdamW failing under the engine."""
    device = bench.bench_device()
    cfg = _narrowed(bench_cfg("model.depth=2"))
    for spec in ({"mode": "engine", "variant": "z0_autocast", "n": 1, "compile": False},
                 {"mode": "reference", "variant": "-", "n": 4, "compile": False}):
        step = bench.build_step(cfg, spec, device)
        assert all(math.isfinite(v) for v in _losses(step)), spec
