"""Launch a run: hydra composes the config, gd.launch validates it and hands it to submitit (local or SLURM).

`python -m gd.launch +cluster=local|slurm +exp=<name> [task=train|sample|evaluate] [overrides]`
"""
from gd.launch.errors import LaunchError

__all__ = ["LaunchError"]
