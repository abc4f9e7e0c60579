"""A tiny SiT for the benchmark tools' tests."""
from __future__ import annotations

from typing import Any

BENCH_ARGS = ["model=sit_s2", "model.input_size=8", "model.in_channels=1", "model.num_classes=10",
              "model.learn_sigma=false", "model.max_group_size=4", "bench.narrow={hidden_size: 32, num_heads: 2}",
              "model.depth=6", "bench.batch=8", "bench.steps=1", "bench.warmup=1",
              "train.weight_decay=0.01"]


def bench_cfg(*extra: str) -> Any:
    """conf/config.yaml with SiT-S/2 shrunk by ``bench.narrow`` to 32 wide, 6 deep, 8x8x1 latents."""
    from gd.bench.train import compose_bench

    return compose_bench([*BENCH_ARGS, *extra])
