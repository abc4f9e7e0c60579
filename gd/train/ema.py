"""fp32 exponential moving average of the model weights, sharded over ranks the way ZeRO-3 shards parameters.

Each rank keeps, for every parameter, the same slice ZeRO-3 would give it: ``chunk = ceil(numel / world)``
elements starting at ``rank * chunk`` (zero-padded). Under ZeRO-3 that slice *is* the parameter's local
partition (``param.ds_tensor``), so the update needs no communication and never materialises the full model;
under ZeRO 0-2 (replicated parameters) the slice is a view of the full parameter. Every rank therefore holds
1/world of the EMA, and :meth:`ShardedEMA.full_state` all-gathers it once for a checkpoint or the export.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedEMA:
    """``ema = decay * ema + (1 - decay) * param`` in fp32 over all of ``module``'s named parameters."""

    def __init__(self, module: torch.nn.Module, decay: float, zero3: bool = False,
                 rank_world: tuple[int, int] | None = None) -> None:
        """``rank_world`` overrides the process group's (rank, world size), e.g. to lay out shards in a test."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"train.ema_decay={decay}: expected a value in [0, 1]")
        self.decay = float(decay)
        self.zero3 = zero3
        self.rank, self.world = rank_world or _world()
        self.params = list(module.named_parameters())
        self.shapes = {name: tuple(p.ds_shape if zero3 else p.shape) for name, p in self.params}
        self.numels = {name: math.prod(shape) for name, shape in self.shapes.items()}
        self.chunks = {name: math.ceil(n / self.world) for name, n in self.numels.items()}
        offsets, total = {}, 0
        for name, _ in self.params:
            offsets[name] = total
            total += self.chunks[name]
        self.offsets = offsets
        device = self.params[0][1].device if self.params else torch.device("cpu")
        self.flat = torch.zeros(total, dtype=torch.float32, device=device)
        self._dst = [self.flat[offsets[n]:offsets[n] + self._local_len(n)] for n, _ in self.params]
        self.copy_from_model()

    def _local_len(self, name: str) -> int:
        return max(0, min(self.chunks[name], self.numels[name] - self.rank * self.chunks[name]))

    def _sources(self) -> list[Tensor]:
        out = []
        for (name, p), dst in zip(self.params, self._dst):
            if self.zero3:
                src = p.ds_tensor.view(-1)[:dst.numel()]
            else:
                start = self.rank * self.chunks[name]
                src = p.detach().reshape(-1)[start:start + dst.numel()]
            out.append(src if src.dtype == torch.float32 else src.float())
        return out

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Set the EMA to the current weights (decay 0), as at the start of training."""
        torch._foreach_copy_(self._dst, self._sources())

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the current weights; call after each applied optimizer step."""
        torch._foreach_lerp_(self._dst, self._sources(), 1.0 - self.decay)

    def local_state(self) -> Tensor:
        return self.flat

    @torch.no_grad()
    def full_state(self) -> dict[str, Tensor]:
        """The consolidated EMA as a flat fp32 CPU state dict (collective: every rank must call it)."""
        if self.world == 1:
            gathered = self.flat.unsqueeze(0)
        else:
            gathered = torch.empty(self.world * self.flat.numel(), dtype=self.flat.dtype, device=self.flat.device)
            dist.all_gather_into_tensor(gathered, self.flat)
            gathered = gathered.view(self.world, -1)
        state = {}
        for name, _ in self.params:
            off, chunk = self.offsets[name], self.chunks[name]
            full = gathered[:, off:off + chunk].reshape(-1)[:self.numels[name]]
            state[name] = full.reshape(self.shapes[name]).cpu().clone()
        return state

    @torch.no_grad()
    def load_full_state(self, state: Mapping[str, Tensor]) -> None:
        """Take this rank's slice of a consolidated EMA state dict (any world size wrote it)."""
        names = [n for n, _ in self.params]
        missing = [n for n in names if n not in state]
        unexpected = [n for n in state if n not in self.shapes]
        wrong = [f"{n}: {tuple(state[n].shape)} vs {self.shapes[n]}" for n in names
                 if n in state and tuple(state[n].shape) != self.shapes[n]]
        if missing or unexpected or wrong:
            raise ValueError(f"EMA state does not fit the model: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}, shape mismatches {wrong[:5]}")
        for name, dst in zip(names, self._dst):
            start = self.rank * self.chunks[name]
            dst.copy_(state[name].reshape(-1)[start:start + dst.numel()].to(dst.device, torch.float32))
