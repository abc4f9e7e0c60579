"""Which chunks a build process owns: rank/world from the config, a SLURM job array, or torchrun's env."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gd.data.build import config_from_dict, resolve_rank_world

REPO = Path(__file__).resolve().parents[2]


def _array(task: int, lo: int, count: int, step: int = 1) -> dict[str, str]:
    return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(lo),
            "SLURM_ARRAY_TASK_COUNT": str(count), "SLURM_ARRAY_TASK_STEP": str(step)}


def test_array_from_one_covers_every_chunk() -> None:
    """--array=1-8: task ids 1..8 map to ranks 0..7, so chunks c % 8 == 0 are owned and no rank is >= world."""
    resolved = [resolve_rank_world(env=_array(task, 1, 8)) for task in range(1, 9)]
    assert resolved == [(r, 8) for r in range(8)]
    owned = {c for rank, world in resolved for c in range(64) if c % world == rank}
    assert owned == set(range(64))


def test_stepped_array_and_bad_task_id() -> None:
    assert [resolve_rank_world(env=_array(t, 0, 4, step=2)) for t in (0, 2, 4, 6)] == [(r, 4) for r in range(4)]
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID=9"):
        resolve_rank_world(env=_array(9, 1, 8))


def test_explicit_values_win_then_torchrun_then_single_process() -> None:
    assert resolve_rank_world(2, 3, env=_array(5, 1, 8)) == (2, 3)
    assert resolve_rank_world(env={"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)
    assert resolve_rank_world(env={}) == (0, 1)


def test_srun_tasks_and_arrays_of_them() -> None:
    """Fails before the fix: under `srun -N4 --ntasks-per-node 8` every process was rank 0 of 1 (SLURM_PROCID was
    ignored) and built every chunk. A batch script's own process (no srun step) stays one process."""
    srun = {"SLURM_PROCID": "11", "SLURM_STEP_NUM_TASKS": "32", "SLURM_NTASKS": "32"}
    assert resolve_rank_world(env=srun) == (11, 32)
    assert resolve_rank_world(env={"SLURM_PROCID": "0", "SLURM_NTASKS": "32"}) == (0, 1)
    assert resolve_rank_world(env={**_array(3, 1, 4), "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}) == (5, 8)
    assert resolve_rank_world(env={**srun, "RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)  # torchrun inside srun


def test_build_config_reads_the_array_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _array(8, 1, 8).items():
        monkeypatch.setenv(key, value)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("build_shards", overrides=["out=/tmp/unused"])
    built = config_from_dict(OmegaConf.to_container(cfg, resolve=True))
    assert (built.rank, built.world) == (7, 8)
    built.validate()
