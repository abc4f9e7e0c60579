"""torchrun worker for test_distributed.test_bf16_ema_shards_gather_fp32_masters: under DeepSpeed bf16 with ZeRO-1/2/3
on 2 ranks, an EMA with decay 0 gathered to rank 0 equals the full fp32 master weights bit for bit."""
from __future__ import annotations

import gc
import sys
from typing import Any

import torch
from deepspeed.utils import safe_get_full_fp32_param

from gd.models import build_model
from gd.train.ema import ShardedEMA
from gd.diffusion.plan import batch_layout
from gd.train.engine import build_engine, init_distributed


def bf16_engine_with_ema(stage: int, weight_decay: float = 0.0) -> tuple[Any, ShardedEMA]:
    """A tiny SiT under DeepSpeed bf16 ZeRO-``stage`` (micro batch 4 per rank) and an EMA with decay 0, after two
    training steps: the EMA must then equal the optimizer's fp32 masters exactly."""
    d = init_distributed()
    torch.manual_seed(0)
    model = build_model("SiT-S/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False, hidden_size=32,
                        depth=1, num_heads=2, max_group_size=4)
    t = {"zero_stage": stage, "precision": "bf16", "global_batch": 4 * d.world_size, "micro_batch": 4, "lr": 1e-3,
         "weight_decay": weight_decay, "grad_clip": 0.0}
    engine, _ = build_engine(model, t, batch_layout(t, d.world_size), d.device)
    ema = ShardedEMA(engine.module, 0.0, zero3=stage == 3, optimizer=engine.optimizer)
    gen = torch.Generator().manual_seed(1 + d.rank)
    for _ in range(2):
        x = torch.randn(4, 1, 8, 8, generator=gen).to(torch.bfloat16)
        out = engine(x, torch.rand(4, generator=gen), torch.randint(0, 10, (4,), generator=gen))
        engine.backward((out.float() - x.float()).pow(2).mean())
        engine.step()
        ema.update()
    return engine, ema


def main() -> int:
    d = init_distributed()
    for stage in (1, 2, 3):
        engine, ema = bf16_engine_with_ema(stage, weight_decay=0.01)
        masters = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
        state = ema.full_state()
        if d.rank == 0:
            equal = all(torch.equal(state[n], m.view(state[n].shape)) for n, m in masters.items())
            off_grid = sum(int((m.bfloat16().float() != m).sum()) for m in masters.values())
            print(f"stage {stage}: source={ema.source} equal={equal} off_grid={off_grid}", flush=True)
        elif state is not None:
            print(f"stage {stage}: rank {d.rank} received the consolidated EMA", flush=True)
            return 1
        del engine, ema
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
