"""Trainer test fixtures: Fashion-MNIST shards (pixels, 8x8, real gd.data build), tiny-SiT overrides, a torchrun
launcher (own process group, so a test can signal the whole job) and shared-memory cleanup."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.fixtures.shm import clean_streaming_shm  # noqa: F401  (re-exported for the train tests)

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "train=tiny", "model.input_size=8", "model.in_channels=1", "model.num_classes=10", "model.hidden_size=64",
    "model.depth=2", "model.num_heads=4", "model.max_group_size=4", "model.learn_sigma=false",
    "diffusion=groupdiff_l", "diffusion.group_size=4", "diffusion.p_group=0.25", "data.shuffle=true",
]


@pytest.fixture(scope="session")
def fm_shards(tmp_path_factory, fashion_mnist_dir):
    """256 Fashion-MNIST training images at 8x8 in pixel space, grouped by pixel similarity (N <= 4)."""
    from gd.data.build import BuildConfig, Builder

    base = tmp_path_factory.mktemp("train_shards")
    cfg = BuildConfig(out=str(base / "out"), work_dir=str(base / "work"), source="fashion_mnist",
                      source_kw={"root": str(fashion_mnist_dir), "split": "train"}, image_size=8, limit=256,
                      encoder="pixels", encoder_kw={"channels": 1}, embedder="pixels", embedder_kw={"size": 8},
                      n_max=4, k=8, chunk_size=256, batch_size=64, progress=False)
    Builder(cfg).run()
    yield base / "out"
    clean_streaming_shm(base / "out")


def overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={shards}", f"data.cache={run_dir}/cache", f"run.dir={run_dir}", *extra]


def torchrun_cmd(nproc: int = 2) -> list[str]:
    """``torchrun --standalone``: it binds a free rendezvous port itself (no pick-then-bind race)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def torchrun(args: list[str], log: Path, nproc: int = 2) -> subprocess.Popen:
    """``torchrun --nproc_per_node nproc -m gd.train args`` in a new session (its own process group)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1"}
    cmd = [*torchrun_cmd(nproc), "-m", "gd.train", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait(proc: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"torchrun did not finish in {timeout} s; log tail:\n{log.read_text()[-3000:]}")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal torchrun and every worker, and wait until all are gone.

    torch elastic starts its workers in sessions of their own, so a signal to torchrun's process group misses
    them: a "killed" run would keep training beside the resumed one. The tree is collected before the signal.
    """
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, f"processes survived signal {sig}: {alive}"
    proc.wait(timeout=60)


def reference_run(fm_shards: Path, tmp_path_factory, name: str, *extra: str, nproc: int = 2) -> Path:
    """An uninterrupted tiny run on ``nproc`` processes; its run dir."""
    run = tmp_path_factory.mktemp(name) / "run"
    log = run.parent / "log.txt"
    proc = torchrun(overrides(fm_shards, run, *extra), log, nproc=nproc)
    assert wait(proc, log) == 0, log.read_text()[-3000:]
    return run


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Block until ``metrics.jsonl`` has a record for ``step`` (or fail if the job ended first)."""
    deadline = time.time() + timeout
    needle = f'{{"step": {step}, "loss"'
    while time.time() < deadline:
        if metrics.is_file() and needle in metrics.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"job ended (rc {proc.returncode}) before step {step}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    kill_group(proc)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="session", autouse=True)
def _clean_shared_memory():
    """DeepSpeed's CPU all-reduce buffers and streaming's segments outlive killed jobs: remove the ones we made."""
    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    yield
    for path in set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) - before:
        try:
            os.unlink(path)
        except OSError:
            pass

