"""A run whose config reads credentials from the environment (``${oc.env:...}``) stores none of them.

One tiny in-process training run (world of 1, 2 steps, a checkpoint) with an API token and an endpoint URL with a
password resolved from the environment; its run directory and its log are then searched for both secrets.
"""
from __future__ import annotations

import gc
import logging
from pathlib import Path

import pytest

from tests.launch.test_secrets import grep_tree
from tests.train.conftest import clean_streaming_shm, overrides

pytestmark = pytest.mark.slow
TOKEN = "tok3nValueThatMustNotLeak81"
PASSWORD = "passw0rdThatMustNotLeak42"


@pytest.fixture(scope="module")
def secret_run(fm_shards, tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, log file) of a 2-step run whose data config interpolates both secrets from the environment."""
    from gd.train import train
    from gd.train.__main__ import compose_config

    base = tmp_path_factory.mktemp("secrets")
    run, log = base / "run", base / "train.log"
    mp = pytest.MonkeyPatch()
    mp.setenv("GD_TEST_API_TOKEN", TOKEN)
    mp.setenv("GD_TEST_ENDPOINT", f"http://alice:{PASSWORD}@127.0.0.1:9000")
    handler = logging.FileHandler(log)
    logging.getLogger().addHandler(handler)
    try:
        cfg = compose_config(overrides(fm_shards, run, "train.global_batch=8", "train.steps=2", "train.ckpt_every=2",
                                       "+data.api_token=${oc.env:GD_TEST_API_TOKEN}",
                                       "+data.endpoint=${oc.env:GD_TEST_ENDPOINT}"))
        train(cfg)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        mp.undo()
        gc.collect()
        clean_streaming_shm(fm_shards)
    return run, log


def test_checkpoint_config_is_redacted(secret_run):
    """Fails before the fix: the checkpoint's config.yaml was OmegaConf.to_yaml(cfg, resolve=True)."""
    run, log = secret_run
    ckpt_config = run / "checkpoints" / "step_00000002" / "config.yaml"
    text = ckpt_config.read_text()
    assert "api_token: '***'" in text and "endpoint: http://***@127.0.0.1:9000" in text
    assert not grep_tree(run / "checkpoints", TOKEN) and not grep_tree(run / "checkpoints", PASSWORD)
    assert TOKEN not in log.read_text() and PASSWORD not in log.read_text()


def test_nothing_in_the_run_dir_holds_a_secret(secret_run):
    """Every file of the run (config.yaml, checkpoints, metrics, TensorBoard events, the EMA export) is free of both
    secrets."""
    run, _ = secret_run
    assert grep_tree(run, TOKEN) == [] and grep_tree(run, PASSWORD) == []
