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


def hydra_main(config_name: str, groups: tuple[str, ...] | None = None
               ) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """``hydra.main`` on ``conf/<config_name>.yaml`` for every gd entry point, with credentials kept out of what hydra
    itself prints: it echoes override values in its errors ("Error executing job with overrides: [...]",
    composition hints such as "To append to your config use +key=value"), and in ``--cfg``/``--help``. Everything
    printed outside the task is redacted (:func:`gd.secrets.redacted_output`); the task's own output is not.
    ``groups``: the config groups the entry point reads (None: all of conf/'s); a ``+key`` no conf/ file declares,
    or a group it does not read, is refused before the task (:func:`unknown_appends`). A refused or failed task, or
    a dry run (``launcher.dry_run``), leaves nothing behind: the folders hydra made for its log are removed again
    when they hold nothing but logs. The task returns its exit code (0 or None: success)."""
    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def run() -> Any:
            import hydra
            from omegaconf import OmegaConf

            from gd.secrets import redacted_output

            result: list[Any] = []
            dry = []
            made = _first_missing_output_folder(config_name, sys.argv[1:])
            failed = True
            try:
                with redacted_output(sys.argv[1:]) as guard:
                    @functools.wraps(task)  # hydra names the job after the wrapped task's module
                    def job(cfg: DictConfig) -> None:
                        dry.append(bool(OmegaConf.select(cfg, "launcher.dry_run", default=False)))
                        refuse_unknown_appends(sys.argv[1:], cfg, _program(task), groups)
                        with guard.passthrough():
                            result.append(task(cfg))

                    hydra.main(version_base="1.3", config_path=config_path(), config_name=config_name)(job)()
                failed = not result or result[-1] not in (0, None) or any(dry)
            finally:
                if made is not None and failed:
                    _remove_if_only_logs(made)
            return result[-1] if result else None

        return run

    return decorate


class UnknownKeyError(ValueError):
    """A ``+key=value`` override adding a key that no conf/ file declares."""


def unknown_appends(overrides: list[str], cfg: DictConfig, groups: tuple[str, ...] | None = None) -> list[str]:
    """One message per ``+key=value`` override that adds a key no conf/ file declares, so that nothing reads it
    (hydra itself suggests the ``+`` when a key is misspelt). A ``+`` is for a config group (``+exp=``,
    ``+cluster=``) or a key under an open mapping, one conf/ declares empty (``cluster.env``, ``train.deepspeed``,
    ``sample.model_overrides``): every key the composed mapping holds was then appended. ``groups``: the groups the
    entry point reads (None: every folder of conf/)."""
    import difflib

    from omegaconf import OmegaConf

    appended: dict[str, list[str]] = {}
    for arg in overrides:
        if arg.startswith("+") and not arg.startswith("++") and "=" in arg:
            key = arg[1:].partition("=")[0]
            parent = key.rpartition(".")[0]
            appended.setdefault(parent, []).append(key)
    readable = set(config_groups()) if groups is None else set(groups)
    problems = []
    for parent, keys in appended.items():
        node = OmegaConf.select(cfg, parent) if parent else cfg
        names = [k.rpartition(".")[2] for k in keys]
        if not parent:
            keys = [k for k in keys if k not in readable]
            names = keys
        if not keys or (parent and isinstance(node, DictConfig) and set(node.keys()) <= set(names)):
            continue
        known = [str(k) for k in node.keys() if str(k) not in names] if isinstance(node, DictConfig) else []
        for key, name in zip(keys, names):
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {(parent + '.' if parent else '') + near[0]}?" if near else ""
            problems.append(f"unknown key {key} (+{key}=...): no conf/ file declares it, so nothing would read it"
                            f"{hint} (a '+' adds a config group or a key under an open mapping such as cluster.env)")
    return problems


def refuse_unknown_appends(overrides: list[str], cfg: DictConfig, program: str,
                           groups: tuple[str, ...] | None = None) -> None:
    """:func:`unknown_appends` for an entry point: the problems on one line each, exit code 2."""
    problems = unknown_appends(overrides, cfg, groups)
    if problems:
        for problem in problems:
            print(f"gd.{program}: {problem}", file=sys.stderr)
        raise SystemExit(2)


def _first_missing_output_folder(config_name: str, argv: list[str]) -> Path | None:
    """The first folder on the way to hydra's output folder (``hydra.run.dir``) that does not exist yet: what
    hydra will make for this call. None when it exists, or the overrides do not compose (hydra then makes nothing)."""
    from hydra import compose, initialize_config_dir, initialize_config_module

    overrides = [a for a in argv if not a.startswith("-")]
    if len(overrides) != len(argv) or any(a in ("-m", "--multirun") for a in argv):
        return None  # --help, --cfg, a sweep: hydra writes no output folder
    conf = source_conf_dir()
    init = (initialize_config_dir(config_dir=str(conf), version_base="1.3") if conf is not None
            else initialize_config_module(config_module=PACKAGE, version_base="1.3"))
    try:
        with init:
            out = Path(str(compose(config_name=config_name, overrides=overrides,
                                   return_hydra_config=True).hydra.run.dir)).resolve()
    except Exception:  # noqa: BLE001 - hydra reports the composition error itself, before making anything
        return None
    missing = None
    for folder in (out, *out.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _remove_if_only_logs(folder: Path) -> None:
    """Remove ``folder`` (made by this call) when every file below it is a log."""
    import logging
    import shutil

    if not folder.is_dir() or any(p.is_file() and not p.name.endswith(".log") for p in folder.rglob("*")):
        return
    for handler in logging.getLogger().handlers[:]:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(folder):
            handler.close()
            logging.getLogger().removeHandler(handler)
    shutil.rmtree(folder, ignore_errors=True)


def _program(task: Callable[..., Any]) -> str:
    """``launch`` for gd.launch's task, also when it runs as ``python -m gd.launch`` (module ``__main__``)."""
    module = task.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else module
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "gd" else module


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
