"""A checkpoint is untrusted input: resuming never unpickles code, and refuses files others could have written.

One tiny in-process training run (world of 1, ZeRO-2, fp32) writes a checkpoint; copies of its run dir are then
tampered with and resumed through ``gd.train.train``. Separately, DeepSpeed's own files of every ZeRO stage in fp32
and bf16 must round-trip through the weights-only checkpoint engine.
"""
from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path

import pytest
import torch

from gd.train.checkpoint import (CheckpointManager, UntrustedCheckpointError, check_trusted, plain_state, rng_state,
                                 set_rng_state)
from tests.train.conftest import clean_streaming_shm, overrides

STEP = "step_00000002"


class _Payload:
    """Unpickling this creates ``marker``: what an attacker's checkpoint would do with os.system instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _compose(*args: str):
    from gd.train.__main__ import compose_config

    return compose_config(list(args))


@pytest.fixture(scope="module")
def trained_run(fm_shards, tmp_path_factory) -> Path:
    """A 2-step run with a checkpoint at step 2 (never resumed itself: tests resume copies)."""
    from gd.train import train

    run = tmp_path_factory.mktemp("trust") / "run"
    train(_compose(*overrides(fm_shards, run, "train.global_batch=8", "train.steps=2", "train.ckpt_every=2")))
    gc.collect()
    clean_streaming_shm(fm_shards)
    assert (run / "checkpoints" / "latest").read_text().strip() == STEP
    return run


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


def _resume(fm_shards: Path, run: Path) -> None:
    from gd.train import train

    try:
        train(_compose(*overrides(fm_shards, run, "train.global_batch=8", "train.steps=4", "train.ckpt_every=4")))
    finally:
        gc.collect()
        clean_streaming_shm(fm_shards)


@pytest.mark.slow
def test_malicious_pickle_in_rank_state_is_refused(trained_run, fm_shards, tmp_path):
    """Fails before the fix: rank_*.pt was read with weights_only=False, so a planted pickle ran on resume."""
    run = _copy(trained_run, tmp_path / "run")
    marker = tmp_path / "pwned-rank"
    rank_file = run / "checkpoints" / STEP / "rank_00000.pt"
    torch.save({"loaders": _Payload(marker), "rng": {}}, rank_file)
    with pytest.raises(UntrustedCheckpointError, match=r"rank_00000\.pt.*io\.open"):
        _resume(fm_shards, run)
    assert not marker.exists(), "the planted pickle ran"


@pytest.mark.slow
def test_malicious_pickle_in_deepspeed_state_is_refused(trained_run, fm_shards, tmp_path):
    """Fails before the fix: DeepSpeed's load_checkpoint used torch.load(weights_only=False) on its engine files."""
    run = _copy(trained_run, tmp_path / "run")
    marker = tmp_path / "pwned-engine"
    model_file = run / "checkpoints" / STEP / "engine" / "mp_rank_00_model_states.pt"
    state = torch.load(model_file, weights_only=False)
    state["module"] = _Payload(marker)
    torch.save(state, model_file)
    with pytest.raises(UntrustedCheckpointError, match=r"mp_rank_00_model_states\.pt.*io\.open"):
        _resume(fm_shards, run)
    assert not marker.exists(), "the planted pickle ran"


@pytest.mark.slow
def test_run_dir_writable_by_others_is_refused_before_any_work(trained_run, fm_shards, tmp_path):
    """Fails before the fix: a group-writable run dir (anyone in the group can swap checkpoints/) was resumed."""
    run = _copy(trained_run, tmp_path / "run")
    os.chmod(run, 0o775)
    with pytest.raises(UntrustedCheckpointError, match=rf"{run} is writable by its group or by others \(mode 0775\)"):
        _resume(fm_shards, run)
    os.chmod(run, 0o755)
    step = run / "checkpoints" / STEP
    (step / "extra.pt").symlink_to(step / "ema.pt")
    with pytest.raises(UntrustedCheckpointError, match=r"extra\.pt is a symbolic link"):
        check_trusted(run, step)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_checkpoint_file_of_another_owner_is_refused(tmp_path):
    """Fails before the fix: nothing looked at who wrote the files a resume unpickles."""
    step = tmp_path / "run" / "checkpoints" / STEP
    step.mkdir(parents=True)
    (step / "rank_00000.pt").write_bytes(b"")
    os.chown(step / "rank_00000.pt", 65534, 65534)
    with pytest.raises(UntrustedCheckpointError, match=r"rank_00000\.pt is owned by .*uid 65534"):
        check_trusted(tmp_path / "run", step)


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    """Fails before the fix: numpy's RNG state (an ndarray in a tuple) needed weights_only=False to load."""
    import random

    import numpy as np

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save(plain_state({"rng": rng_state()}), tmp_path / "r.pt")
    want = (random.random(), np.random.standard_normal(), torch.rand(1))
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.standard_normal(), torch.rand(1)) == want
    with pytest.raises(TypeError, match=r"state\['x'\] is a object"):
        plain_state({"x": object()})


def _engine(stage: int, precision: str, seed: int):
    from gd.models import build_model
    from gd.diffusion.plan import batch_layout
    from gd.train.engine import build_engine, init_distributed

    d = init_distributed()
    torch.manual_seed(seed)
    model = build_model("SiT-S/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False, hidden_size=32,
                        depth=1, num_heads=2, max_group_size=4)
    t = {"zero_stage": stage, "precision": precision, "global_batch": 4, "micro_batch": 4, "lr": 1e-3,
         "weight_decay": 0.01, "grad_clip": 1.0}
    engine, _ = build_engine(model, t, batch_layout(t, d.world_size), d.device)
    return engine


def _masters(engine) -> dict[str, torch.Tensor]:
    """fp32 master weights (the parameters themselves where the engine keeps no separate master)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p)
        out[name] = (p if master is None else master).detach().float().cpu().clone()
    return out


def _step(engine, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1, 8, 8, generator=gen).to(engine.module.x_embedder.proj.weight.dtype)
    out = engine(x, torch.rand(4, generator=gen), torch.randint(0, 10, (4,), generator=gen))
    engine.backward((out.float() - x.float()).pow(2).mean())
    engine.step()


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16"), (3, "fp32"),
                                             (3, "bf16")])
def test_deepspeed_checkpoints_load_weights_only(stage, precision, tmp_path):
    """Every file DeepSpeed writes for ZeRO-0..3 in fp32 and bf16 loads through the weights-only engine, and the
    next step after the load equals the next step of the engine that saved (weights and Adam moments restored).
    Catches a DeepSpeed upgrade pickling a class outside DEEPSPEED_GLOBALS (resume would then fail with
    UntrustedCheckpointError) and an engine swap that loses state."""
    from omegaconf import OmegaConf

    from gd.train.ema import ShardedEMA

    engine = _engine(stage, precision, seed=0)
    for i in range(2):
        _step(engine, i)
    ema = ShardedEMA(engine.module, 0.5, zero3=stage == 3, optimizer=engine.optimizer)
    manager = CheckpointManager(tmp_path, keep_last=1, rank=0, world_size=1)
    manager.save(2, engine, ema, {}, {"model_signature": {}}, OmegaConf.create({"seed": 0}))
    _step(engine, 2)
    want = _masters(engine)
    del engine, ema
    gc.collect()

    fresh = _engine(stage, precision, seed=1)
    manager.load(manager.latest(), fresh, ShardedEMA(fresh.module, 0.5, zero3=stage == 3, optimizer=fresh.optimizer),
                 {})
    assert type(fresh.checkpoint_engine).__name__ == "WeightsOnlyCheckpointEngine"
    _step(fresh, 2)
    got = _masters(fresh)
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs one step after the weights-only load"
    del fresh
    gc.collect()


def test_launch_checks_trust_before_reading_a_checkpoint(tmp_path):
    """Fails before the fix: gd.launch's resume check read the checkpoint's meta.json and config.yaml (through
    whatever `latest` named) before any trust check, and launched; only the job refused the run."""
    from omegaconf import open_dict

    from gd.launch import LaunchError
    from gd.launch.validate import validate
    from tests.launch.conftest import compose_cfg

    run = tmp_path / "run"
    step = run / "checkpoints" / STEP
    step.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(STEP)
    (step / "meta.json").write_text('{"world_size": 8, "step": 2}')
    (step / "config.yaml").write_text("train: {zero_stage: 2, precision: fp32, micro_batch: 8, global_batch: 64}\n")
    os.chmod(step / "config.yaml", 0o666)
    cfg = compose_cfg("+cluster=slurm", "+exp=groupdiff4", f"run.dir={run}")
    with open_dict(cfg):
        cfg.launcher.check_data = False
    with pytest.raises(LaunchError, match=r"refusing to resume run .*\n  .*config\.yaml is writable by its group or "
                                          r"by others \(mode 0666\)"):
        validate(cfg)
