"""Where the hydra configs live, for every entry point: ``conf/`` of a source checkout, else the copy a wheel installs.

``conf/`` at the top of the repository is the source of truth; the wheel ships it as package data ``gd/conf``
(setup.py maps it), read through hydra's ``pkg://gd.conf``. A checkout (editable install, ``PYTHONPATH`` or the
working directory) always reads its own ``conf/``, so a worktree never picks up another checkout's configs.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

PACKAGE = "gd.conf"
_SOURCE = Path(__file__).resolve().parents[1]


def source_conf_dir() -> Path | None:
    """``conf/`` beside the imported ``gd`` package when it is a source checkout (it has pyproject.toml), else None."""
    conf = _SOURCE / "conf"
    if (conf / "config.yaml").is_file() and (_SOURCE / "pyproject.toml").is_file():
        return conf
    return None


def config_path() -> str:
    """``config_path`` for ``hydra.main``: the checkout's absolute ``conf/`` path, or ``pkg://gd.conf``."""
    conf = source_conf_dir()
    return str(conf) if conf is not None else f"pkg://{PACKAGE}"


def hydra_main(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """``hydra.main`` on ``conf/<config_name>.yaml`` for every gd entry point, with credentials kept out of what hydra
    itself prints: it echoes override values in its errors ("Error executing job with overrides: [...]",
    composition hints such as "To append to your config use +key=value"), and in ``--cfg``/``--help``. Everything
    printed outside the task is redacted (:func:`gd.secrets.redacted_output`); the task's own output is not."""
    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def run() -> Any:
            import hydra

            from gd.secrets import redacted_output

            result: list[Any] = []
            with redacted_output(sys.argv[1:]) as guard:
                @functools.wraps(task)  # hydra names the job after the wrapped task's module
                def job(cfg: DictConfig) -> None:
                    with guard.passthrough():
                        result.append(task(cfg))

                hydra.main(version_base="1.3", config_path=config_path(), config_name=config_name)(job)()
            return result[-1] if result else None

        return run

    return decorate


def read_yaml(name: str) -> DictConfig:
    """One config file (e.g. ``evaluate.yaml``) loaded as it is, without composition."""
    from importlib import resources

    from omegaconf import OmegaConf

    conf = source_conf_dir()
    if conf is not None:
        return OmegaConf.load(conf / name)
    with resources.files(PACKAGE).joinpath(name).open(encoding="utf-8") as f:
        return OmegaConf.load(f)


def compose_config(overrides: list[str], config_name: str = "config") -> DictConfig:
    """``conf/<config_name>.yaml`` with hydra overrides (as on the command line)."""
    from hydra import compose, initialize_config_dir, initialize_config_module

    conf = source_conf_dir()
    init = (initialize_config_dir(config_dir=str(conf), version_base="1.3") if conf is not None
            else initialize_config_module(config_module=PACKAGE, version_base="1.3"))
    with init:
        return compose(config_name=config_name, overrides=list(overrides))


def config_groups() -> dict[str, list[str]]:
    """Each config group (a folder of conf/) and its options, for ``--help`` texts."""
    from importlib import resources

    conf = source_conf_dir()
    root = conf if conf is not None else resources.files(PACKAGE)
    return {d.name: sorted(f.name[:-5] for f in d.iterdir() if f.name.endswith(".yaml"))
            for d in sorted(root.iterdir(), key=lambda p: p.name) if d.is_dir() and not d.name.startswith("_")}
