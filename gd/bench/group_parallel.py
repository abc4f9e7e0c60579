"""Group parallelism's costs for SiT-XL/2: bytes each rank sends, activation memory per rank, FLOPs up to N=64.

    python -m gd.bench.group_parallel                                  # the tables, then a CPU run at P = 1, 2, 4
    python -m gd.bench.group_parallel time.enabled=false group_size=32 'degrees=[1,2,4,8,16]'

Three tables (see gd.models.group_parallel for the two attention implementations):

* bytes per rank, per group-attention layer and per training step (forward + backward of every group layer for
  ``groups`` groups per group-parallel group), for each P and implementation: :func:`comm_bytes`, which the tests
  check against the collectives actually called.
* cost per group size N: forward FLOPs per image (gd.models.flops), the attention products' share of them, and
  the activation memory per rank at P = 1, 2, 4, 8 for ``groups`` groups per group-parallel group:

      memory(N, P) = groups * (N/P) * L * C * bytes(dtype) * (e0 + depth * e_block + layers * x_P)

  e0, e_block are the elements autograd keeps for backward per token, per unit of width C, outside the blocks and
  per block, measured here (saved-tensor hooks on a small SiT of this depth; they do not depend on N with
  flash-style attention, which keeps no N*L x N*L matrix: e_block ~ 20 = qkv 3, attention output 1, MLP
  4 + 4 + 1, norms, modulations, gates). ``layers`` is the number of group layers and x_P what the exchange
  adds per group layer: 0 at P=1; 1 for Ulysses (the attention output is kept in head layout for the kernel's
  backward and again, after the return all-to-all, in member layout for proj); 2P for all-gather (the gathered
  K, V). The tests check these terms against saved-tensor bytes on P ranks. So Ulysses' memory falls as ~1/P
  and all-gather's does not: its K, V term, 2*N*L*C per group layer, is the same at every P. Not counted:
  weights, gradients, optimizer state (ZeRO), transient buffers (the exchanges' send/receive copies, the
  backward's), allocator fragmentation; gradient checkpointing replaces e_block by ~1.
* with ``time.enabled``, one SiT-XL/2 block (attention + MLP) forward + backward in fp32 on this machine's CPUs
  for P = ``time.degrees`` processes (gloo): seconds per step and the bytes counted from its collectives. On a
  CPU shared by the P processes this shows the overhead of the exchange, not GPU scaling.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from gd.models import build_model, forward_flops
from gd.models.group_parallel import IMPLS, comm_bytes, members_per_rank

MIB, GIB = 2**20, 2**30
_COLLECTIVES = ("all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor")


@dataclass
class TimeConfig:
    enabled: bool = True
    group_size: int = 4
    degrees: list[int] = field(default_factory=lambda: [1, 2, 4])
    steps: int = 2


@dataclass
class BenchConfig:
    model: str = "SiT-XL/2"
    dtype: str = "bfloat16"
    group_size: int = 16
    groups: int = 1
    degrees: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    time: TimeConfig = field(default_factory=TimeConfig)


class CommCounter(TorchDispatchMode):
    """Bytes this rank sends through torch's functional collectives, counted from the tensors they are called
    with: an all-to-all sends every input chunk but its own, an all-gather its input to each of the P-1 others,
    a reduce-scatter (P-1)/P of its input (what a ring algorithm puts on the wire)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: Counter = Counter()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if func.namespace == "_c10d_functional" and name in _COLLECTIVES:
            x = args[0]
            size = x.numel() * x.element_size()
            if name == "all_to_all_single":
                splits, group = args[2], args[3]
                own = splits[dist.get_rank(dist.distributed_c10d._resolve_process_group(group))]
                sent = size * (sum(splits) - own) // sum(splits)
            elif name == "all_gather_into_tensor":
                sent = size * (args[1] - 1)
            else:
                sent = size * (args[2] - 1) // args[2]
            self.bytes[name] += sent
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def saved_bytes(fn: Callable[[], Any], exclude: list[torch.Tensor]) -> tuple[int, Any]:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (the activation memory),
    leaving out the storages of ``exclude`` (parameters, buffers); returns them with ``fn()``'s result."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, tuple[int, torch.Tensor]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = (storage.nbytes(), t)  # holding t keeps the address from being reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(n for n, _ in kept.values()), out


def activation_elements(depth: int, width: int = 64, heads: int = 4, size: int = 16,
                        batch: int = 4) -> tuple[float, float]:
    """(e0, e_block): saved elements per token per unit of width outside the blocks and per block, measured in
    fp32 on two small SiTs (depth and 2*depth blocks) under per-image attention."""
    per_token = []
    for d in (depth, 2 * depth):
        model = build_model("SiT-S/2", input_size=size, hidden_size=width, depth=d, num_heads=heads, num_classes=10,
                            learn_sigma=False)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, model.in_channels, size, size, generator=gen)
        t, y = torch.rand(batch, generator=gen), torch.zeros(batch, dtype=torch.long)
        nbytes, _ = saved_bytes(lambda: model(x, t, y), [*model.parameters(), *model.buffers()])
        per_token.append(nbytes / (batch * model.num_patches * width * 4))
    e_block = (per_token[1] - per_token[0]) / depth
    return per_token[0] - depth * e_block, e_block


def comm_rows(cfg: Any) -> list[dict]:
    model = _meta_model(cfg.model, max(cfg.group_size, 1))
    dtype = getattr(torch, cfg.dtype)
    layers = model.group_layers[1] - model.group_layers[0]
    rows = []
    for p in cfg.degrees:
        for impl in IMPLS:
            try:
                per_layer = comm_bytes(impl, cfg.group_size, model.num_patches, model.hidden_size, model.num_heads, p,
                                       dtype, cfg.groups)
            except ValueError as err:
                rows.append({"P": p, "impl": impl, "error": str(err)})
                continue
            rows.append({"P": p, "impl": impl, "layer": per_layer, "step": per_layer * layers})
    return rows


def cost_rows(cfg: Any, e0: float, e_block: float) -> list[dict]:
    """Per group size N: forward FLOPs per image, attention share, activation bytes per rank per P and impl."""
    model = _meta_model(cfg.model, max(cfg.sizes))
    elem = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    tokens, c = model.num_patches, model.hidden_size
    layers = model.group_layers[1] - model.group_layers[0]
    rows = []
    for n in cfg.sizes:
        flops = forward_flops(model, n)
        attention = 4.0 * tokens * c * (layers * n * tokens + (model.depth - layers) * tokens)
        memory: dict[str, float] = {}
        for p in cfg.degrees:
            if n % p:
                continue
            base = cfg.groups * (n // p) * tokens * c * elem
            for impl, extra in (("ulysses", 1), ("allgather", 2 * p)) if p > 1 and n > 1 else (("none", 0),):
                memory[f"{impl}{p}"] = base * (e0 + model.depth * e_block + layers * extra)
        rows.append({"N": n, "tokens": n * tokens, "flops": flops, "attention_share": attention / flops,
                     "memory": memory})
    return rows


def _meta_model(name: str, max_group_size: int) -> Any:
    with torch.device("meta"):  # shapes only: SiT-XL/2 without allocating or initialising 675M weights
        return build_model(name, max_group_size=max_group_size)


def _time_worker(rank: int, world: int, store: str, cfg: dict, out: str) -> None:
    """One SiT-XL/2 block at group size N split over ``world`` ranks: seconds per fwd+bwd, counted bytes."""
    from gd.models.group_parallel import new_group_parallel
    from gd.models.sit import SiTBlock

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = _meta_model(cfg["model"], cfg["group_size"])
    n, tokens, c, heads = cfg["group_size"], model.num_patches, model.hidden_size, model.num_heads
    torch.manual_seed(0)
    block = SiTBlock(c, heads, 4.0, "sdpa")
    results = {}
    for impl in IMPLS if world > 1 else ("none",):
        if world > 1:
            block.attn.group_parallel = new_group_parallel(world, impl)
        m = members_per_rank(n, world)
        x = torch.randn(m, tokens, c, requires_grad=True)
        cond = torch.randn(m, c)
        times, counter = [], CommCounter()
        for step in range(cfg["steps"] + 1):
            dist.barrier()
            start = time.perf_counter()
            with counter if step == 0 else nullcontext():
                block(x, cond, n).square().mean().backward()
            dist.barrier()
            if step:
                times.append(time.perf_counter() - start)
        results[impl] = {"seconds": min(times), "bytes": counter.total}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def time_rows(cfg: Any) -> list[dict]:
    import torch.multiprocessing as mp

    rows = []
    for p in cfg.time.degrees:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            mp.spawn(_time_worker, args=(p, os.path.join(tmp, "store"), {"model": cfg.model, "group_size":
                     cfg.time.group_size, "steps": cfg.time.steps}, out), nprocs=p)
            with open(out) as f:
                for impl, r in json.load(f).items():
                    rows.append({"P": p, "impl": impl, **r})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = OmegaConf.merge(OmegaConf.structured(BenchConfig), OmegaConf.from_dotlist(args))
    model = _meta_model(cfg.model, max(cfg.sizes))
    print(f"# {cfg.model} (L={model.num_patches} tokens, C={model.hidden_size}, {model.num_heads} heads, "
          f"{model.depth} blocks), {cfg.dtype}, {cfg.groups} group(s) per group-parallel group\n")
    print(f"## bytes sent per rank, N={cfg.group_size}, forward + backward\n\n"
          "| P | impl | per layer MiB | per step MiB |\n|---|---|---|---|")
    for r in comm_rows(cfg):
        if "error" in r:
            print(f"| {r['P']} | {r['impl']} | {r['error']} | |")
        else:
            print(f"| {r['P']} | {r['impl']} | {r['layer'] / MIB:.2f} | {r['step'] / MIB:.1f} |")
    e0, e_block = activation_elements(model.depth)
    print(f"\n## cost per group size; activation GiB per rank (e0={e0:.2f}, e_block={e_block:.2f} elements per token "
          "per unit width, measured)\n")
    keys = [f"none{p}" if p == 1 else f"{impl}{p}" for p in cfg.degrees for impl in (("none",) if p == 1 else IMPLS)]
    names = [k.replace("none", "P=").replace("ulysses", "Ulysses P=").replace("allgather", "all-gather P=")
             for k in keys]
    print("| N | tokens per group | GFLOPs / image (fwd) | attention share | " + " | ".join(names) + " |\n|"
          + "---|" * (4 + len(keys)))
    for r in cost_rows(cfg, e0, e_block):
        mem = " | ".join(f"{r['memory'][k] / GIB:.1f}" if k in r["memory"] else "-" for k in keys)
        print(f"| {r['N']} | {r['tokens']} | {r['flops'] / 1e9:.1f} | {100 * r['attention_share']:.1f}% | {mem} |")
    if cfg.time.enabled:
        print(f"\n## one block, N={cfg.time.group_size}, fp32 on {os.cpu_count()} CPUs (gloo), forward + backward\n\n"
              "| P | impl | seconds | bytes sent per rank (counted) | formula |\n|---|---|---|---|---|")
        for r in time_rows(cfg):
            formula = 0 if r["impl"] == "none" else comm_bytes(r["impl"], cfg.time.group_size, model.num_patches,
                                                                model.hidden_size, model.num_heads, r["P"],
                                                                torch.float32)
            print(f"| {r['P']} | {r['impl']} | {r['seconds']:.2f} | {r['bytes']} | {formula} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
