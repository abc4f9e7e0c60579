"""Fault injection for the trainer tests, installed as training callbacks (``train.callbacks``).

``callbacks(...)`` renders them as one hydra override, so a torchrun-launched run installs them too.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable

import torch

from gd.train.callbacks import Callback


class NanInputs(Callback):
    """Makes the latents of the given 0-based steps NaN (every micro-batch, every rank)."""

    def __init__(self, steps: Iterable[int]) -> None:
        self.steps = {int(s) for s in steps}

    def on_micro_batch(self, trainer, step: int, micro: int, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan") if step in self.steps else x


class KillInCheckpoint(Callback):
    """SIGKILLs rank 0 inside the checkpoint write of ``step``, after the engine state is saved."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_checkpoint_stage(self, trainer, step: int, stage: str) -> None:
        if step == self.step and trainer.dist.is_main:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalSelf(Callback):
    """Sends ``signal`` (a name: SIGKILL, SIGSTOP) after step ``step`` on rank ``rank`` to its own process, or with
    ``group`` to its whole process group (its helpers too: python's shared-memory resource tracker, which would
    otherwise clean up after it): a rank that dies or freezes while the others go on to the next collectives."""

    def __init__(self, step: int, rank: int, signal: str, group: bool = False) -> None:
        self.step, self.rank, self.signal, self.group = int(step), int(rank), str(signal), bool(group)

    def on_step_end(self, trainer, step: int) -> None:
        if step == self.step and trainer.dist.rank == self.rank:
            sig = getattr(signal, self.signal)
            if self.group:
                os.killpg(0, sig)
            else:
                os.kill(os.getpid(), sig)


class SlowGrid(Callback):
    """Makes the run's sample grid (train.sample_every) take ``seconds`` longer on rank 0, as a large model's grid
    does while the other ranks wait for it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)

    def on_train_start(self, trainer, step: int) -> None:
        from gd.train.sample_grid import SampleGrid

        grids = [cb for cb in trainer.callbacks.callbacks if isinstance(cb, SampleGrid)]
        assert grids, "SlowGrid needs train.sample_every > 0"
        sample, seconds = grids[0].sample, self.seconds

        def slow(*args, **kwargs):
            time.sleep(seconds)
            return sample(*args, **kwargs)

        grids[0].sample = slow


class StepDelay(Callback):
    """Sleeps after each step, so a test can signal or kill a tiny run at a chosen step."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)

    def on_step_end(self, trainer, step: int) -> None:
        time.sleep(self.seconds)


class PauseAt(Callback):
    """Holds every rank after step ``step`` (its metrics logged, ``paused.<rank>`` touched in the run dir) until the
    file ``release`` exists and, with ``until_stop``, the rank has seen its stop request (a signal forwarded by
    torchrun arrives a little later), so a test signals or kills the run at exactly that step whatever the load."""

    def __init__(self, step: int, release: str, until_stop: bool = False) -> None:
        self.step, self.release, self.until_stop = int(step), release, bool(until_stop)

    def on_step_end(self, trainer, step: int) -> None:
        if step != self.step:
            return
        (trainer.run_dir / f"paused.{trainer.dist.rank}").touch()
        while not (os.path.exists(self.release)
                   and (not self.until_stop or (trainer.stop_requested and trainer.stop_requested()))):
            time.sleep(0.05)


def callbacks(**faults: object) -> str:
    """``train.callbacks=[...]`` for the named faults, e.g. ``callbacks(NanInputs={"steps": [2, 3]})``."""
    nodes = []
    for name, kwargs in faults.items():
        args = "".join(f",{k}:{_value(v)}" for k, v in dict(kwargs).items())
        nodes.append(f"{{_target_:tests.train.faults.{name}{args}}}")
    return f"train.callbacks=[{','.join(nodes)}]"


def _value(v: object) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(_value, v)) + "]"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return str(v)
    return "'" + str(v).replace("'", "\\'") + "'"
