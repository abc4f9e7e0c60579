"""Launch runs: hydra composes the config, gd.launch validates it and hands it to submitit (local or SLURM).

`python -m gd.launch +cluster=local|slurm +exp=<name> [task=train|sample|evaluate] [overrides]` (or `gd-launch`);
`-m` with swept overrides (`key=a,b`) launches a sweep as one SLURM job array (gd.launch.sweep); `gd-launch status`
shows where the runs stand (gd.launch.status).
"""
from gd.launch.errors import LaunchError

__all__ = ["LaunchError"]
