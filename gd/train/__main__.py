"""``python -m gd.train [--cfg job [--resolve]] <hydra overrides>`` (or ``gd-train``): compose conf/config.yaml and
train, in one process or one per rank under torchrun or DeepSpeed's launcher (``deepspeed --module gd.train ...``,
whose ``--local_rank=N`` argument is accepted).

Preemption: SIGUSR1 or SIGTERM, or a file ``<run.dir>/STOP``, asks the trainer (through ``stop_requested``) to
checkpoint on every rank and return; a later launch in the same run.dir resumes from that checkpoint. Once train()
has returned (the stop honoured, the checkpoint written), rank 0 deletes ``STOP``, so the next launch trains on
instead of stopping again after one step.

A config that does not compose (a typo'd key or group) is reported once, by rank 0, without a traceback: every rank
composes the same config and would otherwise print the same traceback. The other ranks exit 0 (rank 0's exit
fails the job), so that torchrun does not stop rank 0 before it has printed the error.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from gd.config import compose_config, config_groups, unknown_appends
from gd.logs import configure_logging, env_rank

USAGE = """usage: python -m gd.train [--cfg job [--resolve]] [key=value ...]
       torchrun --nproc_per_node 8 -m gd.train +exp=groupdiff4 run.name=gd4
       deepspeed --num_gpus 8 --module gd.train +exp=groupdiff4 run.name=gd4

Trains (or resumes) the run <run.root>/<run.name> with the config conf/config.yaml plus the overrides.
  --help, -h      this text
  --cfg job       print the composed config (credentials redacted) and exit; --resolve resolves interpolations
  --local_rank=N  DeepSpeed's launcher passes it; LOCAL_RANK in the environment says the same
To submit to SLURM or run in the background, use gd.launch (python -m gd.launch --help).
"""

__all__ = ["compose_config", "main", "parse_args"]


class UsageError(ValueError):
    """A command-line flag this entry point does not take."""


@dataclass
class Args:
    overrides: list[str] = field(default_factory=list)
    help: bool = False
    cfg: str | None = None
    resolve: bool = False
    local_rank: int | None = None


def parse_args(argv: list[str]) -> Args:
    """Hydra overrides plus the few flags above; anything else starting with ``-`` is a :class:`UsageError`."""
    args, i = Args(), 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg in ("-h", "--help"):
            args.help = True
        elif name in ("--local_rank", "--local-rank"):
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            if not value.isdigit():
                raise UsageError(f"{name} {value!r}: expected a non-negative integer")
            args.local_rank = int(value)
        elif name in ("--cfg", "-c"):
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            if value not in ("job", "all"):
                raise UsageError(f"--cfg {value!r}: expected job (the composed config)")
            args.cfg = value
        elif arg == "--resolve":
            args.resolve = True
        elif arg.startswith("-"):
            raise UsageError(f"unknown flag {arg!r}: gd.train takes hydra overrides (key=value), --cfg job, "
                             "--resolve, --local_rank and --help")
        else:
            args.overrides.append(arg)
        i += 1
    return args


def help_text() -> str:
    groups = "\n".join(f"  {g}: {', '.join(options)}" for g, options in config_groups().items())
    return f"{USAGE}\nConfig groups (group=option; +exp=..., +cluster=... add one):\n{groups}\n"


def main(argv: list[str] | None = None) -> int:
    from gd.secrets import output_redactor

    argv = list(sys.argv[1:] if argv is None else argv)
    clean = output_redactor(argv)  # hydra's errors echo override values
    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"gd.train: {clean(str(err))}\n\n{USAGE}", file=sys.stderr)
        return 2
    if args.help:
        print(help_text())
        return 0
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        # DeepSpeed's launcher calls the processes per node LOCAL_SIZE; torchrun, and streaming (one shared-memory
        # cache index per node, created by local rank 0), LOCAL_WORLD_SIZE. Without it every rank creates its own.
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    rank = env_rank()
    configure_logging(rank)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose_config(args.overrides)
    except (HydraException, OmegaConfBaseException) as err:
        if rank == 0:
            print(f"gd.train: the config does not compose: {clean(str(err))}", file=sys.stderr)
            return 2
        # Every rank composes the same config, so rank 0 fails too and fails the job. A failing rank 1 would make
        # torchrun tear the group down, possibly before rank 0 has said what is wrong.
        return 0
    unknown = unknown_appends(args.overrides, cfg)
    if unknown:
        if rank == 0:
            print("\n".join(f"gd.train: {clean(p)}" for p in unknown), file=sys.stderr)
            return 2
        return 0
    if args.cfg is not None:
        if rank == 0:
            from gd.secrets import redacted_yaml

            print(redacted_yaml(cfg, resolve=args.resolve), end="")
        return 0
    return train_from_config(cfg)


def train_from_config(cfg: DictConfig) -> int:
    """Train ``cfg`` with the preemption signals and the STOP file wired to the trainer's ``stop_requested``."""
    requested = threading.Event()
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: requested.set())
    stop_file = Path(cfg.run.dir) / "STOP"

    from gd.train import train
    from gd.train.engine import dist_env

    result = train(cfg, stop_requested=lambda: requested.is_set() or stop_file.exists())
    if dist_env()[0] == 0 and stop_file.exists():
        stop_file.unlink(missing_ok=True)
        logging.getLogger("gd.train").info("stop honoured at step %d; removed %s", result["step"], stop_file)
    logging.getLogger("gd.train").info("result: %s", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
