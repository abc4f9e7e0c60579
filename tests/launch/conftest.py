"""Helpers for the launcher tests: compose configs in-process, run `python -m gd.launch` in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[2]
# The demo's own recipe follows what the method benchmark finds; the launch and resume tests built on it pin the
# settings their step and batch-plan arithmetic was written for (N=4, a 4-micro-batch plan block).
DEMO_MECHANICS = ["diffusion=groupdiff_l", "diffusion.p_group=0.25", "model.max_group_size=4"]


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def run_launch(*overrides: str, cwd: Path, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m gd.launch <overrides>` with the repo's interpreter, from `cwd` (run.root=runs is relative)."""
    env = dict(env or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "gd.launch", *overrides], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> Path:
    """256 Fashion-MNIST images as 1x16x16 pixel latents with groups of up to 4, built once per session."""
    base = tmp_path_factory.mktemp("launch-shards")
    out = base / "shards"
    build = subprocess.run([sys.executable, str(REPO / "tools" / "build_shards.py"), f"out={out}",
                            f"work_dir={base / 'work'}", "limit=256", "image_size=16", "progress=false",
                            f"sources.fashion_mnist.root={fashion_mnist_dir}"],
                           cwd=base, capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    return out


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """Trained weights of the last checkpoint plus the exported EMA."""
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    engine = torch.load(run_dir / "checkpoints" / Path(latest).name / "engine" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    ema = torch.load(run_dir / "ema.pt", map_location="cpu", weights_only=False)["model"]
    return {**{f"model.{k}": v for k, v in engine["module"].items()}, **{f"ema.{k}": v for k, v in ema.items()}}


def job_logs(run_dir: Path, rank: int | str = 0) -> str:
    """stdout and stderr of ``rank`` ("*": every rank) over every launch and attempt of the run."""
    files = sorted((run_dir / "submitit").rglob(f"*_{rank}_log.*"))
    return "".join(p.read_text(errors="replace") for p in files)
