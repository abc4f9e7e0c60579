"""Every command README.md and docs/ show still works as written: it composes, adds no key that no conf/ file
declares, and (gd-launch) passes the launch checks a dry run makes. Files and buckets the commands name are not on
this machine, so the checks that read them are left out (the data check; an init_from file is checked to be
named, not read); the site config is the one the README shows, written where it says."""
from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "slurm" / "README.md"]
PROGRAMS = {"gd-launch": "gd.launch", "gd-train": "gd.train", "gd-evaluate": "gd.evaluate", "gd-sample": "gd.sample",
            "gd-build-shards": "gd.build_shards", "tools/build_shards.py": "gd.build_shards"}


def _fenced_commands(page: Path) -> list[str]:
    """The gd commands in a page's ```bash blocks, continuation lines joined, trailing comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            if _program(words) is not None:
                commands.append(" ".join(shlex.quote(w) for w in words))
    return commands


def _program(words: list[str]) -> tuple[str, list[str]] | None:
    """(module, overrides) of a gd command line, or None."""
    while words and (words[0] in ("python", "python3", "torchrun") or words[0].startswith("--")):
        takes_value = words[0].startswith("--") and "=" not in words[0] and len(words) > 1 and words[1].isdigit()
        words = words[2:] if takes_value else words[1:]  # torchrun --nproc_per_node 8
    if len(words) >= 2 and words[0] == "-m" and words[1] in PROGRAMS.values():
        return words[1], words[2:]  # the five entry points (benchmarks compose configs of their own)
    for name, module in PROGRAMS.items():
        if words and words[0].endswith(name):
            return module, words[1:]
    return None


COMMANDS = [(page.relative_to(REPO).as_posix(), cmd) for page in PAGES for cmd in _fenced_commands(page)]


@pytest.fixture(scope="module")
def site_home(tmp_path_factory) -> Path:
    """$HOME with the README's site config in ~/gd-site/cluster/mysite.yaml."""
    home = tmp_path_factory.mktemp("home")
    text = (REPO / "README.md").read_text()
    block = re.search(r"```yaml\n\s*# ~/gd-site/cluster/mysite.yaml\n(.*?)```", text, flags=re.S)
    assert block, "README.md no longer shows the site config ~/gd-site/cluster/mysite.yaml"
    (home / "gd-site" / "cluster").mkdir(parents=True)
    (home / "gd-site" / "cluster" / "mysite.yaml").write_text(textwrap.dedent(block.group(1)))
    return home


def test_the_pages_show_commands():
    readme = [c for page, c in COMMANDS if page == "README.md"]
    assert len(readme) >= 7 and any("gd.launch" in c or "gd-launch" in c for c in readme)


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{i}" for i, (p, _) in enumerate(COMMANDS)])
def test_a_documented_command_composes_and_passes_the_launch_checks(page, command, site_home, monkeypatch):
    from gd.config import compose_config, unknown_appends

    monkeypatch.setenv("HOME", str(site_home))
    module, args = _program(shlex.split(command))
    args = [a.replace("$HOME", str(site_home)) for a in args]
    if module == "gd.launch" and args[:1] == ["status"]:
        return  # reads run folders, no config (tests/launch/test_status.py)
    overrides = [a for a in args if not a.startswith("-") and a != "job"]
    name = {"gd.evaluate": "evaluate", "gd.sample": "evaluate", "gd.build_shards": "build_shards"}.get(module, "config")
    groups = () if module == "gd.build_shards" else None
    if "-m" in args or "--multirun" in args:
        from gd.launch.sweep import expand

        members = [m.overrides for m in expand(overrides)]
    else:
        members = [overrides]
    for member in members:
        cfg = compose_config(member, config_name=name)
        assert unknown_appends(member, cfg, groups) == [], f"{page}: {command}"
        if module == "gd.launch":
            _launch_checks(cfg, page, command)


def _launch_checks(cfg, page: str, command: str) -> None:
    from gd.launch.validate import validate

    with open_dict(cfg):
        cfg.launcher.check_data = False
        if OmegaConf.select(cfg, "train.init_from"):
            cfg.train.init_from = None  # a file of this size is not here; the key itself composed above
        if cfg.task != "train" and OmegaConf.select(cfg, "sample.ckpt"):
            cfg.task = "train"  # a sampling task checks that its checkpoint exists: not on this machine
    validate(cfg)
