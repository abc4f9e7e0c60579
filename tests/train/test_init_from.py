"""train.init_from: a fresh run starts from a pretrained file (fine-tuning), checked against independent references:
the model loaded by gd.models.load_pretrained on the same batch and draws, the file's own tensors, a reverse-time
network evaluated at 1 - t in float64, and a resumed run against an uninterrupted one."""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from gd.models import build_model, load_pretrained
from gd.models.checkpoints import CheckpointError
from gd.train.init_from import InitFromError, read_pretrained
from tests.train.conftest import clean_streaming_shm, overrides, torchrun, wait

NONE = "model.sample_embed=none"  # official SiT/DiT files have no sample embedding: load_pretrained takes them as is


def compose(*args: str):
    from gd.train.__main__ import compose_config

    return compose_config(list(args))


def _kwargs(cfg) -> dict:
    from gd.train.trainer import model_kwargs

    return model_kwargs(cfg.model)


def _random_model(cfg, seed: int, **changes):
    """The run's model with every weight random (zero-initialised heads included), as a converged file would be."""
    kwargs = {**_kwargs(cfg), **changes}
    torch.manual_seed(seed)
    model = build_model(kwargs.pop("name"), **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def _free(shards: Path) -> None:
    gc.collect()
    clean_streaming_shm(shards)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _first_losses(trainer, model) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 0's first micro-batch: its loss as the trainer computes it, and through ``model`` with the draws
    regenerated from the plan's seeds (the same batch, labels, t, noise)."""
    mb = trainer.micro_batch(0, 0)
    gen = trainer.plan.generator(0, rank=0, micro=0, device=mb.x.device)
    net = trainer.objective.network(model)
    want, _ = trainer.objective.loss(lambda x, t, y, group_size: net(x, t, y, group_size=group_size),
                                     mb.x, mb.y, mb.plan.group_size, gen)
    return trainer.forward(mb).detach(), want.detach()


# ---- the start ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["flat", "train.py"])
def test_first_step_loss_equals_the_file_loaded_independently(fm_shards, tmp_path, layout):
    """A tiny SiT saved as official SiT saves it (a flat EMA state dict, or train.py's {model, ema, opt, args}):
    the run's first loss equals that of the file loaded by load_pretrained on the same batch and draws, and the
    EMA at step 0 equals the file's EMA (train.py: another tensor than the weights)."""
    from gd.train.trainer import Trainer

    base = compose(*overrides(fm_shards, tmp_path / "x", NONE))
    model, ema = _random_model(base, 1), _random_model(base, 2)
    path = tmp_path / "SiT-tiny.pt"
    if layout == "flat":
        torch.save(model.state_dict(), path)
    else:
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": argparse.Namespace(
            model="SiT-XL/2")}, path)
    run = tmp_path / "run"
    cfg = compose(*overrides(fm_shards, run, NONE, f"train.init_from={path}", "train.global_batch=8"))
    trainer = Trainer(cfg)
    ref = build_model(**{**_kwargs(cfg)})
    info = load_pretrained(ref, path)
    assert info["entry"] == ("<flat>" if layout == "flat" else "ema")
    if layout == "train.py":  # load_pretrained takes the EMA; the run's network starts from the raw weights
        ref.load_state_dict(model.state_dict())
    got, want = _first_losses(trainer, ref)
    assert torch.equal(got, want), (got, want)
    fresh = compose(*overrides(fm_shards, tmp_path / "fresh", NONE, "train.global_batch=8"))
    assert not torch.equal(_first_losses(Trainer(fresh), ref)[0], got)  # the file, not the seed, made the loss
    state = trainer.ema.full_state()
    file_ema = (ema if layout == "train.py" else model).state_dict()
    assert all(torch.equal(state[k], file_ema[k]) for k in state)
    del trainer
    _free(fm_shards)


def test_a_plain_file_into_a_groupdiff_model_fills_only_the_sample_embedding(fm_shards, tmp_path, caplog):
    """An official file into a sample_embed=cond run: every file tensor is taken, sample_embed keeps the run's own
    seeded N(0, 0.02) initialisation, and the log names it and the layout."""
    from gd.train.trainer import Trainer

    plain = compose(*overrides(fm_shards, tmp_path / "x", NONE))
    model = _random_model(plain, 1)
    path = tmp_path / "SiT-tiny.pt"
    torch.save(model.state_dict(), path)
    cfg = compose(*overrides(fm_shards, tmp_path / "run", f"train.init_from={path}"))
    with caplog.at_level(logging.WARNING, logger="gd.train"):
        trainer = Trainer(cfg)
    got = trainer.engine.module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    torch.manual_seed(int(cfg.seed))
    kwargs = _kwargs(cfg)
    seeded = build_model(kwargs.pop("name"), **kwargs)
    assert torch.equal(got["sample_embed"], seeded.sample_embed.detach())
    assert 0.015 < float(got["sample_embed"].std()) < 0.025
    said = caplog.text
    assert "official SiT/DiT (flat)" in said and "sample_embed: not in the file" in said
    del trainer
    _free(fm_shards)


# ---- what a file may hold ---------------------------------------------------------------------------------
def _file(tmp_path: Path, cfg, obj) -> Path:
    path = tmp_path / "pretrained.pt"
    torch.save(obj, path)
    return path


def test_a_file_of_another_size_is_refused_naming_the_keys(tmp_path):
    cfg = compose(*overrides(tmp_path, tmp_path / "run", NONE))
    other = _random_model(cfg, 0, hidden_size=96)
    path = _file(tmp_path, cfg, other.state_dict())
    with pytest.raises(InitFromError) as err:
        read_pretrained(path, _kwargs(cfg), "flow")
    said = str(err.value)
    assert "shape mismatches" in said and "x_embedder.proj.weight: file (96, 1, 2, 2) vs model (64, 1, 2, 2)" in said
    assert "nothing was built" in said


def test_missing_and_unexpected_keys_are_listed_together(tmp_path):
    cfg = compose(*overrides(tmp_path, tmp_path / "run", NONE))
    state = _random_model(cfg, 0).state_dict()
    del state["blocks.1.attn.qkv.weight"]
    state["extra.head.weight"] = torch.zeros(3)
    with pytest.raises(InitFromError, match=r"(?s)missing keys \(1\):\n    blocks.1.attn.qkv.weight.*"
                                            r"unexpected keys \(1\):\n    extra.head.weight"):
        read_pretrained(_file(tmp_path, cfg, state), _kwargs(cfg), "flow")


class _Planted:
    def __reduce__(self):
        return (os.system, ("echo planted",))


def test_a_planted_pickle_is_refused(tmp_path):
    cfg = compose(*overrides(tmp_path, tmp_path / "run", NONE))
    path = _file(tmp_path, cfg, {"model": _random_model(cfg, 0).state_dict(), "evil": _Planted()})
    with pytest.raises(CheckpointError, match="refusing to load .* outside the allow-list"):
        read_pretrained(path, _kwargs(cfg), "flow")


def test_a_symlinked_or_group_writable_file_is_refused(tmp_path):
    cfg = compose(*overrides(tmp_path, tmp_path / "run", NONE))
    path = _file(tmp_path, cfg, _random_model(cfg, 0).state_dict())
    link = tmp_path / "link.pt"
    link.symlink_to(path)
    with pytest.raises(InitFromError, match="link.pt is a symbolic link"):
        read_pretrained(link, _kwargs(cfg), "flow")
    path.chmod(0o664)
    with pytest.raises(InitFromError, match="writable by its group or by others"):
        read_pretrained(path, _kwargs(cfg), "flow")
    with pytest.raises(InitFromError, match="no such file"):
        read_pretrained(tmp_path / "absent.pt", _kwargs(cfg), "flow")


def _reverse_time_file(tmp_path: Path, cfg, layout: str):
    """A tiny network trained in the reverse time convention, saved as REPA or the released code saves it."""
    net = _random_model(cfg, 3)
    state = net.state_dict()
    proj = {"projectors.0.0.weight": torch.randn(16, 64), "projectors.0.2.weight": torch.randn(8, 16)}
    if layout == "REPA":
        obj = {"model": {**state, **proj}, "ema": {**state, **proj}, "opt": {}, "args": argparse.Namespace(
            enc_type="dinov2-vit-b"), "steps": 4_000_000}
    elif layout == "REPA last.pt":  # REPA's released file: the EMA state dict alone, projectors included
        obj = {**state, **proj}
    else:
        released = {"denoiser." + k: v for k, v in state.items()}
        obj = {"model": released, "model_ema": released, "optimizer": {}, "epoch": 3}
    return net, _file(tmp_path, cfg, obj)


@pytest.mark.parametrize("layout", ["REPA", "REPA last.pt", "released GroupDiff"])
def test_a_reverse_time_file_is_rewritten_exactly_into_this_time_convention(tmp_path, layout):
    """REPA and the released SiTs predict eps - x at s = 1 - t: the fitted weights give u(x, t) = -v'(x, 1 - t)
    (float64 against the file's network at 1 - t); REPA's projector heads are dropped and listed."""
    repa = layout.startswith("REPA")
    cfg = compose(*overrides(tmp_path, tmp_path / "run", NONE if repa else "model.sample_embed=cond"))
    net, path = _reverse_time_file(tmp_path, cfg, layout)
    pre = read_pretrained(path, _kwargs(cfg), "flow")
    assert pre.layout == ("REPA" if repa else layout)
    notes = "\n".join(pre.notes)
    assert "time: the file runs in the reverse convention" in notes
    assert ("dropped 2 keys not part of the denoiser: projectors.0" in notes) == repa
    kwargs = _kwargs(cfg)
    ours = build_model(kwargs.pop("name"), **kwargs).double()
    ours.load_state_dict({k: v.double() for k, v in pre.weights.items()})
    net = net.double().eval()
    ours.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 5, 9])
    slots = torch.tensor([0, 1, 2, 3])
    kw = {} if repa else {"slots": slots}
    with torch.no_grad():
        want = -net(x, 1.0 - t, y, group_size=1, **kw)
        got = ours(x, t, y, group_size=1, **kw)
    # The model computes its time features in fp32 whatever its dtype: that, not the rewrite, bounds the agreement.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    forward = read_pretrained(path, _kwargs(cfg), "flow", init_time="forward")
    assert torch.equal(forward.weights["t_embedder.mlp.0.weight"], net.state_dict()["t_embedder.mlp.0.weight"].float())


def test_a_learned_sigma_file_feeds_a_run_without_one_its_velocity_channels(tmp_path):
    """Official SiT-XL-2-256.pt has 2C output channels; the released recipe trains C: the fitted head computes
    exactly the file's first C channels (float64)."""
    cfg = compose(*overrides(tmp_path, tmp_path / "run", NONE))
    net = _random_model(cfg, 4, learn_sigma=True)
    pre = read_pretrained(_file(tmp_path, cfg, net.state_dict()), _kwargs(cfg), "flow")
    assert any("kept the 1 velocity channels of the file's 2" in n for n in pre.notes)
    kwargs = _kwargs(cfg)
    ours = build_model(kwargs.pop("name"), **kwargs).double()
    ours.load_state_dict({k: v.double() for k, v in pre.weights.items()})
    x, t, y = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), net.double()(x, t, y)[:, :1], rtol=1e-12, atol=1e-12)
    with pytest.raises(InitFromError, match="shape mismatches"):  # DDPM reads the variance channels: not dropped
        read_pretrained(_file(tmp_path, cfg, net.state_dict()), _kwargs(cfg), "ddpm")


def test_bad_companion_values_are_refused(tmp_path):
    cfg = compose(*overrides(tmp_path, tmp_path / "run", NONE))
    path = _file(tmp_path, cfg, _random_model(cfg, 0).state_dict())
    with pytest.raises(ValueError, match="train.init_ema='latest': expected one of file, weights"):
        read_pretrained(path, _kwargs(cfg), "flow", init_ema="latest")


# ---- restarts ---------------------------------------------------------------------------------------------
class _Crash(RuntimeError):
    pass


def _crash_after(step: int):
    from gd.train.callbacks import Callback

    class Crash(Callback):
        def on_step_end(self, trainer, s: int) -> None:
            if s == step:
                raise _Crash(f"crash after step {s}")

    return Crash()


@pytest.mark.slow
def test_restarts_resume_the_runs_own_checkpoint_or_start_from_the_file_again(fm_shards, tmp_path, caplog):
    """Killed after its first checkpoint (step 3), a run resumes from it, ignores init_from and says so, and ends
    bitwise equal to the uninterrupted run; killed before any checkpoint it starts from the file again (the same
    result). Its own ema.pt and step checkpoint then start another run: the step folder's fp32 masters equal the
    engine's saved module weights (fp32 ZeRO-2), and ema.pt seeds both."""
    from gd.train.trainer import Trainer

    plain = compose(*overrides(fm_shards, tmp_path / "x", NONE))
    path = _file(tmp_path, plain, _random_model(plain, 5).state_dict())
    args = ("train.steps=6", "train.ckpt_every=3", "train.global_batch=8", f"train.init_from={path}")

    def run(name: str, crash: int | None = None):
        cfg = compose(*overrides(fm_shards, tmp_path / name, *args))
        try:
            Trainer(cfg, callbacks=[_crash_after(crash)] if crash is not None else []).train()
        except _Crash:
            pass
        finally:
            _free(fm_shards)
        return tmp_path / name

    whole = run("whole")
    early = run("early", crash=1)   # before the first checkpoint (step 3)
    assert not (early / "checkpoints" / "latest").exists()
    late = run("late", crash=4)     # after it
    assert (late / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    with caplog.at_level(logging.WARNING, logger="gd.train"):
        run("late")
    assert "this run's own checkpoint: train.init_from=" in caplog.text
    run("early")
    want = torch.load(whole / "ema.pt", weights_only=True)["model"]
    for other in (early, late):
        got = torch.load(other / "ema.pt", weights_only=True)["model"]
        assert all(torch.equal(got[k], want[k]) for k in want), other
    assert [r["loss"] for r in _records(late)][-3:] == [r["loss"] for r in _records(whole)][-3:]
    meta = json.loads((whole / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["init_from"]["path"] == str(path) and meta["init_from"]["layout"] == "official SiT/DiT (flat)"

    step = whole / "checkpoints" / "step_00000006"
    module = torch.load(step / "engine" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    kwargs = _kwargs(compose(*overrides(fm_shards, tmp_path / "y", *args)))
    pre = read_pretrained(step, kwargs, "flow")
    assert pre.layout == "gd step checkpoint" and pre.ema_entry == "ema"
    assert all(torch.equal(pre.weights[k], module[k].float()) for k in module)
    exported = read_pretrained(whole / "ema.pt", kwargs, "flow")
    assert exported.layout == "gd export" and exported.ema is None
    assert all(torch.equal(exported.weights[k], want[k]) for k in want)
    with pytest.raises(InitFromError, match="trained with diffusion.objective=flow, this run has ddpm"):
        read_pretrained(whole / "ema.pt", kwargs, "ddpm")


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision,parallel,ema", [(3, "bf16", 2, "weights"), (2, "bf16", 1, "file")])
def test_two_ranks_start_from_the_files_fp32_values(fm_shards, tmp_path, stage, precision, parallel, ema):
    """Two ranks, DeepSpeed bf16 (ZeRO-3 with group parallelism; ZeRO-2): a run of 0 steps exports its EMA as it
    started. init_ema=weights: the EMA copies the fp32 masters, which equal the file's fp32 weights exactly (not
    their bf16 rounding); init_ema=file: the file's EMA."""
    plain = compose(*overrides(fm_shards, tmp_path / "x", NONE))
    model, file_ema = _random_model(plain, 6), _random_model(plain, 7)
    path = _file(tmp_path, plain, {"model": model.state_dict(), "ema": file_ema.state_dict()})
    run = tmp_path / "run"
    log = tmp_path / "log.txt"
    proc = torchrun(overrides(fm_shards, run, NONE, "train.steps=0", f"train.zero_stage={stage}",
                              f"train.precision={precision}", f"train.group_parallel={parallel}",
                              f"train.init_from={path}", f"train.init_ema={ema}"), log)
    assert wait(proc, log) == 0, log.read_text()[-3000:]
    got = torch.load(run / "ema.pt", weights_only=True)["model"]
    want = (model if ema == "weights" else file_ema).state_dict()
    rounded = {k: v.bfloat16().float() for k, v in want.items()}
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not all(torch.equal(got[k], rounded[k]) for k in want)
    assert "initialised from" in log.read_text()
