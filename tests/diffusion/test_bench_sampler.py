"""gd.bench.sampler composes from conf/bench/sampler.yaml and reports counted NFE and consistent projections."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

pytest.importorskip("gd.models")
from gd.bench.sampler import run  # noqa: E402
from gd.diffusion.plan import BatchPlan  # noqa: E402

CONF = Path(__file__).resolve().parents[2] / "conf"
TINY = ["model=sit_s2", "model.input_size=8", "model.in_channels=1", "model.num_classes=4", "model.depth=2",
        "model.hidden_size=64", "model.num_heads=4", "bench.batch_groups=2", "bench.methods=[euler,heun,sde]",
        "bench.steps.euler=6", "bench.steps.heun=3", "bench.steps.sde=6", "bench.precision=fp32",
        "bench.device=cpu", "bench.iters=1", "bench.warmup=0"]


def test_bench_counts_nfe_and_projects(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("bench/sampler", overrides=TINY + [f"bench.out={tmp_path / 'r.json'}"])
    rows = run(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)))
    by = {r["method"]: r for r in rows}
    assert by["euler"]["nfe"] == 6 and by["heun"]["nfe"] == 6 and by["sde"]["nfe"] == 6
    for r in rows:
        assert 0 < r["guided_nfe"] < r["nfe"]  # interval [0.3, 1] skips the early steps
        assert r["forward_calls"] == r["nfe"] + r["guided_nfe"]  # GroupDiff-l: uncond branch is a 2nd call
        assert r["img_per_s"] > 0 and r["gpu_hours_interval"] > 0 and r["gpu_hours_no_interval"] > 0
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(rows))


def test_group_sizes_per_mode() -> None:
    """The sampling branches' group sizes come from the batch plan: GroupDiff-l groups only the unconditional one."""
    sizes = {m: BatchPlan(m, 4).sampling_group_sizes() for m in ("l", "f", "none")}
    assert sizes == {"l": (1, 4), "f": (4, 4), "none": (1, 1)}
    with pytest.raises(ValueError, match="mode 'x'"):
        BatchPlan("x", 4)
