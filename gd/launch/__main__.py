"""Entry point: `python -m gd.launch +cluster=local|slurm +exp=demo [key=value ...]` (see conf/config.yaml)."""
import sys

import hydra
from omegaconf import DictConfig

from gd.launch.errors import LaunchError
from gd.launch.submit import launch


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        code = launch(cfg)
    except LaunchError as err:
        print(f"gd.launch: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
