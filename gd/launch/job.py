"""The callable that submitit runs on every rank: distributed environment, task dispatch, preemption.

Preemption order (SLURM's USR2, a `scancel --signal=USR2`, or the local controller near its time limit):
submitit installs its own USR2 handler before calling us; that handler checkpoints the *callable* and requeues
at once, from inside whatever the main thread was doing, on rank 0 only. A training step cannot be interrupted
like that, so for `task=train` the handler is swapped for one that only raises a flag. The trainer polls the
flag (`stop_requested`), agrees on it across ranks, writes a checkpoint on all ranks and returns
`{"preempted": True}`; then submitit's original handler runs on rank 0 and does what it would have done:
dump `self.checkpoint()` (this same job, same config), requeue, exit. The requeued job finds
`<run.dir>/checkpoints/latest` and the trainer resumes from it.

The rendezvous port (MASTER_PORT) is derived from the job id and SLURM_RESTART_COUNT. If rank 0 finds it taken, it
requeues the job the same way: the next attempt derives another port. Other failures are not requeued (see
slurm/README.md, "Failures and requeueing").
"""
from __future__ import annotations

import os
import signal
import threading
import zlib
from typing import Any, Callable

import submitit
from omegaconf import DictConfig, OmegaConf

from gd.logs import configure_logging


# [low, high): below the ephemeral range, above most services' fixed ports.
RENDEZVOUS_PORTS = (20000, 32768)


class RunJob(submitit.helpers.Checkpointable):
    """One run of `cfg.task` (train, sample or evaluate) as a requeueable submitit job."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __call__(self) -> Any:
        cfg = self.cfg
        _export_environment(cfg)
        configure_logging()  # the job starts without a logging handler: its log.info lines would be lost
        if cfg.task != "train":
            return run_task(cfg, None)
        requested = threading.Event()
        requeue = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, lambda signum, frame: requested.set())
        try:
            result = run_task(cfg, requested.is_set)
        except Exception as err:
            if port_taken(err) and callable(requeue) and "SLURM_JOB_ID" in os.environ:
                # Only rank 0 binds the port. Not a bug and nothing was trained: the next attempt (a new
                # SLURM_RESTART_COUNT) rendezvouses on another port.
                print(f"gd.launch: rendezvous port {os.environ.get('MASTER_PORT')} is taken on "
                      f"{os.environ.get('SLURMD_NODENAME', 'this node')}; requeueing", flush=True)
                requeue(signal.SIGUSR2, None)
            raise
        if isinstance(result, dict) and result.get("preempted") and callable(requeue):
            if submitit.JobEnvironment().global_rank == 0:
                print(f"gd.launch: checkpoint written at step {result.get('step')}; requeueing", flush=True)
            requeue(signal.SIGUSR2, None)
        return result


def run_task(cfg: DictConfig, stop_requested: Callable[[], bool] | None) -> Any:
    """Calls the function behind `cfg.task`; imported here so the launcher itself never imports torch."""
    if cfg.task == "train":
        from gd.train import train

        return train(cfg, stop_requested)
    if cfg.task == "sample":
        from gd.sample import generate

        return generate(cfg)
    if cfg.task == "evaluate":
        from gd import evaluate

        return evaluate.evaluate(cfg)
    raise ValueError(f"task={cfg.task!r}: expected train, sample or evaluate")


def rendezvous_port(job_id: str, restart: str) -> int:
    """The port rank 0's store listens on: the same on every node of the job (no communication needed), another
    one after a requeue (a port the previous attempt's store still holds, or one found taken, is not tried again),
    and below Linux's ephemeral range (32768-60999), where any outgoing connection on the node may hold it."""
    low, high = RENDEZVOUS_PORTS
    return low + zlib.crc32(f"{job_id}-{restart}".encode()) % (high - low)


def port_taken(err: BaseException) -> bool:
    """Whether ``err`` is torch's failure to listen on MASTER_PORT because something else holds it."""
    return "EADDRINUSE" in str(err) or "address already in use" in str(err).lower()


def _export_environment(cfg: DictConfig) -> None:
    """torch.distributed's env:// variables from submitit's job environment, plus the cluster's extra env."""
    env = submitit.JobEnvironment()
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(rendezvous_port(env.job_id, os.environ.get("SLURM_RESTART_COUNT", "0")))
    # CUDA_VISIBLE_DEVICES is left alone: every rank sees the node's GPUs and picks cuda:(LOCAL_RANK % count).
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if cfg.cluster.gpus_per_node == 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # One rank per GPU or per CPU slice: torch's default of one thread per core oversubscribes the node.
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.cluster.cpus_per_task))
    for key, value in OmegaConf.to_container(cfg.cluster.env, resolve=True).items():
        os.environ[str(key)] = str(value)
