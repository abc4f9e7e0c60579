"""``python -m gd.train <hydra overrides>``: compose conf/config.yaml and train (one process, or under torchrun).

Preemption: SIGUSR1 or SIGTERM, or a file ``<run.dir>/STOP``, asks the trainer (through ``stop_requested``) to
checkpoint on every rank and return; a later launch in the same run.dir resumes from that checkpoint. Once train()
has returned (the stop honoured, the checkpoint written), rank 0 deletes ``STOP``, so the next launch trains on
instead of stopping again after one step.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(overrides: list[str]) -> DictConfig:
    """conf/config.yaml with hydra overrides (as on the command line)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = compose_config(list(sys.argv[1:] if argv is None else argv))
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
