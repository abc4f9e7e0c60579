"""The wandb sink (gd.train.tracking) in offline mode: one wandb run across a stop and two resumes, the config
logged redacted, every metrics.jsonl record sent exactly once (those logged before wandb was switched on included),
sample grids as images; and the error when wandb is asked for but missing."""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.launch.test_secrets import grep_tree
from tests.train.conftest import clean_streaming_shm, overrides
from tests.train.wandb_records import offline_runs

TOKEN = "tok3nForWandbThatMustNotLeak55"


def _records(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """wandb offline, its settings and caches in the test's folder (nothing under ~), a secret in the environment."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("GD_TEST_API_TOKEN", TOKEN)


@pytest.mark.slow
def test_offline_wandb_run_is_resumed_and_complete(fm_shards, tmp_path, offline):
    """Three attempts of one run: steps 1-2 without wandb, 3-4 with it (stopped as a preemption would), 5-6 resumed.
    Catches: a new wandb run per attempt (id not derived from the run), history lost (steps 1-2, logged before
    wandb was on) or sent twice, values that differ from metrics.jsonl, a raw credential in the logged config,
    sample grids missing from wandb."""
    from gd.train import train
    from gd.train.__main__ import compose_config
    from gd.train.tracking import wandb_run_id

    run = tmp_path / "run"
    base = overrides(fm_shards, run, "train.global_batch=8", "train.steps=6", "train.ckpt_every=100",
                     "train.sample_every=3", "train.sample_grid.classes=2", "train.sample_grid.per_class=4",
                     "train.sample_grid.steps=2", "+data.api_token=${oc.env:GD_TEST_API_TOKEN}")

    def attempt(steps: int | None, *extra: str) -> dict:
        """Train ``steps`` more steps, then stop as on a preemption (None: to the end)."""
        polls = iter(range(100))  # stop_requested is polled once per step
        stop = (lambda: next(polls) >= steps - 1) if steps else None
        result = train(compose_config([*base, *extra]), stop_requested=stop)
        gc.collect()
        clean_streaming_shm(fm_shards)
        return result

    assert attempt(2)["step"] == 2
    assert not (run / "wandb").exists()
    assert attempt(2, "train.wandb.enabled=true")["step"] == 4
    assert attempt(None, "train.wandb.enabled=true")["step"] == 6

    runs = offline_runs(run)
    assert len(runs) == 2, [r.path for r in runs]
    assert {r.run_id for r in runs} == {wandb_run_id("default", str(run))}
    steps = [s for r in runs for s, row in sorted(r.history.items()) if "train/loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]
    metrics = _records(run)
    for r in runs:
        for step, row in r.history.items():
            if "train/loss" in row:
                assert row["train/loss"] == pytest.approx(metrics[step]["loss"], rel=1e-12)
    images = {s: r.path.parent / "files" / row["samples/path"] for r in runs for s, row in r.history.items()
              if row.get("samples/_type") == "image-file"}
    assert sorted(images) == [3, 6]
    for step, media in images.items():
        grid = np.asarray(Image.open(run / "grids" / f"step_{step:08d}.png").convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(media).convert("RGB")), grid)
    config = runs[-1].config
    assert config["train"]["steps"] == 6 and config["data"]["api_token"] == "***"
    assert not grep_tree(run / "wandb", TOKEN)


def test_missing_wandb_is_reported_before_any_work(fm_shards, tmp_path, monkeypatch):
    """Catches a run that asks for wandb without it installed and only fails after the engine is built (or
    silently logs nowhere): the error names the setting and the install command, and nothing is written."""
    from gd.train import train
    from gd.train.__main__ import compose_config

    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    run = tmp_path / "run"
    cfg = compose_config(overrides(fm_shards, run, "train.wandb.enabled=true"))
    with pytest.raises(ImportError, match=r"train.wandb.enabled=true but wandb is not installed: pip install "
                                          r"'groupdiff\[wandb\]'"):
        train(cfg)
    assert not run.exists()
