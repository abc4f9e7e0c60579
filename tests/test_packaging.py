"""The wheel works without the source tree: it holds every module and the hydra configs (conf/ as gd/conf), and its
console scripts run from outside the repository.

How, and why this way. The wheel is built from a copy of the checkout's files (the tree itself stays clean) with the
test environment's setuptools (``--no-build-isolation --no-index``: nothing is downloaded). It is installed with
``--no-deps`` into a fresh venv made ``--without-pip`` (instant). The dependencies come from the test environment:
a ``.pth`` file in the fresh venv adds the test environment's site-packages directory to ``sys.path``. That gives
torch, hydra, DeepSpeed... without a multi-GB install, but not gd: the test environment's editable install of gd
is a ``.pth`` hook that Python runs only for site directories, and a directory named by a ``.pth`` line is not one
(``--system-site-packages`` would not help either: the base interpreter has none of the dependencies, and a venv
made from the test venv's interpreter would inherit its editable gd). The fresh venv's own site-packages come first
on ``sys.path``, so ``gd`` is the wheel's; each script then runs with the repository out of reach (working
directory elsewhere, no PYTHONPATH) and the test checks that gd and its configs were read from the venv.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-w", str(base / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (whl,) = (base / "dist").glob("groupdiff-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "gd_test_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                          str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return root


def run(venv: Path, cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DS_ACCELERATOR"] = "cpu"
    return subprocess.run([str(venv / "bin" / cmd[0]), *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_wheel_holds_every_module_and_config(wheel):
    """Catches a package or config folder missing from the wheel (a new subpackage the packaging does not find,
    conf/ not shipped): every gd/**/*.py and conf/**/*.yaml of the checkout is in it, configs under gd/conf/."""
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(REPO)) for p in (REPO / "gd").rglob("*.py")}
    configs = {"gd/" + str(p.relative_to(REPO)) for p in (REPO / "conf").rglob("*.yaml")}
    assert modules - names == set() and configs - names == set()
    assert "gd/conf/__init__.py" in names and "gd/conf/exp/groupdiff4.yaml" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    for script in ("gd-launch", "gd-train", "gd-build-shards", "gd-sample", "gd-evaluate"):
        assert f"{script} = " in scripts


@pytest.mark.parametrize("script,needle", [("gd-launch", "gd-launch -m +cluster=slurm"),
                                           ("gd-train", "usage: python -m gd.train"),
                                           ("gd-build-shards", "gd-build-shards"),
                                           ("gd-sample", "gd-sample / gd-evaluate"),
                                           ("gd-evaluate", "gd-sample / gd-evaluate")])
def test_console_scripts_answer_help_outside_the_repo(venv, tmp_path, script, needle):
    out = run(venv, tmp_path, script, "--help")
    assert out.returncode == 0 and needle in out.stdout, out.stderr[-2000:]


def test_installed_package_reads_its_own_configs(venv, tmp_path):
    """Catches configs read from the repository instead of the package (a non-editable install would find none)
    and an installed gd that is not the wheel's: gd comes from the venv, its configs from pkg://gd.conf, and
    gd-train and gd-launch compose an experiment from them."""
    where = run(venv, tmp_path, "python", "-c", "import gd, gd.config; print(gd.__file__, gd.config.config_path())")
    assert where.returncode == 0, where.stderr
    path, conf = where.stdout.split()
    assert Path(path).is_relative_to(venv) and conf == "pkg://gd.conf"
    cfg = run(venv, tmp_path, "gd-train", "--cfg", "job", "--resolve", "+exp=groupdiff4")
    assert cfg.returncode == 0 and "name: SiT-XL/2" in cfg.stdout and "max_group_size: 4" in cfg.stdout, cfg.stderr
    dry = run(venv, tmp_path, "gd-launch", "+cluster=local", "+exp=demo", "launcher.dry_run=true",
              "launcher.check_data=false", f"run.root={tmp_path / 'runs'}")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "# gd.launch dry run: run demo, task train" in dry.stdout
