"""Real 2-process DeepSpeed training on CPU (gloo): ZeRO-2 fp32 and bf16 (the paper's precision) and ZeRO-3, each
against an uninterrupted run of the same engine, through real signals and a crash in a checkpoint write.

  ZeRO-2 fp32: reference; SIGTERM to torchrun at an exact step (PauseAt) -> graceful checkpoint -> resume.
  ZeRO-2 bf16: reference; SIGUSR1 to each worker (as SLURM signals a job's tasks) -> checkpoint -> resume.
  ZeRO-3 fp32: reference; rank 0 SIGKILLed while writing a checkpoint -> resume from the previous one.
Every resumed run must equal its reference bit for bit: losses, final weights, EMA.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.train.conftest import clean_streaming_shm, overrides, reference_run, torchrun, wait
from tests.train.faults import callbacks

pytestmark = pytest.mark.slow
STEPS, CKPT_EVERY = 24, 8


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def final_module(run_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 module weights of the last checkpoint (ZeRO-2 keeps them whole in mp_rank_00_model_states.pt)."""
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    states = torch.load(run_dir / "checkpoints" / latest / "engine" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    return states["module"]


def ema(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "ema.pt", map_location="cpu", weights_only=True)["model"]


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def assert_loss_falls(run_dir: Path) -> None:
    """The per-image loss of conditional micro-batches (``loss_cond``): group micro-batches (null labels, other
    images) have a loss of their own."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plain = [r["loss_cond"] for r in recs if "loss_cond" in r]
    first, last = sum(plain[:3]) / 3, sum(plain[-5:]) / 5
    assert last < 0.85 * first, f"loss did not fall: first steps {first:.4f}, last steps {last:.4f}"


@pytest.fixture(scope="module")
def zero2_reference(fm_shards, tmp_path_factory) -> Path:
    return reference_run(fm_shards, tmp_path_factory, "z2ref", "train.zero_stage=2")


@pytest.fixture(scope="module")
def zero2_bf16_reference(fm_shards, tmp_path_factory) -> Path:
    return reference_run(fm_shards, tmp_path_factory, "z2bf16", "train.zero_stage=2", "train.precision=bf16")


@pytest.fixture(scope="module")
def zero3_reference(fm_shards, tmp_path_factory) -> Path:
    return reference_run(fm_shards, tmp_path_factory, "z3ref", "train.zero_stage=3")


def _workers(proc) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "gd.train" in " ".join(p.cmdline())]


def _preempt(fm_shards, run: Path, log: Path, pause: int, send, *extra: str):
    """Run to step ``pause`` (held there by PauseAt), call ``send(proc)`` to deliver the signal, release the ranks:
    they must agree to stop after the next step, checkpoint it and return. Returns the finished process."""
    release = run.parent / "release"
    pause_at = {"step": pause, "release": release, "until_stop": True}
    proc = torchrun(overrides(fm_shards, run, *extra, callbacks(PauseAt=pause_at)), log)
    while not all((run / f"paused.{r}").exists() for r in (0, 1)):
        assert proc.poll() is None, f"job ended before step {pause}:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    send(proc)
    release.touch()
    wait(proc, log)
    clean_streaming_shm(fm_shards)
    return proc


def _resume_equals(fm_shards, run: Path, reference: Path, log: Path, *extra: str) -> None:
    proc = torchrun(overrides(fm_shards, run, *extra), log)
    assert wait(proc, log) == 0, log.read_text()[-3000:]
    assert "resumed from" in log.read_text()
    assert losses(run) == losses(reference), "per-step losses differ after the resume"
    assert_bitwise(final_module(run), final_module(reference))
    assert_bitwise(ema(run), ema(reference))


def test_zero2_loss_falls_and_exports_ema(zero2_reference):
    curve = losses(zero2_reference)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert_loss_falls(zero2_reference)
    from gd.models import load_model

    model = load_model(zero2_reference / "ema.pt")
    assert model.hidden_size == 64 and model.depth == 2
    assert (zero2_reference / "model.json").is_file() and (zero2_reference / "tb").is_dir()
    kept = sorted(p.name for p in (zero2_reference / "checkpoints").iterdir())
    assert kept == ["latest", "step_00000016", "step_00000024"]  # keep_last=2


def test_logged_throughput_is_flops_times_images_over_peak(zero2_reference):
    """Every logged record: TFLOP/s per device = img/s x (3 x forward FLOPs per image, averaged over the step's
    conditional and group micro-batches) / 2 ranks, and MFU = that / train.peak_tflops (1 in the tiny config).
    Catches FLOPs counted at the wrong group size, a missing x3 for the backward, or a per-device figure not
    divided by the world size."""
    from gd.models import load_model
    from gd.models.flops import forward_flops

    model = load_model(zero2_reference / "ema.pt")
    f1, f4 = forward_flops(model, 1), forward_flops(model, 4)
    recs = [json.loads(line) for line in (zero2_reference / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "img_per_s" in r]
    assert len(recs) == STEPS and any(r["group_frac"] > 0 for r in recs)
    for r in recs:
        per_image = 3 * ((1 - r["group_frac"]) * f1 + r["group_frac"] * f4)
        assert r["tflops_per_device"] == pytest.approx(r["img_per_s"] * per_image / 2 / 1e12, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 1.0, rel=1e-12)


def test_zero2_sigterm_to_torchrun_checkpoints_and_resumes_bitwise(zero2_reference, fm_shards, tmp_path):
    """SIGTERM to torchrun at step 11 (the agent forwards it to both workers): both ranks stop after step 12, write
    checkpoint 12 and exit 0; the resumed run equals the uninterrupted one. Catches a stop honoured by one rank only
    (a hang or a checkpoint of two different steps), a signal that kills instead of stopping, and any state the
    checkpoint misses."""
    run = tmp_path / "run"
    _preempt(fm_shards, run, tmp_path / "log1.txt", 11, lambda proc: proc.send_signal(signal.SIGTERM),
             "train.zero_stage=2")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert {p.name for p in (run / "checkpoints" / "step_00000012").glob("rank_*.pt")} == {
        "rank_00000.pt", "rank_00001.pt"}
    assert max(losses(run)) == 12 and not (run / "ema.pt").exists()
    _resume_equals(fm_shards, run, zero2_reference, tmp_path / "log2.txt", "train.zero_stage=2")


def test_zero2_bf16_sigusr1_to_workers_resumes_bitwise(zero2_bf16_reference, fm_shards, tmp_path):
    """The paper's precision (DeepSpeed bf16, fp32 masters): SIGUSR1 to each worker, as SLURM signals a job's tasks,
    at step 9; the workers checkpoint step 10 and torchrun exits 0; the resume equals the uninterrupted bf16 run bit
    for bit (fp32 masters, EMA, loader and RNG state all restored)."""
    run = tmp_path / "run"

    def send(proc):
        workers = _workers(proc)
        assert len(workers) == 2
        for w in workers:
            w.send_signal(signal.SIGUSR1)

    proc = _preempt(fm_shards, run, tmp_path / "log1.txt", 9, send, "train.zero_stage=2", "train.precision=bf16")
    assert proc.returncode == 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    _resume_equals(fm_shards, run, zero2_bf16_reference, tmp_path / "log2.txt", "train.zero_stage=2",
                   "train.precision=bf16")


def test_zero3_interrupted_checkpoint_resumes_like_an_uninterrupted_zero3_run(zero3_reference, fm_shards,
                                                                             tmp_path):
    """Rank 0 SIGKILLed while writing checkpoint 16: `latest` still names 8, the partial folder is removed on
    resume, and the resumed run equals the uninterrupted ZeRO-3 run bit for bit."""
    run, log = tmp_path / "run", tmp_path / "log1.txt"
    args = overrides(fm_shards, run, "train.zero_stage=3")
    proc = torchrun([*args, callbacks(KillInCheckpoint={"step": 2 * CKPT_EVERY})], log)
    assert wait(proc, log) != 0
    clean_streaming_shm(fm_shards)
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{CKPT_EVERY:08d}"
    partial = ckpts / f".tmp-step_{2 * CKPT_EVERY:08d}"
    assert partial.is_dir() and any((partial / "engine").iterdir()), "the write was not interrupted mid-way"
    assert not (ckpts / f"step_{2 * CKPT_EVERY:08d}").exists()
    first = losses(run)
    assert max(first) >= 2 * CKPT_EVERY

    log2 = tmp_path / "log2.txt"
    proc = torchrun(args, log2)
    assert wait(proc, log2) == 0, log2.read_text()[-3000:]
    assert f"(step {CKPT_EVERY})" in log2.read_text()  # resumed from the previous complete checkpoint
    assert not partial.exists()
    got, ref = losses(run), losses(zero3_reference)
    assert got == ref
    for step in range(CKPT_EVERY + 1, 2 * CKPT_EVERY + 1):  # the re-done steps equal the first attempt's
        assert got[step] == first[step], f"step {step}: {got[step]} != {first[step]}"
    assert_loss_falls(run)
    assert_bitwise(ema(run), ema(zero3_reference))


def test_bf16_ema_shards_gather_fp32_masters(tmp_path):
    """bf16, 2 ranks, ZeRO-1/2 (optimizer-partition fragments) and ZeRO-3: decay-0 EMA == full fp32 masters."""
    import os
    import subprocess
    import sys

    from tests.train.conftest import REPO, torchrun_cmd

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [*torchrun_cmd(2), str(REPO / "tests" / "train" / "bf16_ema_worker.py")]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("stage ")]
    assert [line.split(":")[0] for line in lines] == ["stage 1", "stage 2", "stage 3"], out[-3000:]
    for line in lines:
        assert "equal=True" in line and "off_grid=0" not in line, line
    assert "source=hp_mapping" in lines[0] and "source=zero3_fp32" in lines[2]
