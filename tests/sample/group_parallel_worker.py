"""Spawned worker for test_group_parallel_sample: every rank runs gd.sample's generate for each case of
``out/cases.json`` ({name: hydra overrides}) with train-free, float64, randomised tiny SiT weights, under a gloo
process group on a FileStore (no ports)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


def tiny_model() -> torch.nn.Module:
    """A float64 SiT with every weight random (adaLN-Zero's zero init would make the output 0): in float64 the
    split model's rounding differs from the whole model's far below the float32 the sampler integrates in."""
    from gd.models import build_model
    from tests.models.conftest import randomize

    model = build_model("SiT-S/2", input_size=8, in_channels=1, num_classes=10, hidden_size=64, depth=2, num_heads=4,
                        max_group_size=4, learn_sigma=False)
    return randomize(model, seed=3, std=0.1).double()


def run(rank: int, world: int, store: str, out: str) -> None:
    from tests.sample.conftest import compose_cfg

    from gd.sample import generate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        for name, overrides in json.loads((Path(out) / "cases.json").read_text()).items():
            generate(compose_cfg(overrides), rank, world, model=tiny_model())
    finally:
        dist.destroy_process_group()
