"""A tiny randomly initialised GroupDiff model exported like the trainer's ema.pt, and config composition."""
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from gd.models import build_model, save_model

    torch.manual_seed(0)
    model = build_model("SiT-S/2", input_size=8, in_channels=1, num_classes=10, hidden_size=64, depth=2,
                        num_heads=4, max_group_size=4)
    path = tmp_path_factory.mktemp("ckpt") / "ema.pt"
    save_model(model, path)
    return path


def sample_overrides(ckpt: Path, out: Path, **kw) -> list[str]:
    opts = {"num_images": 40, "group_size": 4, "mode": "l", "method": "sde", "steps": 6, "cfg_scale": 2.0,
            "batch_groups": 2, "device": "cpu", "progress": False, **kw}
    return [f"ckpt={ckpt}", f"sample.out={out}", f"run.root={out.parent / 'runs'}"] + [
        f"sample.{k}={v}" for k, v in opts.items()]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


def run_module(args: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    """Start `python -m ...` in the repo with one torch thread (bit-identical across processes)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=full_env, **popen)


def fashion_mnist_images(root: Path, count: int, offset: int = 0) -> np.ndarray:
    """uint8 (count, 28, 28) test images from Debian's idx files."""
    with gzip.open(root / "t10k-images-idx3-ubyte.gz") as fh:
        data = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return data[offset:offset + count]
