"""Sweeps: ``python -m gd.launch -m ... diffusion.group_size=2,4,8,16`` expands hydra's sweep grammar into members.

Hydra's own multirun runs the task once per member in this process; gd.launch instead expands the overrides with
hydra's parser and sweeper (``a,b``, ``range()``, ``choice()``, ``glob()``, several swept keys = their product),
composes every member, validates them all and then submits them together: one SLURM job array, so the queue sees
one entry and nothing is submitted when any member is wrong. Nothing of hydra's multirun output (``multirun/``,
``multirun.yaml`` with the raw overrides) is written.

Each member is a run of its own, named from its swept overrides: the member ``diffusion.group_size=4`` of
``run.name=groupdiff4`` is ``run.name=groupdiff4/diffusion.group_size=4``, in ``<run.root>/groupdiff4/
diffusion.group_size=4/``. Relaunching the sweep resumes every member, and any member can be relaunched alone with
its run.name.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from omegaconf import DictConfig, open_dict

from gd.launch.errors import LaunchError

# Keys that place the run themselves: a member keeps them as given instead of naming a sub-folder after them.
PLACEMENT = ("run.name", "run.root", "run.dir")
SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
MAX_NAME = 120


@dataclass(frozen=True)
class Member:
    """One run of a sweep: its label (the swept overrides, a folder name) and its full override list."""

    label: str
    overrides: list[str]


def expand(overrides: list[str]) -> list[Member]:
    """Every combination of the swept overrides, in hydra's order; LaunchError for a bad override or a sweep that
    names two members alike."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(list(overrides))
        swept = [o.get_key_element() for o in parsed if o.is_sweep_override()]
        combos = BasicSweeper.split_arguments(parsed, None)[0]
    except HydraException as err:
        raise LaunchError(f"cannot expand the sweep: {err}") from err
    if not swept:
        raise LaunchError("-m/--multirun without a swept override: give one key several values (key=a,b,c), "
                          "or drop -m to launch a single run")
    naming = [k for k in swept if k.lstrip("+~") not in PLACEMENT]
    members, places = [], []
    for combo in combos:
        values = {o.get_key_element(): o.get_value_element_as_str() for o in parser.parse_overrides(combo)}
        members.append(Member(member_label([(k.lstrip("+~"), values[k]) for k in naming]), combo))
        places.append((tuple(values[k] for k in swept if k not in naming), members[-1].label))
    twice = sorted({" ".join(filter(None, (*p[0], p[1]))) for p in places if places.count(p) > 1})
    if twice:
        raise LaunchError(f"the sweep names several members alike ({', '.join(twice)}): a swept key repeats a value")
    return members


def member_label(pairs: list[tuple[str, str]]) -> str:
    """``key=value,key=value`` as a folder name: characters other than letters, digits and ``._=,+-`` become ``_``,
    and a name that had to change (or is over 120 characters) ends with a hash of the original, so no two members
    share a folder."""
    raw = ",".join(f"{k}={v}" for k, v in pairs)
    safe = SAFE.sub("_", raw)
    if safe != raw or len(safe) > MAX_NAME:
        safe = f"{safe[:MAX_NAME]}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
    return safe


def place(cfg: DictConfig, label: str) -> None:
    """Put the member in ``<run.dir>/<label>`` under the run name ``<run.name>/<label>`` (an empty label: a sweep over
    run names only, each member keeps its own)."""
    if not label:
        return
    run_dir = str(cfg.run.dir)
    with open_dict(cfg):
        cfg.run.name = f"{cfg.run.name}/{label}"
        cfg.run.dir = f"{run_dir.rstrip('/')}/{label}"
