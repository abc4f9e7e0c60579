"""A training callback for the world-size change test: gather the whole training state from the live engine and
save it on rank 0, right after the trainer has resumed or at the end of a given step (the state its checkpoint
holds), so runs on different world sizes can be compared.

The full tensors are assembled from each rank's own partition through DeepSpeed's hp mapping and an all-reduce, not
from checkpoint files: an independent path from gd.train.reshard, which writes those partitions."""
from __future__ import annotations

import torch
import torch.distributed as dist

from gd.train.callbacks import Callback


def _full(param: torch.nn.Parameter, flat: torch.Tensor) -> torch.Tensor:
    """``param``'s whole fp32 tensor from this rank's slice of the flat partition ``flat``, summed over ranks."""
    out = torch.zeros(param.numel(), dtype=torch.float32)
    mapping = param._hp_mapping
    if mapping is not None:
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        out.narrow(0, lp.start, lp.numel).copy_(flat.narrow(0, hp.start, hp.numel))
    dist.all_reduce(out)
    return out.view(param.shape)


class DumpState(Callback):
    """{"step", "module", "master", "exp_avg", "exp_avg_sq", "adam_step", "ema", "loaders"} to ``path`` (rank 0):
    on train start, or with ``at`` after step ``at``."""

    def __init__(self, path: str, at: int | None = None) -> None:
        self.path, self.at = path, at

    def on_train_start(self, trainer, step: int) -> None:
        if self.at is None:
            self._dump(trainer, step)

    def on_step_end(self, trainer, step: int) -> None:
        if step == self.at:
            self._dump(trainer, step)

    def _dump(self, trainer, step: int) -> None:
        engine, opt = trainer.engine, trainer.engine.optimizer
        flat = opt.single_partition_of_fp32_groups[0]
        state = opt.optimizer.state[flat]
        out = {"step": step, "module": {}, "master": {}, "exp_avg": {}, "exp_avg_sq": {},
               "adam_step": state["step"].clone(),
               "loaders": {k: v.state_dict() for k, v in trainer.data.loaders.items() if k != "queued"}}
        for name, p in engine.module.named_parameters():
            out["module"][name] = p.detach().float().clone()
            out["master"][name] = _full(p, flat)
            out["exp_avg"][name] = _full(p, state["exp_avg"])
            out["exp_avg_sq"][name] = _full(p, state["exp_avg_sq"])
        out["ema"] = trainer.ema.full_state()
        if trainer.dist.is_main:
            torch.save(out, self.path)
