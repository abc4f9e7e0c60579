"""Sample grids while training (``train.sample_every``): written at the right steps, sampled from the EMA with fixed
noise in the run's mode, into the run folder and tensorboard; under ZeRO with two ranks every rank joins the EMA
gather and rank 0 alone writes."""
from __future__ import annotations

import gc
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.train.conftest import clean_streaming_shm, overrides, torchrun, wait
from tests.train.faults import callbacks

GRID = ["train.sample_grid.classes=3", "train.sample_grid.per_class=4", "train.sample_grid.method=euler",
        "train.sample_grid.steps=3", "train.sample_grid.cfg_scale=1.5", "model.sample_embed=none"]
PAD, SIZE = 2, 8  # gd.sample.class_grid's padding; the tiny model's 8x8 images


def reference_images(ema: Path, classes: list[int], per_class: int, steps: int, scale: float,
                     weights: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """The grid's images recomputed from the exported EMA (or other ``weights`` for the same model) with the formulas
    written out: explicit Euler on t = k/steps (t = 0 noise), guided velocity u + s (c - u) with the conditional
    branch alone (group size 1) and the unconditional one on null labels in groups of N = 4 (GroupDiff-l), the
    seeded per-image noise, pixel decoding."""
    from gd.data.encoders import build_encoder
    from gd.models import load_model
    from gd.sample import slot_noise

    model = load_model(ema).eval()
    if weights is not None:
        model.load_state_dict({**model.state_dict(), **weights})
    n = len(classes) * per_class
    y = torch.tensor([c for c in classes for _ in range(per_class)])
    null = torch.full_like(y, model.num_classes)
    x = slot_noise(0, np.arange(n), (1, SIZE, SIZE))
    with torch.no_grad():
        for k in range(steps):
            t = torch.full((n,), k / steps)
            cond = model(x, t, y, group_size=1)
            uncond = model(x, t, null, group_size=4)
            x = x + (1.0 / steps) * (uncond + scale * (cond - uncond))
    return build_encoder("pixels", channels=1).decode(x).numpy()


def tiles(png: Path, rows: int, per_row: int) -> np.ndarray:
    """The images of a grid PNG, row by row (gd.sample.class_grid's layout: 2 px padding)."""
    grid = np.asarray(Image.open(io.BytesIO(png.read_bytes())).convert("RGB"))
    out = [grid[PAD + r * (SIZE + PAD):PAD + r * (SIZE + PAD) + SIZE, PAD + k * (SIZE + PAD):PAD + k * (SIZE + PAD) + SIZE]
           for r in range(rows) for k in range(per_row)]
    return np.stack(out)


def tb_images(run: Path) -> dict[int, bytes]:
    """Step -> encoded image of the ``samples`` tag in the run's tensorboard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    return {e.step: e.encoded_image_string for e in acc.Images("samples")} if "samples" in acc.Tags()["images"] else {}


@pytest.mark.slow
def test_grid_is_written_at_its_steps_from_the_ema(fm_shards, tmp_path):
    """Catches: a grid at the wrong steps or missing from tensorboard, sampled from the live weights instead of the
    EMA, with other noise, classes, guidance or NFEs than the reference, or noise that changes between grids. A
    high learning rate and EMA decay 0.5 make 4 steps move the weights enough that each of these shows (checked
    below on the live weights, another class and another guidance scale)."""
    from gd.train import train
    from gd.train.__main__ import compose_config

    run = tmp_path / "run"
    cfg = compose_config(overrides(fm_shards, run, "train.global_batch=8", "train.steps=4", "train.ckpt_every=100",
                                   "train.sample_every=2", "train.lr=0.02", "train.ema_decay=0.5", *GRID))
    train(cfg)
    gc.collect()
    clean_streaming_shm(fm_shards)
    assert sorted(p.name for p in (run / "grids").iterdir()) == ["step_00000002.png", "step_00000004.png"]
    got = tiles(run / "grids" / "step_00000004.png", 3, 4)
    want = reference_images(run / "ema.pt", [0, 4, 9], 4, steps=3, scale=1.5)
    assert got.shape == want.shape == (12, SIZE, SIZE, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, "the last grid is not the EMA's fixed-noise sample"
    live = torch.load(run / "checkpoints" / "step_00000004" / "engine" / "mp_rank_00_model_states.pt",
                      map_location="cpu", weights_only=False)["module"]
    for other in (reference_images(run / "ema.pt", [0, 4, 9], 4, steps=3, scale=1.5, weights=live),
                  reference_images(run / "ema.pt", [0, 5, 9], 4, steps=3, scale=1.5),
                  reference_images(run / "ema.pt", [0, 4, 9], 4, steps=3, scale=1.0)):
        assert np.abs(got.astype(int) - other.astype(int)).max() > 4  # the comparison can tell them apart
    first = tiles(run / "grids" / "step_00000002.png", 3, 4)
    assert not np.array_equal(first, got)  # the weights moved between the two grids
    events = tb_images(run)
    assert sorted(events) == [2, 4]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(events[4])).convert("RGB")),
                          np.asarray(Image.open(run / "grids" / "step_00000004.png").convert("RGB")))


@pytest.mark.slow
def test_grid_under_zero2_with_two_ranks(fm_shards, tmp_path):
    """Catches a grid that only rank 0 asks for: gathering the sharded EMA is a collective, so rank 1 must join it
    (else rank 0 waits forever), and only rank 0 writes the file."""
    run = tmp_path / "run"
    log = tmp_path / "torchrun.log"
    args = overrides(fm_shards, run, "train.steps=2", "train.ckpt_every=100", "train.sample_every=1", *GRID)
    assert wait(torchrun(args, log), log) == 0, log.read_text()[-3000:]
    clean_streaming_shm(fm_shards)
    assert sorted(p.name for p in (run / "grids").iterdir()) == ["step_00000001.png", "step_00000002.png"]
    assert log.read_text().count("sample grid at step 2") == 1


@pytest.mark.slow
def test_a_grid_longer_than_the_step_timeout_does_not_end_the_run(fm_shards, tmp_path):
    """Rank 0 samples alone while rank 1 waits for it. Fails before the fix: rank 1 went on to the next step and
    waited in its collective under train.step_timeout_s (here 2 s; rank 0 spends 6 s on the grid), which failed with
    "Another rank stopped answering"; the wait now runs under train.init_timeout_s and ends in a barrier."""
    run = tmp_path / "run"
    log = tmp_path / "torchrun.log"
    args = overrides(fm_shards, run, "train.steps=3", "train.ckpt_every=100", "train.sample_every=1",
                     "train.step_timeout_s=2", "train.init_timeout_s=120", callbacks(SlowGrid={"seconds": 6}), *GRID)
    assert wait(torchrun(args, log), log) == 0, log.read_text()[-3000:]
    clean_streaming_shm(fm_shards)
    assert sorted(p.name for p in (run / "grids").iterdir()) == [f"step_0000000{i}.png" for i in (1, 2, 3)]
    assert "Another rank stopped answering" not in log.read_text()


@pytest.mark.parametrize("extra,error", [
    (["train.sample_every=0"], None),
    (["train.sample_every=5", "sample.decoder=sdvae"], "sample.vae_path="),
    (["train.sample_every=5", "train.sample_grid.method=ddim"], "train.sample_grid (method='ddim'"),
    (["train.sample_every=5", "train.sample_grid.steps=0"], "sample.steps=0: expected >= 1"),
    (["train.sample_every=5", "train.sample_grid.per_class=0"], "train.sample_grid.per_class=0"),
])
def test_grid_settings_are_checked_when_installed(tmp_path, extra, error):
    """Catches a grid that is off by default no more, or whose settings fail only at its first step (hours in):
    the trainer builds it before any work (and gd.launch before submitting), naming the bad setting."""
    from gd.train.__main__ import compose_config
    from gd.train.sample_grid import SampleGrid

    cfg = compose_config(overrides(tmp_path / "no-shards", tmp_path / "run", *extra))
    if error is None:
        assert SampleGrid.from_config(cfg) is None and SampleGrid.from_config(compose_config([])) is None
    else:
        with pytest.raises(ValueError, match=re.escape(error)):
            SampleGrid.from_config(cfg)
