"""Where a process runs: the shard builder, the trainer and sampling read one rule (gd.distributed.env)."""
from __future__ import annotations

import pytest
import torch

from gd.data.build import resolve_rank_world
from gd.distributed import env
from gd.train import engine

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
               "SLURM_LOCALID", "SLURM_ARRAY_TASK_ID")
# What `srun -N4 --ntasks-per-node 8` gives task 11 (node 1, local id 3); no torchrun variables.
BARE_SRUN = {"SLURM_PROCID": "11", "SLURM_NTASKS": "32", "SLURM_STEP_NUM_TASKS": "32", "SLURM_LOCALID": "3"}
TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}


@pytest.fixture
def launched(monkeypatch):
    """Sets exactly the launcher variables given (the others removed), on a node that shows 4 GPUs."""
    def set_env(variables: dict[str, str], gpus: int = 4) -> None:
        for name in LAUNCH_VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    return set_env


def test_bare_srun_gives_the_shard_builder_and_the_trainer_the_same_place(launched):
    launched(BARE_SRUN)
    assert env.place() == env.Place(rank=11, world_size=32, local_rank=3, source="slurm")
    assert resolve_rank_world() == (11, 32)
    assert engine.dist_env() == (11, 32, 3)
    # The shard builder's models and sampling (local_device) and the trainer (device_index of its local rank).
    assert env.local_device("auto") == torch.device("cuda", 3)
    assert engine.device_index(engine.dist_env()[2], torch.cuda.device_count()) == 3
    launched(BARE_SRUN, gpus=1)  # one GPU bound per task: device 0 whatever the local id
    assert env.local_device("cuda") == torch.device("cuda", 0)


def test_torchrun_variables_win_over_slurms(launched):
    launched({**BARE_SRUN, **TORCHRUN})
    assert env.place() == env.Place(rank=5, world_size=8, local_rank=1, source="torchrun")
    assert resolve_rank_world() == (5, 8)
    assert engine.dist_env() == (5, 8, 1)
    assert env.local_device("auto") == torch.device("cuda", 1)


def test_a_batch_script_run_directly_is_one_process(launched):
    # The batch step sets SLURM_PROCID and SLURM_NTASKS but no SLURM_STEP_NUM_TASKS: not several processes.
    launched({"SLURM_PROCID": "0", "SLURM_NTASKS": "32", "SLURM_LOCALID": "0"}, gpus=0)
    assert env.place() == env.Place(rank=0, world_size=1, local_rank=0, source="single")
    assert engine.dist_env() == (0, 1, 0) and resolve_rank_world() == (0, 1)
    assert env.local_device("auto") == torch.device("cpu")


def test_trainer_refuses_a_bare_srun_step_of_several_tasks(launched):
    launched(BARE_SRUN, gpus=0)
    with pytest.raises(RuntimeError, match="bare srun step of 32 tasks .*gd-launch or torchrun"):
        engine.init_distributed()
