"""Atomic, resumable training checkpoints and the EMA export.

Layout under ``<run.dir>/checkpoints/``::

    step_00001000/
        engine/            DeepSpeed engine state (sharded model/optimizer files, one set per rank)
        ema.pt             consolidated fp32 EMA state dict (rank 0)
        rank_00000.pt      per rank: data loader states, python/numpy/torch(/cuda) RNG states
        meta.json          step, world size, counters, model config (rank 0)
        config.yaml        the resolved run config (rank 0)
    latest                 text file naming the newest complete step directory

A checkpoint is written into ``.tmp-step_XXXXXXXX``; once every rank has finished (barrier), every rank fsyncs the
files in it (on a shared file system only the writer's fsync flushes its data), and then rank 0 fsyncs the folder,
renames it to ``step_XXXXXXXX``, fsyncs ``checkpoints/`` and replaces ``latest`` (temp file + fsync + os.replace).
The consolidated EMA is gathered to rank 0 only. A write interrupted at any
point therefore leaves ``latest`` naming the previous complete checkpoint; leftover temp directories are removed
by the next save or resume.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from gd.io import atomic_write_text, fsync_dir, fsync_tree
from gd.train.ema import ShardedEMA

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that belongs to a different model (or world layout) than the current run."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def model_signature(model_cfg: Any) -> dict[str, Any]:
    """The parts of cfg.model that fix the parameter shapes; runtime options (backend, checkpointing) excluded."""
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    runtime = {"attn_backend", "grad_checkpointing", "group_t_window", "group_layers", "class_dropout_prob"}
    return {k: v for k, v in sorted(cfg.items()) if k not in runtime}


class CheckpointManager:
    """Saves, finds, loads and prunes the checkpoints of one run directory."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int, rank: int, world_size: int) -> None:
        if int(keep_last) < 1:
            raise ValueError(f"train.keep_last={keep_last}: keep at least 1 checkpoint")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = int(keep_last)
        self.rank, self.world = rank, world_size

    # ---- discovery -------------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The complete checkpoint ``latest`` names, or None for a fresh run."""
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        path = self.dir / name
        if not STEP_DIR.match(name) or not (path / "meta.json").is_file():
            raise CheckpointMismatchError(f"{pointer} names {name!r}, which is not a complete checkpoint "
                                          f"directory under {self.dir}")
        return path

    def steps(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name))

    def clean_partial(self) -> None:
        """Remove temp directories left by interrupted writes (rank 0, then everyone waits)."""
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)
        _barrier()

    # ---- save ------------------------------------------------------------------------------------------
    def save(self, step: int, engine: Any, ema: ShardedEMA, loaders: dict[str, Any], meta: dict[str, Any],
             cfg: DictConfig, fault_hook: Any = None) -> Path:
        """Write checkpoint ``step`` atomically (collective). ``fault_hook(stage)`` is a test seam."""
        name = f"step_{step:08d}"
        tmp = self.dir / f"{TMP_PREFIX}{name}"
        final = self.dir / name
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        engine.save_checkpoint(str(tmp), tag="engine", save_latest=False)
        if fault_hook:
            fault_hook("engine_saved")
        ema_state = ema.full_state()  # rank 0 only; None elsewhere
        torch.save({"loaders": {k: v.state_dict() for k, v in loaders.items()}, "rng": rng_state()},
                   tmp / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            torch.save(ema_state, tmp / "ema.pt")
            (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": self.world}, indent=1))
        del ema_state
        _barrier()
        fsync_tree(tmp)
        _barrier()
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.dir)
            atomic_write_text(self.dir / "latest", name + "\n")
            fsync_dir(self.dir)
            for old in self.steps()[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    # ---- load ------------------------------------------------------------------------------------------
    def read_meta(self, path: Path) -> dict[str, Any]:
        return json.loads((path / "meta.json").read_text())

    def check_compatible(self, path: Path, model_cfg: Any) -> dict[str, Any]:
        """Meta of ``path`` after checking it was written for this model and world size."""
        meta = self.read_meta(path)
        want, have = model_signature(model_cfg), meta.get("model_signature")
        if have != want:
            diff = sorted(k for k in set(want) | set(have or {}) if (have or {}).get(k) != want.get(k))
            details = ", ".join(f"{k}: checkpoint {(have or {}).get(k)!r} vs config {want.get(k)!r}" for k in diff)
            raise CheckpointMismatchError(
                f"checkpoint {path} was written for another model ({details}); use a new run.dir or the same "
                f"model config")
        if int(meta["world_size"]) != self.world:
            raise CheckpointMismatchError(
                f"checkpoint {path} was written by {meta['world_size']} processes, this run has {self.world}: "
                f"data loader and optimizer shards are per rank; resume with the same world size")
        return meta

    def load(self, path: Path, engine: Any, ema: ShardedEMA, loaders: dict[str, Any]) -> None:
        """Restore engine, EMA, loaders and RNG from ``path`` (collective)."""
        load_path, _ = engine.load_checkpoint(str(path), tag="engine", load_optimizer_states=True,
                                              load_lr_scheduler_states=True, load_module_strict=True)
        if load_path is None:
            raise CheckpointMismatchError(f"DeepSpeed found no engine state under {path / 'engine'}")
        ema.refresh()
        # Memory-mapped: each rank reads only its own slices, not a whole CPU copy of the EMA.
        ema.load_full_state(torch.load(path / "ema.pt", map_location="cpu", weights_only=True, mmap=True))
        own = torch.load(path / f"rank_{self.rank:05d}.pt", map_location="cpu", weights_only=False)
        for key, loader in loaders.items():
            loader.load_state_dict(own["loaders"][key])
        set_rng_state(own["rng"])
        _barrier()


def export_ema(model_config: dict[str, Any], ema_state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write the EMA in gd.models' export format (``{"format", "config", "model"}``) plus ``model.json`` beside it.

    A fresh CPU model is built from ``model_config`` (``model.config`` of the trained model) to check every key
    and shape and to supply the buffers (fp32 as built, whatever precision the engine trained in); this works
    under ZeRO-3, where the engine's own parameters are partitioned.
    """
    from gd.models import build_model, save_model

    kwargs = dict(model_config)
    fresh = build_model(kwargs.pop("name"), **kwargs)
    save_model(fresh, path, state_dict={**fresh.state_dict(), **ema_state})
    atomic_write_text(Path(path).parent / "model.json", json.dumps(dict(model_config), indent=1))


class Checkpointer:
    """A run's checkpoint cadence (``train.ckpt_every``, the last step, preemption) around a :class:`CheckpointManager`.

    ``resumable()`` finds and checks the checkpoint to resume from before any process group exists, so a run
    pointed at another model's directory fails in seconds.
    """

    def __init__(self, run_dir: str | os.PathLike, every: int, keep_last: int, rank: int, world_size: int) -> None:
        self.manager = CheckpointManager(run_dir, keep_last, rank, world_size)
        self.every = int(every)

    def resumable(self, model_cfg: Any) -> tuple[Path | None, dict[str, Any]]:
        """(the checkpoint ``latest`` names, its meta) after the compatibility check; (None, {}) when fresh."""
        latest = self.manager.latest()
        return (latest, self.manager.check_compatible(latest, model_cfg)) if latest is not None else (None, {})

    def due(self, step: int, last_step: int) -> bool:
        return step % self.every == 0 or step == last_step
