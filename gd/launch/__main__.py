"""Entry point (``python -m gd.launch`` or ``gd-launch``):

    gd-launch +cluster=local|slurm +exp=demo [key=value ...]          one run (conf/config.yaml + overrides)
    gd-launch -m +cluster=slurm +exp=groupdiff4 diffusion.group_size=2,4,8,16 data.root=...   a sweep
    gd-launch status [PATH ...]                                        where the runs of a sweep (or a root) stand

A single run goes through hydra's own entry (``--help``, ``--cfg job``, ``hydra.*`` overrides). A sweep is expanded
and composed here (gd.launch.sweep) rather than by hydra's multirun, which would run the launcher once per member
and could not submit them as one job array.
"""
from __future__ import annotations

import sys

from omegaconf import DictConfig

from gd.config import hydra_main
from gd.launch.errors import LaunchError
from gd.launch.submit import launch

MULTIRUN = ("-m", "--multirun")
_codes: list[int] = []


@hydra_main("config")
def _single(cfg: DictConfig) -> int:
    # Return, never sys.exit, from inside hydra's task: hydra may run it again (and prints help, --cfg without it).
    try:
        _codes.append(launch(cfg))
    except LaunchError as err:
        print(f"gd.launch: {err}", file=sys.stderr)
        _codes.append(2)
    return _codes[-1]


def sweep(overrides: list[str]) -> int:
    """Expand, compose and launch a sweep; a member that does not compose is named in the error."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from gd.config import compose_config, unknown_appends
    from gd.launch.submit import launch_sweep
    from gd.launch.sweep import expand
    from gd.logs import configure_logging

    configure_logging(0)
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        raise LaunchError(f"a sweep (-m) takes overrides only, not {' '.join(flags)}; add launcher.dry_run=true to "
                          "see what would be submitted")
    members = []
    for member in expand(overrides):
        try:
            cfg = compose_config(member.overrides)
        except (HydraException, OmegaConfBaseException) as err:
            raise LaunchError(f"sweep member {member.label or ' '.join(member.overrides)} does not compose: "
                              f"{err}") from err
        unknown = unknown_appends(member.overrides, cfg)
        if unknown:
            raise LaunchError("; ".join(unknown))
        members.append((member.label, cfg))
    return launch_sweep(members)


def main() -> int:
    """The console script: dispatches to status, a sweep or hydra's single-run entry; returns the exit code."""
    argv = sys.argv[1:]
    if argv[:1] == ["status"]:
        from gd.launch.status import main as status

        return status(argv[1:])
    if any(a in MULTIRUN for a in argv):
        try:
            return sweep([a for a in argv if a not in MULTIRUN])
        except LaunchError as err:  # a member that does not compose: hydra's message may echo an override
            from gd.secrets import output_redactor

            print(f"gd.launch: {output_redactor(argv)(str(err))}", file=sys.stderr)
            return 2
    _single()
    return _codes[-1] if _codes else 0


if __name__ == "__main__":
    sys.exit(main())
