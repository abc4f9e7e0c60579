"""Where a training step's time goes apart from the model's math: host syncs, operators and bytes per phase.

    python -m gd.bench.step_cost                                  # SiT-XL/2's 28 blocks at width 64, on this CPU
    python -m gd.bench.step_cost bench.narrow=null bench.batch=32     # the real model (GPU)

For the reference step and each engine variant of ``bench`` (the same rows as ``gd.bench.train``), one step is
split into forward / backward / update (:class:`gd.bench.train.Step`) and counted while it runs:

* host syncs: every read of a tensor's value on the host (``aten._local_scalar_dense``: ``.item()``, ``float()``,
  ``bool()``; ``Tensor.tolist`` / ``numpy``) and every explicit device synchronize (torch.cuda, DeepSpeed's
  accelerator, streams, events). On a GPU each one drains the queue; the count is the same on a CPU.
* operators: aten calls that are not views (on a GPU roughly one kernel launch each).
* bytes: inputs plus outputs of those calls, an upper bound of the memory traffic (in-place updates count their
  operand twice); per parameter it does not depend on the model's width, so it projects to SiT-XL/2.
* time per phase, measured without the counters.

Host syncs are counted again by :func:`count_syncs` with compiled code running compiled (under the operator
counter's TorchDispatchMode torch.compile falls back to eager, so the operator and byte counts of a compiled row
are those of its eager graph): that column also holds for ``bench.compile=[true]`` rows, with the number of
compiled regions entered per phase (a graph break shows as more than one).

``bench.narrow`` shrinks hidden size and heads but keeps depth, so the step has SiT-XL/2's parameter tensors
(the per-tensor host work of hooks, buckets and optimizers) without its FLOPs: on a CPU the phase times then show
the framework's host overhead, the part a GPU cannot hide when it exceeds the device time of a step.
As on CUDA, the reference computes under bf16 autocast and optimizers are fused (unless ``bench.fused=false``).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import Counter
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gd.bench import train as bench

log = logging.getLogger("gd.bench.step_cost")

PHASES = ("forward", "backward", "update")
_HOST_READS = {torch.ops.aten._local_scalar_dense.default}


class StepCounter(TorchDispatchMode):
    """Counts host syncs, non-view operators and bytes touched, per phase (``counter.phase = name``)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase: str | None = None
        self.syncs: Counter = Counter()
        self.ops: Counter = Counter()
        self.bytes: Counter = Counter()
        self.by_op: dict[str, Counter] = {p: Counter() for p in PHASES}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        phase = self.phase
        if phase is not None:
            if func in _HOST_READS:
                self.syncs[phase] += 1
            elif not func.is_view:
                tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
                self.ops[phase] += 1
                self.bytes[phase] += sum(t.numel() * t.element_size() for t in tensors)
                self.by_op[phase][func.overloadpacket.__name__] += 1
        return out

    def sync(self) -> None:
        """Record an explicit device synchronize (a host-side call the dispatcher does not see)."""
        if self.phase is not None:
            self.syncs[self.phase] += 1


class SyncCounter:
    """Explicit synchronizes and host copy-outs per phase (``counter.phase = name``), fed by :func:`_patch_syncs`."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.syncs: Counter = Counter()

    def sync(self) -> None:
        if self.phase is not None:
            self.syncs[self.phase] += 1


def _patch_syncs(counter: StepCounter | SyncCounter) -> list[tuple[Any, str, Any]]:
    """Wrap every explicit synchronize and host copy-out this process can call; returns what to restore."""
    targets: list[tuple[Any, str]] = [(torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"),
                                      (torch.cuda.Event, "synchronize"), (torch.Tensor, "tolist"),
                                      (torch.Tensor, "numpy")]
    try:
        from deepspeed.accelerator import get_accelerator

        targets.append((type(get_accelerator()), "synchronize"))
    except ImportError:
        pass
    saved = []
    for owner, name in targets:
        original = getattr(owner, name)

        def wrapped(*a: Any, _original: Any = original, **k: Any) -> Any:
            counter.sync()
            return _original(*a, **k)

        setattr(owner, name, wrapped)
        saved.append((owner, name, original))
    return saved


def count_step(step: bench.Step, steps: int = 1) -> dict[str, dict[str, float]]:
    """Per-phase syncs, operators and bytes of ``steps`` calls of ``step``, averaged per step."""
    counter = StepCounter()
    saved = _patch_syncs(counter)
    try:
        with counter:
            for _ in range(steps):
                counter.phase = "forward"
                loss = step.forward()
                counter.phase = "backward"
                step.backward(loss)
                counter.phase = "update"
                step.update()
                counter.phase = None
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    return {p: {"syncs": counter.syncs[p] / steps, "ops": counter.ops[p] / steps,
                "bytes": counter.bytes[p] / steps, "top": dict(counter.by_op[p].most_common(6))}
            for p in PHASES}


def count_syncs(step: bench.Step, steps: int = 1) -> dict[str, dict[str, float]]:
    """Per-phase host syncs and compiled regions entered, averaged per step, with compiled code running compiled.

    Syncs: ``aten._local_scalar_dense`` calls seen by the profiler that Python code asked for (``.item()``,
    ``float()``, ``bool()`` of a tensor, in eager code or at a graph break) plus the explicit synchronizes and
    ``tolist`` / ``numpy`` copies that :func:`_patch_syncs` wraps. Regions: "Torch-Compiled Region" events (0 in an
    eager step)."""
    counter = SyncCounter()
    reads: Counter = Counter()
    regions: Counter = Counter()
    saved = _patch_syncs(counter)
    try:
        for _ in range(steps):
            loss = None
            for phase in PHASES:
                counter.phase = phase
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    if phase == "forward":
                        loss = step.forward()
                    elif phase == "backward":
                        step.backward(loss)
                    else:
                        step.update()
                counter.phase = None
                for event in prof.events():
                    if event.name == "aten::_local_scalar_dense" and _called_from_python(event):
                        reads[phase] += 1
                    elif event.name.startswith("Torch-Compiled Region"):
                        regions[phase] += 1
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    return {p: {"syncs": (reads[p] + counter.syncs[p]) / steps, "regions": regions[p] / steps} for p in PHASES}


_READS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")


def _called_from_python(event: Any) -> bool:
    """Whether a profiled host read was asked for by Python code (or a graph break), not inside another operator
    (the CPU fused AdamW reads its step count with ``item()``: no sync there, and on CUDA that count lives on the
    device)."""
    parent = event.cpu_parent
    while parent is not None and parent.name in _READS:
        parent = parent.cpu_parent
    return parent is None or not parent.name.startswith("aten::")


def time_phases(step: bench.Step, warmup: int, steps: int) -> dict[str, float]:
    """Mean seconds per phase (device-synchronised at each phase boundary)."""
    for _ in range(warmup):
        step()
    total = dict.fromkeys(PHASES, 0.0)
    for _ in range(steps):
        bench._sync()
        t0 = time.perf_counter()
        loss = step.forward()
        bench._sync()
        t1 = time.perf_counter()
        step.backward(loss)
        bench._sync()
        t2 = time.perf_counter()
        step.update()
        bench._sync()
        t3 = time.perf_counter()
        for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            total[phase] += dt
    return {p: v / steps for p, v in total.items()}


def _narrowed(cfg: Any) -> Any:
    narrow = cfg.bench.get("narrow")
    if not narrow:
        return cfg
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.model = OmegaConf.merge(cfg.model, narrow)
    return cfg


def measure(cfg: Any, spec: dict, device: torch.device) -> dict:
    """One configuration's counts and phase times, or the error that stopped it."""
    b = cfg.bench
    cfg = _narrowed(cfg)
    fused = True if b.get("fused") is None else bool(b.fused)
    row: dict[str, Any] = dict(spec, error="")
    try:
        step = bench.build_step(cfg, spec, device, fused=fused, autocast=True)
        row["params"] = step.params
        row["time"] = time_phases(step, int(b.warmup), int(b.steps))
        row["count"] = count_step(step, 1)
        for phase, seen in count_syncs(step, 1).items():
            row["count"][phase].update(seen)
    except Exception as err:  # one failing configuration should not lose the others' numbers
        row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
    return row


def fmt(row: dict, rows: list[dict]) -> str:
    """One markdown row: ms per phase, syncs, operators and bytes per parameter per phase."""
    head = f"| {row['mode']} | {row['variant']} | {row['n']} |"
    if row.get("error") or "time" not in row:
        return head + f" {row.get('error', '')} |"
    t, c, params = row["time"], row["count"], max(int(row["params"]), 1)
    ms = " | ".join(f"{1e3 * t[p]:.1f}" for p in PHASES)
    syncs = "/".join(f"{c[p]['syncs']:g}" for p in PHASES)
    ops = "/".join(f"{c[p]['ops']:g}" for p in PHASES)
    bpp = "/".join(f"{c[p]['bytes'] / params:.0f}" for p in PHASES)
    return f"{head} {ms} | {1e3 * sum(t.values()):.1f} | {syncs} | {ops} | {bpp} |"


def _describe(cfg: Any) -> tuple[str, str]:
    b = cfg.bench
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    model = _narrowed(cfg).model
    title = (f"# {cfg.model.name} ({model.get('hidden_size', 'full')} wide, depth {model.get('depth', 'full')}) "
             f"input {cfg.model.input_size} batch {b.batch} on {device}; {b.steps} timed steps (+{b.warmup} warmup)")
    header = ("| mode | variant | N | fwd ms | bwd ms | update ms | step ms | host syncs f/b/u | operators f/b/u "
              "| bytes per parameter f/b/u |\n|---|---|---|---|---|---|---|---|---|---|")
    return title, header


def main(argv: list[str] | None = None) -> int:
    result = bench.run_table(argv, "gd.bench.step_cost", measure, fmt, _describe)
    if result is None:
        return 0
    cfg, rows = result
    if cfg.bench.get("out"):
        from gd.io import atomic_write_text

        atomic_write_text(cfg.bench.out, json.dumps(rows, indent=1))
    return 0 if all(not r.get("error") and not math.isnan(sum(r["time"].values())) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
