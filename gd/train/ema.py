"""fp32 exponential moving average of the fp32 master weights, sharded over ranks.

Each rank averages only the elements whose master weights it owns, so the update needs no communication and never
materialises the full model; :meth:`ShardedEMA.full_state` gathers the shards to rank 0 for a checkpoint or the
export. Where the master weights live depends on the engine:

* fp32 module (``train.precision=fp32`` / ``bf16_autocast``): the module's parameters are the master weights.
  Rank r keeps ZeRO-3's slice of every parameter, ``chunk = ceil(numel / world)`` elements from ``r * chunk``:
  under ZeRO-3 that is ``param.ds_tensor``, under ZeRO 0-2 a view of the replicated parameter.
* bf16 module (DeepSpeed bf16): the module holds bf16 copies; averaging them would inherit bf16 rounding (at
  lr 1e-4 most updates are below bf16's resolution), so the EMA reads the optimizer's fp32 masters instead:
  ZeRO-3 ``safe_get_local_fp32_param`` (same slice layout as above); ZeRO-1/2 and DeepSpeed's BF16_Optimizer the
  fp32 fragment of each parameter this rank's optimizer partition holds (``param._hp_mapping``, a contiguous
  range of the flattened parameter, possibly empty). (Stage 0 with DeepSpeed bf16 is refused by
  gd.train.engine.deepspeed_config.)
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedEMA:
    """``ema = decay * ema + (1 - decay) * master`` in fp32 over all of ``module``'s named parameters.

    ``optimizer`` is the DeepSpeed engine's optimizer (``engine.optimizer``); it is only consulted when the module's
    parameters are not fp32, to find their fp32 master copies. ``rank_world`` overrides the process group's
    (rank, world size), e.g. to lay out shards in a test (fp32 layout only).
    """

    def __init__(self, module: torch.nn.Module, decay: float, zero3: bool = False,
                 rank_world: tuple[int, int] | None = None, optimizer: Any = None) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"train.ema_decay={decay}: expected a value in [0, 1]")
        self.decay = float(decay)
        self.zero3 = zero3
        self.rank, self.world = rank_world or _world()
        self.params = list(module.named_parameters())
        self.shapes = {name: tuple(p.ds_shape if zero3 else p.shape) for name, p in self.params}
        self.numels = {name: math.prod(shape) for name, shape in self.shapes.items()}
        self.chunks = {name: math.ceil(n / self.world) for name, n in self.numels.items()}
        self.optimizer = optimizer
        low_precision = any(p.dtype != torch.float32 for _, p in self.params)
        self.source = "module"
        if low_precision:
            if zero3:
                self.source = "zero3_fp32"
            elif self.params and all(hasattr(p, "_hp_mapping") for _, p in self.params):
                self.source = "hp_mapping"
            else:
                raise ValueError(f"EMA: the module's parameters are {self.params[0][1].dtype}, but the optimizer "
                                 f"{type(optimizer).__name__} exposes no fp32 master weights this EMA knows how to "
                                 f"read (ZeRO-3, or the ZeRO-1/2 hp mapping)")
        # Per rank, its segments (parameter index, start in the flattened parameter, length, offset in its flat).
        if self.source == "hp_mapping":
            own, total = [], 0
            for i, (_, p) in enumerate(self.params):
                if p._hp_mapping is not None:
                    address = p._hp_mapping.lp_fragment_address
                    own.append((i, int(address.start), int(address.numel), total))
                    total += int(address.numel)
            self.segments = self._gather_segments(own)
        else:
            self.segments = [self._chunk_segments(r) for r in range(self.world)]
        self._check_coverage()
        if self.source == "hp_mapping":
            self.flat_len = max((off + length for segs in self.segments for _, _, length, off in segs), default=0)
            own_len = max((off + length for _, _, length, off in self.segments[self.rank]), default=0)
        else:  # every rank the same size: ZeRO-3's padded chunks
            self.flat_len = own_len = sum(self.chunks.values())
        self.offsets = {self.params[i][0]: off for i, _, _, off in self.segments[self.rank]}
        device = self.params[0][1].device if self.params else torch.device("cpu")
        self.flat = torch.zeros(own_len, dtype=torch.float32, device=device)
        self._src: list[Tensor] | None = None
        self._dst = [self.flat[off:off + length] for _, _, length, off in self.segments[self.rank]]
        self.copy_from_model()

    # ---- layout ----------------------------------------------------------------------------------------------
    def _chunk_segments(self, rank: int) -> list[tuple[int, int, int, int]]:
        out, offset = [], 0
        for i, (name, _) in enumerate(self.params):
            chunk, numel = self.chunks[name], self.numels[name]
            start = rank * chunk
            out.append((i, start, max(0, min(chunk, numel - start)), offset))
            offset += chunk
        return out

    def _gather_segments(self, own: list[tuple[int, int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
        if self.world == 1 or not dist.is_initialized():
            return [own]
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, own)
        return everyone

    def _check_coverage(self) -> None:
        covered = [0] * len(self.params)
        for segs in self.segments:
            for i, _, length, _ in segs:
                covered[i] += length
        bad = [f"{name}: {c} of {self.numels[name]}" for (name, _), c in zip(self.params, covered)
               if c != self.numels[name]]
        if bad:
            raise RuntimeError(f"EMA shards do not cover the parameters exactly once ({self.source}): {bad[:5]}")

    # ---- sources ---------------------------------------------------------------------------------------------
    def _sources(self) -> list[Tensor]:
        """Views of this rank's master elements, resolved once: they alias the engine's persistent fp32 storage, and
        resolving them per step costs per-parameter host work (under ZeRO-3 bf16 a stream sync per parameter).
        :meth:`refresh` drops them, e.g. after the engine loaded a checkpoint."""
        if self._src is not None:
            return self._src
        views = self._resolve_sources()
        if all(v.dtype == torch.float32 and v.device == d.device for v, d in zip(views, self._dst)):
            self._src = views
            return views
        return [v.to(d.device, torch.float32) for v, d in zip(views, self._dst)]  # copies: never cached

    def refresh(self) -> None:
        """Forget the resolved source views (call after anything may have replaced the engine's tensors)."""
        self._src = None

    def _resolve_sources(self) -> list[Tensor]:
        out = []
        for i, start, length, _ in self.segments[self.rank]:
            p = self.params[i][1]
            if self.source == "module":
                if self.zero3:
                    src = p.ds_tensor.view(-1)[:length]
                else:
                    src = p.detach().reshape(-1)[start:start + length]
            elif self.source == "zero3_fp32":
                from deepspeed.utils import safe_get_local_fp32_param

                src = safe_get_local_fp32_param(p).view(-1)[:length]
            else:
                src = p._hp_mapping.get_hp_fragment().view(-1)
            out.append(src)
        return out

    @torch.no_grad()
    def copy_from_model(self) -> None:
        """Set the EMA to the current master weights (decay 0), as at the start of training."""
        if self._dst:
            torch._foreach_copy_(self._dst, self._sources())

    @torch.no_grad()
    def load_masters(self, state: Mapping[str, Tensor]) -> None:
        """Write this rank's elements of a full state dict into the fp32 master weights this EMA reads (a pretrained
        start at full precision under DeepSpeed bf16, whose masters were made from the bf16 copy). An fp32 module
        is its own master and was loaded before the engine wrapped it: nothing to do."""
        if self.source == "module" or not self._dst:
            return
        views = self._resolve_sources()
        values = [state[self.params[i][0]].reshape(-1)[start:start + length].to(v.device, v.dtype)
                  for (i, start, length, _), v in zip(self.segments[self.rank], views)]
        torch._foreach_copy_(views, values)

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the current master weights; call after each applied optimizer step."""
        if self._dst:
            torch._foreach_lerp_(self._dst, self._sources(), 1.0 - self.decay)

    def local_state(self) -> Tensor:
        return self.flat

    @torch.no_grad()
    def full_state(self, dst: int = 0) -> dict[str, Tensor] | None:
        """The consolidated EMA as a flat fp32 CPU state dict on rank ``dst``, None on the other ranks.

        Collective (every rank must call it); only ``dst`` receives the shards, so the other ranks never hold the
        whole model.
        """
        local = self.flat
        if local.numel() < self.flat_len:
            local = torch.cat([local, local.new_zeros(self.flat_len - local.numel())])
        if self.world == 1:
            shards = [local]
        elif self.rank == dst:
            shards = [torch.empty_like(local) for _ in range(self.world)]
            dist.gather(local, shards, dst=dst)
        else:
            dist.gather(local, None, dst=dst)
            return None
        flats = [s.cpu() for s in shards]
        state = {name: torch.empty(self.numels[name], dtype=torch.float32) for name, _ in self.params}
        for flat, segs in zip(flats, self.segments):
            for i, start, length, off in segs:
                state[self.params[i][0]][start:start + length].copy_(flat[off:off + length])
        return {name: state[name].view(self.shapes[name]) for name, _ in self.params}

    @torch.no_grad()
    def load_full_state(self, state: Mapping[str, Tensor]) -> None:
        """Take this rank's shard of a consolidated EMA state dict (any world size wrote it)."""
        names = [n for n, _ in self.params]
        missing = [n for n in names if n not in state]
        unexpected = [n for n in state if n not in self.shapes]
        wrong = [f"{n}: {tuple(state[n].shape)} vs {self.shapes[n]}" for n in names
                 if n in state and tuple(state[n].shape) != self.shapes[n]]
        if missing or unexpected or wrong:
            raise ValueError(f"EMA state does not fit the model: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}, shape mismatches {wrong[:5]}")
        for (i, start, length, _), dst in zip(self.segments[self.rank], self._dst):
            dst.copy_(state[names[i]].reshape(-1)[start:start + length].to(dst.device, torch.float32))
