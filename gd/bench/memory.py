"""Peak training memory without the GPU: will SiT-XL/2 at N=16, batch 32 fit, and what does each engine add?

    python -m gd.bench.memory +exp=groupdiff16                # the experiment's model, N and micro batch
    python -m gd.bench.memory model=sit_xl2 bench.batch=32 'bench.group_sizes=[1,16]'

Two measurements, both with torch's MemTracker (every tensor storage alive at each moment, by category):

* the plain-torch reference step (fp32 weights, bf16 autocast, AdamW, fp32 EMA) at the full batch, run under
  FakeTensorMode: shapes and lifetimes are real, no memory is used and no FLOPs are spent, so it runs on a laptop;
* each engine variant (``bench.variants``) and the reference, run for real on this device at a tiny batch of
  small latents (``bench.memory_batch``, ``memory_input_size``; same model): model, gradient and optimizer
  state, DeepSpeed's buffers and the EMA, which do not depend on the batch.

Estimated peak of a variant = reference peak at the full batch + (variant - reference) at the tiny batch. The fake
run uses the CPU attention kernels (flash-style: no N·L x N·L matrix is kept), as CUDA's flash/cuDNN kernels do;
the CUDA caching allocator's fragmentation comes on top. On a GPU, ``gd.bench.train`` measures the real peak.
"""
from __future__ import annotations

import gc
import logging
import sys
from typing import Any

import torch
from omegaconf import OmegaConf
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from gd.bench import train as bench

log = logging.getLogger("gd.bench.memory")
GIB = 2**30


def _tracked_peak(make_step: Any, steps: int = 2) -> int:
    """Peak bytes of every tensor created while building and running ``steps`` steps of ``make_step()``."""
    tracker = MemTracker()
    with tracker:
        step = make_step()
        for i in range(steps):
            if i:
                tracker.reset_mod_stats()
            step()
    peaks = tracker.get_tracker_snapshot("peak")
    del step
    gc.collect()
    return sum(int(v["Total"]) for dev, v in peaks.items() if dev.type != "meta")


def reference_peak(cfg: Any, n: int, batch: int) -> int:
    """Peak bytes of the plain-torch step (with its EMA) at ``batch`` images of group size ``n``, on fake tensors."""
    from gd.diffusion.objectives import build_objective

    sized = _with_batch(cfg, batch)
    objective = build_objective(sized.diffusion, sized.model)  # its tables are checked on real values
    with FakeTensorMode(allow_non_fake_inputs=True):
        return _tracked_peak(lambda: bench.reference_step(sized, n, False, torch.device("cpu"), fused=False,
                                                          autocast=True, readback=False, objective=objective))


def measure(cfg: Any, spec: dict, device: torch.device) -> dict:
    """``small``: real peak bytes of the spec's step at ``bench.memory_batch``; the reference also gets
    ``full``: its fake-tensor peak at ``bench.batch``."""
    b = cfg.bench
    n, row = int(spec["n"]), dict(spec, error="")
    try:
        for name, batch in (("batch", b.batch), ("memory_batch", b.memory_batch)):
            if int(batch) % n:
                raise ValueError(f"bench.{name}={batch} is not a multiple of N={n}")
        small = OmegaConf.merge(_with_batch(cfg, int(b.memory_batch)),
                                {"model": {"input_size": int(b.memory_input_size)}})
        row["small"] = _tracked_peak(lambda: bench.build_step(small, spec, device, fused=True, autocast=True))
        if spec["mode"] == "reference":
            row["full"] = reference_peak(cfg, n, int(b.batch))
    except Exception as err:  # one failing configuration should not lose the others' numbers
        row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
    return row


def fmt(row: dict, rows: list[dict]) -> str:
    """Markdown row: state at the small batch, and the estimated peak at the full batch."""
    head = f"| {row['mode']} | {row['variant']} | {row['n']} |"
    ref = next((r for r in rows if r["mode"] == "reference" and r["n"] == row["n"] and "full" in r), None)
    if row.get("error") or "small" not in row or ref is None or "small" not in ref:
        return head + f" | | {row.get('error') or 'no reference row'} |"
    estimate = ref["full"] + row["small"] - ref["small"]
    return head + f" {row['small'] / GIB:.1f} | {estimate / GIB:.1f} |"


def _with_batch(cfg: Any, batch: int) -> Any:
    return OmegaConf.merge(cfg, {"bench": {"batch": batch}})


def _describe(cfg: Any) -> tuple[str, str]:
    b = cfg.bench
    title = (f"# {cfg.model.name}: peak GiB per device; state measured at batch {b.memory_batch}, peak estimated at "
             f"batch {b.batch} (reference on fake tensors)")
    header = (f"| mode | variant | N | at batch {b.memory_batch} | estimated at batch {b.batch} |\n"
              "|---|---|---|---|---|")
    return title, header


def main(argv: list[str] | None = None) -> int:
    """Each configuration in a child process (``bench.isolate``): engines do not free their memory."""
    result = bench.run_table(argv, "gd.bench.memory", measure, fmt, _describe)
    return 0 if result is None or all(not r.get("error") for r in result[1]) else 1


if __name__ == "__main__":
    sys.exit(main())
