"""Gradient communication of a ZeRO training step across ranks: bytes by collective and wall time per step, for each
combination of DeepSpeed's ``overlap_comm`` and ``reduce_scatter`` (``train.ds.*``).

    srun -N2 -n2 python -m gd.bench.comm                         # two nodes, one rank each (gloo on CPUs)
    srun -N2 --ntasks-per-node 8 --gpus-per-node 8 python -m gd.bench.comm model=sit_xl2 precision=bf16 micro_batch=32
    torchrun --nproc_per_node 2 -m gd.bench.comm                  # one node

Each rank runs the trainer's own step (gd.train.trainer.Trainer with synthetic latents, no data pipeline). Bytes come
from DeepSpeed's comms logger during one step (it synchronises after every collective, so timing runs separately,
with the logger off): the message size of every collective DeepSpeed issues, summed per kind. Wall time is the median
of ``steps`` timed steps after ``warmup``, each between barriers. Under srun without torchrun's variables, RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous come from SLURM's.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import time
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from gd.distributed import env as _env

DEFAULTS = {
    "model": "sit_s2", "input_size": 32, "micro_batch": 8, "global_batch": None, "precision": "fp32",
    "zero_stage": 2, "steps": 5, "warmup": 2, "bucket": None,  # elements per reduce/all-gather bucket; None: train.ds's
    "combos": [[False, False], [False, True], [True, False], [True, True]],  # [overlap_comm, reduce_scatter]
}


def _env_from_slurm() -> None:
    """torch.distributed's variables from a bare `srun` step (no-op under torchrun or submitit)."""
    place = _env.place()
    if place.source != "slurm":
        return
    from gd.launch.job import rendezvous_port

    hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]], capture_output=True,
                           text=True, check=True).stdout.split()
    step = f"comm-{os.environ.get('SLURM_STEP_ID', 0)}"
    os.environ.update(RANK=str(place.rank), WORLD_SIZE=str(place.world_size), LOCAL_RANK=str(place.local_rank),
                      MASTER_ADDR=hosts[0],
                      MASTER_PORT=str(rendezvous_port(os.environ["SLURM_JOB_ID"], step)))


def _trainer(b: Any, overlap: bool, reduce_scatter: bool, world: int):
    from gd.train.__main__ import compose_config
    from gd.train.data import SyntheticData
    from gd.train.trainer import Trainer

    global_batch = int(b.global_batch or b.micro_batch * world)
    cfg = compose_config([f"model={b.model}", f"model.input_size={b.input_size}", "diffusion=plain",
                          f"train.micro_batch={b.micro_batch}", f"train.global_batch={global_batch}",
                          f"train.precision={b.precision}", f"train.zero_stage={b.zero_stage}",
                          f"train.ds.overlap_comm={overlap}", f"train.ds.reduce_scatter={reduce_scatter}",
                          *([] if b.bucket is None else [f"train.ds.reduce_bucket_size={b.bucket}",
                                                         f"train.ds.allgather_bucket_size={b.bucket}"]),
                          "train.progress=false"])
    return Trainer(cfg, data=SyntheticData(cfg.model, int(b.micro_batch)), resume=False)


def _bytes_per_step(trainer: Any, step: int) -> dict[str, tuple[int, int]]:
    """{collective: (calls, message bytes)} of one step, from DeepSpeed's comms logger."""
    from deepspeed.comm import comm as dscomm

    logger = dscomm.comms_logger
    logger.enabled, logger.prof_all, logger.verbose, logger.comms_dict = True, True, False, {}
    try:
        trainer.train_step(step)
    finally:
        logger.enabled = False
    out: dict[str, tuple[int, int]] = {}
    for name, sizes in logger.comms_dict.items():
        calls = sum(v[0] for v in sizes.values())
        total = sum(size * v[0] for size, v in sizes.items())
        key = name.split("|")[0]
        prev = out.get(key, (0, 0))
        out[key] = (prev[0] + calls, prev[1] + total)
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()


def measure(b: Any, overlap: bool, reduce_scatter: bool) -> dict[str, Any]:
    world = dist.get_world_size() if dist.is_initialized() else _env.world_size()
    trainer = _trainer(b, overlap, reduce_scatter, world)
    params = sum(p.numel() for p in trainer.model.parameters())
    for step in range(int(b.warmup)):
        trainer.train_step(step)
    comm = _bytes_per_step(trainer, int(b.warmup))
    times = []
    for step in range(int(b.warmup) + 1, int(b.warmup) + 1 + int(b.steps)):
        _sync()
        started = time.perf_counter()
        trainer.train_step(step)
        _sync()
        times.append(time.perf_counter() - started)
    del trainer
    return {"overlap_comm": overlap, "reduce_scatter": reduce_scatter, "params": params, "world": world,
            "step_s": statistics.median(times), "comm": comm}


def main() -> None:
    b = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_cli())
    _env_from_slurm()
    from gd.train import engine as eng

    eng.init_distributed()
    rows = [measure(b, bool(o), bool(r)) for o, r in b.combos]
    if dist.get_rank() == 0:
        nodes = os.environ.get("SLURM_JOB_NUM_NODES", "1")
        print(f"{rows[0]['world']} ranks on {nodes} node(s), {b.model} at {b.input_size}px, {rows[0]['params']:,} "
              f"parameters ({4 * rows[0]['params'] / 2**20:.0f} MiB of fp32 gradients), micro batch {b.micro_batch}, "
              f"ZeRO-{b.zero_stage} {b.precision}, {dist.get_backend()}")
        print("| overlap_comm | reduce_scatter | s/step (median) | collectives per step: calls, MiB |")
        print("|---|---|---|---|")
        for r in rows:
            comm = ", ".join(f"{k} {c} x, {n / 2**20:.1f}" for k, (c, n) in sorted(r["comm"].items()))
            print(f"| {r['overlap_comm']} | {r['reduce_scatter']} | {r['step_s']:.3f} | {comm} |", flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
