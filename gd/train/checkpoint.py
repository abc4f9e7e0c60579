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

A checkpoint is untrusted input: whoever can write ``<run.dir>/checkpoints/`` would otherwise run code on every
rank at the next launch (and a SLURM requeue relaunches by itself). So every file is read with
``torch.load(weights_only=True)``: RNG and loader states are stored as tensors and plain types, and DeepSpeed's
engine files go through :class:`WeightsOnlyCheckpointEngine`, which allows only the three DeepSpeed classes its
ZeRO optimizer states hold (:data:`DEEPSPEED_GLOBALS`). Before resuming, the run directory and everything the
checkpoint holds must be owned by this user (or root) and not writable by the group or others
(:func:`check_trusted`); saving removes group/other write permission from what it writes.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from gd.io import atomic_write_text, fsync_dir, fsync_tree, untrusted_reason
from gd.secrets import redacted_yaml
from gd.train.ema import ShardedEMA

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that belongs to a different model (or world layout) than the current run."""


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint that others could have written, or that holds objects a weights-only load does not allow."""


# What DeepSpeed 0.19's ZeRO-1/2/3 optimizer states pickle besides tensors and containers (fp32 and bf16; found with
# torch.serialization.get_unsafe_globals_in_checkpoint, guarded by tests/train/test_checkpoint_trust.py).
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")


def _deepspeed_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | os.PathLike, allowed: list[Any] | None = None, **kwargs: Any) -> Any:
    """``torch.load(weights_only=True)`` with ``allowed`` classes; a refused object becomes an
    :class:`UntrustedCheckpointError` naming the file and what it held."""
    try:
        with torch.serialization.safe_globals(list(allowed or [])):
            return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        said = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed global|\n|$)", str(err))
        raise UntrustedCheckpointError(
            f"refusing to load {path}: it holds objects outside the weights-only allow-list (tensors, containers, "
            f"plain types, {', '.join(DEEPSPEED_GLOBALS)}), so it was not written by this trainer or was tampered "
            f"with ({said.group(1) if said else str(err).splitlines()[0]})") from err


def weights_only_engine(config_params: Any = None) -> Any:
    """A DeepSpeed checkpoint engine that saves like DeepSpeed's ``TorchCheckpointEngine`` and loads every file
    with ``weights_only=True`` (:data:`DEEPSPEED_GLOBALS` allowed); DeepSpeed's own loads with weights_only=False."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return load_weights_only(path, _deepspeed_globals(), map_location=map_location)

    return WeightsOnlyCheckpointEngine(config_params)


def use_weights_only_engine(engine: Any) -> None:
    """Swap the engine's checkpoint engine for :func:`weights_only_engine` (refusing the loaders we cannot make
    safe: DeepSpeed's universal checkpoints and its other checkpoint engines read files with weights_only=False)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if getattr(engine, "load_universal_checkpoint", lambda: False)():
        raise UntrustedCheckpointError("DeepSpeed universal checkpoints (checkpoint.load_universal) unpickle their "
                                       "files without weights_only; remove it from train.deepspeed")
    current = engine.checkpoint_engine
    if type(current).__name__ == "WeightsOnlyCheckpointEngine":
        return
    if type(current) is not TorchCheckpointEngine:
        raise UntrustedCheckpointError(f"DeepSpeed checkpoint engine {type(current).__name__} is not supported: "
                                       "only the default torch engine can be made to load weights-only (remove "
                                       "checkpoint.writer / datastates from train.deepspeed)")
    safe = weights_only_engine(getattr(engine, "_config", None))
    safe.zipfile_serialization = current.zipfile_serialization
    engine.checkpoint_engine = safe


def check_trusted(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> None:
    """Refuse to resume from files someone else could have written: ``run_dir``, ``checkpoints/``, ``latest`` and
    every directory and file under ``checkpoint`` must be plain (no symlinks), owned by this user or root and not
    writable by the group or others. Raises :class:`UntrustedCheckpointError` naming each bad path and its mode."""
    run_dir = Path(run_dir)
    paths = [run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "latest"]
    if checkpoint is not None:
        paths.append(Path(checkpoint))
        for root, dirs, files in os.walk(checkpoint):
            paths += [Path(root, name) for name in (*dirs, *files)]
    problems = [reason for p in paths if os.path.lexists(p) and (reason := untrusted_reason(p))]
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise UntrustedCheckpointError(
            f"refusing to resume run {run_dir}: resuming loads and runs what the checkpoint holds, and these paths "
            f"could have been written by someone else:\n  {shown}")


def _drop_group_other_write(path: Path, recursive: bool = True) -> None:
    """Remove group/other write permission from ``path`` (and everything under it): under a umask of 002 our own
    checkpoints would otherwise be refused by :func:`check_trusted`."""
    for p in (path, *(path.rglob("*") if recursive else ())):
        st = os.lstat(p)
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022 and st.st_uid == os.geteuid():
            os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o022)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process as tensors and plain types (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [int(version), [int(v) for v in internal], gauss],
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def plain_state(obj: Any, where: str = "state") -> Any:
    """``obj`` with numpy scalars/arrays as Python numbers/tensors; anything a weights-only load would refuse
    raises here, when the checkpoint is written, instead of when a resume tries to read it."""
    if isinstance(obj, dict):
        return {k: plain_state(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor)):
        return obj
    raise TypeError(f"{where} is a {type(obj).__name__}: checkpoint state must be tensors and plain types so that "
                    "it loads with weights_only=True")


def model_signature(model_cfg: Any) -> dict[str, Any]:
    """The parts of cfg.model that fix the parameter shapes; runtime options (backend, checkpointing) excluded."""
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    runtime = {"attn_backend", "grad_checkpointing", "group_t_window", "group_layers", "class_dropout_prob"}
    return {k: v for k, v in sorted(cfg.items()) if k not in runtime and v is not None}  # null: the size's default


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
        """The complete checkpoint ``latest`` names, or None for a fresh run; refused (before anything is read
        from it) when someone else could have written it (:func:`check_trusted`)."""
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        check_trusted(self.dir.parent)
        name = pointer.read_text().strip()
        path = self.dir / name
        if not STEP_DIR.match(name) or not (path / "meta.json").is_file():
            raise CheckpointMismatchError(f"{pointer} names {name!r}, which is not a complete checkpoint "
                                          f"directory under {self.dir}")
        check_trusted(self.dir.parent, path)
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
            _drop_group_other_write(self.dir, recursive=False)
        _barrier()
        use_weights_only_engine(engine)
        engine.save_checkpoint(str(tmp), tag="engine", save_latest=False)
        if fault_hook:
            fault_hook("engine_saved")
        ema_state = ema.full_state()  # rank 0 only; None elsewhere
        own = {"loaders": {k: v.state_dict() for k, v in loaders.items()}, "rng": rng_state()}
        torch.save(plain_state(own), tmp / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            torch.save(ema_state, tmp / "ema.pt")
            (tmp / "config.yaml").write_text(redacted_yaml(cfg))
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": self.world}, indent=1))
        del ema_state
        _barrier()
        if self.rank == 0:
            _drop_group_other_write(tmp)
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
        """Meta of ``path`` after checking it was written for this model."""
        meta = self.read_meta(path)
        want, have = model_signature(model_cfg), meta.get("model_signature")
        if have != want:
            diff = sorted(k for k in set(want) | set(have or {}) if (have or {}).get(k) != want.get(k))
            details = ", ".join(f"{k}: checkpoint {(have or {}).get(k)!r} vs config {want.get(k)!r}" for k in diff)
            raise CheckpointMismatchError(
                f"checkpoint {path} was written for another model ({details}); use a new run.dir or the same "
                f"model config")
        return meta  # a world-size change is checked by the trainer (gd.train.reshard), which knows the batch plan

    def load(self, path: Path, engine: Any, ema: ShardedEMA, loaders: dict[str, Any]) -> None:
        """Restore engine, EMA, loaders and RNG from ``path`` (collective); every file is read weights-only."""
        check_trusted(self.dir.parent, path)
        use_weights_only_engine(engine)
        old_world = int(self.read_meta(path)["world_size"])
        # A world-size change (gd.train.reshard, checked by the trainer): DeepSpeed refuses ZeRO partitions written by
        # another number of ranks, so it loads the module (and stage 0's whole optimizer) and we re-split the rest.
        resharded = old_world != self.world and engine.zero_optimization_stage() > 0
        load_path, _ = engine.load_checkpoint(str(path), tag="engine", load_optimizer_states=not resharded,
                                              load_lr_scheduler_states=True, load_module_strict=True)
        if load_path is None:
            raise CheckpointMismatchError(f"DeepSpeed found no engine state under {path / 'engine'}")
        if resharded:
            from gd.train.reshard import load_optimizer_resharded

            load_optimizer_resharded(engine, path / "engine", old_world)
        ema.refresh()
        # Memory-mapped: each rank reads only its own slices, not a whole CPU copy of the EMA.
        ema.load_full_state(load_weights_only(path / "ema.pt", map_location="cpu", mmap=True))
        if old_world == self.world:
            own = load_weights_only(path / f"rank_{self.rank:05d}.pt", map_location="cpu")
        else:
            from gd.train.reshard import merged_rank_state

            own = merged_rank_state(path, old_world, self.rank)
        for key, loader in loaders.items():
            loader.load_state_dict(own["loaders"][key])
        if own["rng"] is not None:
            set_rng_state(own["rng"])
        _barrier()


def export_ema(model_config: dict[str, Any], ema_state: dict[str, torch.Tensor], path: str | os.PathLike,
               objective: str | None = None) -> None:
    """Write the EMA in gd.models' export format (``{"format", "config", "model"}``, with the run's diffusion
    ``objective`` when given, which gd.sample checks) plus ``model.json`` beside it.

    A fresh CPU model is built from ``model_config`` (``model.config`` of the trained model) to check every key
    and shape and to supply the buffers (fp32 as built, whatever precision the engine trained in); this works
    under ZeRO-3, where the engine's own parameters are partitioned.
    """
    from gd.models import build_model, save_model

    kwargs = dict(model_config)
    fresh = build_model(kwargs.pop("name"), **kwargs)
    save_model(fresh, path, state_dict={**fresh.state_dict(), **ema_state}, objective=objective)
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
