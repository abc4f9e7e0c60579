"""gd.launch's checks of the diffusion objective: the DiT experiments compose and validate, and a value in the
other objective's units, or a sampler of the other objective, is rejected before anything is submitted."""
from __future__ import annotations

import pytest
from omegaconf import open_dict

from gd.launch import LaunchError
from gd.launch.validate import validate
from tests.launch.conftest import compose_cfg


def _validated(*overrides: str):
    cfg = compose_cfg(*overrides)
    with open_dict(cfg):
        cfg.launcher.check_data = False
    return cfg


@pytest.mark.parametrize("exp", ["dit_xl2_baseline", "groupdiff4_dit"])
def test_dit_experiments_compose_and_validate(exp: str) -> None:
    cfg = _validated("+cluster=slurm", f"+exp={exp}")
    validate(cfg)
    assert cfg.diffusion.objective == "ddpm" and cfg.model.learn_sigma and cfg.sample.method == "ddpm"
    assert cfg.diffusion.group_size <= cfg.model.max_group_size


@pytest.mark.parametrize("overrides, needle", [
    (["+exp=groupdiff4_dit", "diffusion.sigma_tv=0.1"], "diffusion.sigma_tv=0.1: with diffusion.objective=ddpm"),
    (["+exp=groupdiff4_dit", "model.group_t_window=[0.0,0.4]"], "looks like flow time"),
    (["+exp=groupdiff4", "diffusion.sigma_tv=100"], "diffusion.sigma_tv=100.0: with diffusion.objective=flow"),
    (["+exp=groupdiff4_dit", "task=evaluate", "sample.method=sde", "sample.ckpt=/x.pt"],
     "sample.method='sde' samples the flow objective, but diffusion.objective=ddpm"),
    (["+exp=groupdiff4", "task=sample", "sample.method=ddpm", "sample.ckpt=/x.pt"],
     "sample.method='ddpm' samples the ddpm objective, but diffusion.objective=flow"),
])
def test_objective_units_and_samplers_are_checked_before_submission(overrides: list[str], needle: str) -> None:
    """Catches a DiT run launched with σ_tv or a group window in flow time (it would train as if 0 / never group)
    and an evaluation job queued with the other objective's sampler."""
    cfg = _validated("+cluster=slurm", *overrides)
    with pytest.raises(LaunchError) as err:
        validate(cfg)
    assert needle in str(err.value)
