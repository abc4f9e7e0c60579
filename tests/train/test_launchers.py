"""``python -m gd.train`` under the launchers people use beside gd.launch: DeepSpeed's (``deepspeed --module``, which
passes ``--local_rank`` and names the per-node process count LOCAL_SIZE) and torchrun with a typo'd override."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.train.conftest import REPO, clean_streaming_shm, overrides, torchrun, wait

pytestmark = pytest.mark.slow


def _free_port() -> int:
    """DeepSpeed's launcher has no way to bind a rendezvous port itself (torchrun's --standalone does): it takes one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_launcher_trains_two_ranks(fm_shards, tmp_path):
    """Catches gd.train refusing DeepSpeed's ``--local_rank=N`` argument, and the two ranks each creating streaming's
    per-node shared memory (DeepSpeed sets LOCAL_SIZE, streaming reads LOCAL_WORLD_SIZE: without the translation
    the second rank fails with FileExistsError)."""
    run = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
           "--module", "gd.train", *overrides(fm_shards, run, "train.steps=1", "train.ckpt_every=100")]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    clean_streaming_shm(fm_shards)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "--local_rank=1" in out.stdout + out.stderr  # the launcher did pass it
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1] and (run / "ema.pt").is_file()


def test_typo_under_torchrun_prints_one_error(tmp_path):
    """Catches a config error reported once per rank with a traceback each: rank 0 alone says what is wrong (the
    key and hydra's hint), the others exit quietly; torchrun's own failure summary follows."""
    log = tmp_path / "torchrun.log"
    code = wait(torchrun(["train=tiny", "model.hiden_size=3"], log), log, timeout=120)
    text = log.read_text()
    assert code != 0
    assert text.count("gd.train: the config does not compose: Could not override 'model.hiden_size'") == 1
    assert "To append to your config use +model.hiden_size=3" in text
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text
    assert "hydra.errors" not in text
