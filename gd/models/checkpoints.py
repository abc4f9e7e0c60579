"""Loading official SiT/DiT checkpoints and our exported model files.

Accepted files (all read with ``torch.load(weights_only=True)``; a checkpoint is untrusted input):

* official released weights (willisma/SiT ``SiT-XL-2-256.pt``, facebookresearch/DiT ``DiT-XL-2-256x256.pt``):
  a flat state dict (the EMA weights);
* official ``train.py`` checkpoints ``{"model", "ema", "opt", "args"}``: the ``"ema"`` weights are used when
  present, else ``"model"``; ``args`` is an ``argparse.Namespace``, the only non-tensor class allow-listed;
* the released GroupDiff code's checkpoints (Dalby1379/GroupDiff ``checkpoint-*.pth``)
  ``{"model", "model_ema", "optimizer", ...}``: the ``"model_ema"`` weights, keys prefixed ``denoiser.``, the sample
  embedding as ``sample_embedder.embedding_table.weight`` (renamed to ``sample_embed``); :func:`is_released` says
  so for the entry. Their SiTs run in the reverse time convention (t = 1 noise, velocity eps - x): gd.sample wraps
  them in ``gd.diffusion.FromReverseTime`` (the flow objective's ``from_released``); their DiTs are called with
  DDPM indices as here and need nothing. Build the model with ``sample_embed="cond", max_group_size=<rows of the
  table>`` (4 for GroupDiff-4) and ``learn_sigma=False`` for a SiT (4 output channels), ``True`` for a DiT (8);
* our export (written by :func:`save_model`, used for the trainer's ``ema.pt``)::

      {"format": "gd.sit/1", "config": {"name": "SiT-XL/2", <every build_model argument>}, "model": state_dict}

  ``config`` rebuilds the model (:func:`load_model`). A flat state dict with a ``model.json`` (the same config
  as JSON) in its folder is accepted by :func:`load_model` too. The config is untrusted like the rest of the file:
  it is checked against :data:`CONFIG_BOUNDS` and built on the ``meta`` device (no memory) to compare every shape
  with the stored weights before the real model is allocated, so ``hidden_size=10**6`` fails at once.
  Every tensor must store its own elements (:func:`check_dense`: no expanded or overlapping views), so
  what a file makes us allocate is bounded by what it stores. :func:`build_checked` is that check, for every
  caller that builds a model from a file's config (``load_model``, ``gd.sample``, ``gd.evaluate``).

Keys prefixed by ``module.`` (DDP/DeepSpeed) or ``_orig_mod.`` (torch.compile) are unwrapped. Every key and
shape must match the model, except ``sample_embed``: official files lack it and it then keeps the model's
value, which leaves the official model exactly as it was only for ``sample_embed="tokens"`` (zero-initialised)
or ``"none"``; a "cond" model refuses such a file (its random embedding would shift every conditioning vector).
Anything else missing, unexpected or of another shape fails with one error listing all of it; nothing is loaded
in that case.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gd.io import atomic_torch_save
from gd.models.attention import BACKENDS
from gd.models.sit import BUILD_KEYS, EMBED_MODES, SiT, build_model

FORMAT = "gd.sit/1"
OPTIONAL_KEYS = ("sample_embed",)
_SAFE_GLOBALS = [argparse.Namespace]
_PREFIXES = ("module.", "_orig_mod.", "denoiser.")
RELEASED_ENTRY = "model_ema"
_RENAMES = {"sample_embedder.embedding_table.weight": "sample_embed"}


_LAYOUTS = ("expected a gd export {format, config, model}, an official SiT/DiT state dict or train.py dict "
            "{ema | model, opt, args}, or a released GroupDiff checkpoint {model_ema, model, optimizer, ...}")


def is_released(entry: str) -> bool:
    """Whether weights read from ``entry`` (as :func:`unpack_checkpoint` names it) come from the released GroupDiff
    code's checkpoints (its SiTs expect the reverse time convention; its DiTs DDPM indices, as here)."""
    return entry == RELEASED_ENTRY


# Bounds for a model config read from a file (SiT-XL/2: hidden 1152, depth 28, 16 heads, 32x32x4 latents): wide
# enough for any SiT a GroupDiff run trains, narrow enough that the shape check on the meta device is instant.
CONFIG_BOUNDS: dict[str, tuple[float, float]] = {
    "input_size": (1, 1024), "in_channels": (1, 64), "num_classes": (1, 1_000_000), "max_group_size": (1, 1024),
    "hidden_size": (4, 16384), "depth": (1, 256), "num_heads": (1, 256), "mlp_ratio": (0.25, 64.0),
    "class_dropout_prob": (0.0, 1.0),
}
_BOOL_KEYS = ("learn_sigma", "grad_checkpointing")
_MAX_SIDECAR = 1 << 20  # bytes of a model.json


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


def check_model_config(config: Any, source: str = "checkpoint") -> None:
    """Raise CheckpointError unless ``config`` (an embedded ``config`` or ``model.json``) has only build_model keys,
    each of the right type and within :data:`CONFIG_BOUNDS`; every problem is listed."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: the model config is a {type(config).__name__}, expected a dict")
    problems = []
    unknown = sorted(str(k) for k in config if k != "name" and k not in BUILD_KEYS)
    if unknown:
        problems.append(f"unknown keys {unknown}")
    if not isinstance(config.get("name"), str):
        problems.append(f"name={config.get('name')!r}: expected a model name such as 'SiT-XL/2'")
    for key, (lo, hi) in CONFIG_BOUNDS.items():
        if key not in config:
            continue
        value, integer = config[key], key not in ("mlp_ratio", "class_dropout_prob")
        kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not kind_ok or not lo <= value <= hi:
            problems.append(f"{key}={value!r}: expected {'an integer' if integer else 'a number'} in [{lo}, {hi}]")
    for key in _BOOL_KEYS:
        if key in config and not isinstance(config[key], bool):
            problems.append(f"{key}={config[key]!r}: expected true or false")
    embed = config.get("sample_embed", "cond")
    if not isinstance(embed, bool) and embed not in EMBED_MODES:  # booleans: exports written before the modes
        problems.append(f"sample_embed={embed!r}: expected one of {EMBED_MODES} (or true/false)")
    if "attn_backend" in config and config["attn_backend"] not in BACKENDS:
        problems.append(f"attn_backend={config['attn_backend']!r}: expected one of {BACKENDS}")
    for key, kind in (("group_layers", int), ("group_t_window", (int, float))):
        value = config.get(key)
        if value is not None and not (isinstance(value, list) and len(value) == 2
                                      and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)):
            problems.append(f"{key}={value!r}: expected null or a list of two numbers")
    if problems:
        raise CheckpointError(f"{source}: model config refused before building anything:\n  " + "\n  ".join(problems))


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> Any:
    """torch.load with weights_only=True and only argparse.Namespace allow-listed (official train.py args);
    ``mmap``: tensors map the file (zip format) instead of being read, so every process on a node shares one copy."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            if mmap and _is_zip(path):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it holds objects outside the allow-list (tensors, containers, "
            f"argparse.Namespace); it is not an official SiT/DiT or gd checkpoint, or was tampered with. "
            f"Unpickler said: {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {err}") from err


def unpack_checkpoint(obj: Any, source: str = "checkpoint") -> tuple[dict[str, Tensor], dict[str, Any] | None, str]:
    """(state dict, embedded config or None, which entry was used) from any accepted checkpoint layout."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict (state dict or checkpoint), got {type(obj).__name__}")
    config = None
    if obj.get("format") == FORMAT:
        state, config, entry = obj.get("model"), obj.get("config"), "model"
    elif isinstance(obj.get(RELEASED_ENTRY), dict):
        state, entry = obj[RELEASED_ENTRY], RELEASED_ENTRY
    elif isinstance(obj.get("ema"), dict):
        state, entry = obj["ema"], "ema"
    elif isinstance(obj.get("model"), dict):
        state, entry = obj["model"], "model"
    elif isinstance(obj.get("state_dict"), dict):
        state, entry = obj["state_dict"], "state_dict"
    else:
        state, entry = obj, "<flat>"
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{source}: no state dict found (top-level keys: {sorted(map(str, obj))[:10]}); "
                              f"{_LAYOUTS}")
    return normalise_state(state, source, entry), config, entry


def normalise_state(state: Any, source: str, entry: str) -> dict[str, Tensor]:
    """One entry of a checkpoint as a state dict in this model's key names: tensors only, wrapper prefixes
    (``module.``, ``_orig_mod.``, ``denoiser.``) stripped, the released sample embedding renamed."""
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{source}: entry {entry!r} holds no state dict; {_LAYOUTS}")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{source}: entry {entry!r} is not a state dict; non-tensor values under {sorted(map(str, bad))[:10]}; "
            f"{_LAYOUTS}"
        )
    check_dense(state, f"{source} [{entry}]")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return {_RENAMES.get(k, k): v for k, v in state.items()}


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _overlaps(t: Tensor) -> bool:
    """Whether two elements of ``t`` could share memory: sorted by stride, each dimension of size > 1 must step
    past everything the smaller ones reach (a stride 0, as ``expand`` makes, never does)."""
    reach = 1
    for step, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if step < reach:
            return True
        reach += (size - 1) * step
    return False


def check_dense(state: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError unless the stored bytes hold every element of every tensor once.

    torch.save keeps a view's small storage and its strides, so ``torch.zeros(1).expand(8192, 32768)`` is 4 bytes
    on disk and in memory, and a model built to fit its shape allocates all of it. Refused, naming the key: a tensor
    whose elements overlap (a stride 0, an expanded or self-overlapping view), and tensors that together need more
    bytes than the storage they share. What a file makes us allocate is then bounded by what it stores.
    """
    by_storage: dict[tuple[str, int], list[str]] = {}
    for key, t in state.items():
        if _overlaps(t):
            raise CheckpointError(
                f"{source}: tensor {key!r} (shape {tuple(t.shape)}, strides {t.stride()}) has overlapping elements "
                f"(an expanded or self-overlapping view): a weight must store each element; nothing was built")
        storage = t.untyped_storage()
        by_storage.setdefault((str(t.device), storage.data_ptr()), []).append(key)
    for keys in by_storage.values():
        storage = state[keys[0]].untyped_storage()
        need = sum(state[k].numel() * state[k].element_size() for k in keys)
        if need > storage.nbytes():
            shown = ", ".join(repr(k) for k in keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            raise CheckpointError(
                f"{source}: tensor{'s' if len(keys) > 1 else ''} {shown} need{'' if len(keys) > 1 else 's'} {need} "
                f"bytes but {'share' if len(keys) > 1 else 'has'} a storage of {storage.nbytes()} bytes: each "
                f"weight must store its own elements; nothing was built")


def _mismatch_report(model: SiT, state: dict[str, Tensor]) -> list[str]:
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in OPTIONAL_KEYS]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = "\n    ".join(items[:25]) + (f"\n    ... and {len(items) - 25} more" if len(items) > 25 else "")
            lines.append(f"  {title} ({len(items)}):\n    {shown}")
    return lines


def _file_learns_sigma(state: dict[str, Tensor]) -> bool | None:
    """Whether a state dict's final layer has 2C output channels (learned variance), from its patch embedding's C
    and patch size; None when the keys are missing."""
    patch, head = state.get("x_embedder.proj.weight"), state.get("final_layer.linear.weight")
    if patch is None or head is None or patch.ndim != 4:
        return None
    return head.shape[0] == 2 * patch.shape[1] * patch.shape[-1] * patch.shape[-2]


def load_state(model: SiT, state: dict[str, Tensor], source: str = "state dict", entry: str = "") -> list[str]:
    """Copy ``state`` into ``model`` after checking every key and shape; returns the optional keys it lacked.
    ``entry`` (from :func:`unpack_checkpoint`) adds what a released GroupDiff file needs to the error."""
    problems = _mismatch_report(model, state)
    mode = getattr(model, "embed_mode", "none")
    if not problems and mode == "cond" and "sample_embed" not in state:
        problems = ["  missing keys (1):\n    sample_embed (a sample_embed='cond' model adds it to every conditioning "
                    "vector; an official SiT/DiT file has none: build the model with sample_embed='none')"]
    if problems:
        hint = ""
        if "sample_embed" in state and model.sample_embed is None:
            hint = "\n  hint: the checkpoint has a sample embedding; build the model with sample_embed='cond' or 'tokens'"
        if is_released(entry) and "sample_embed" in state:
            rows = state["sample_embed"].shape[0]
            learn = _file_learns_sigma(state)
            kind = "" if learn is None else ("DiT " if learn else "SiT ")
            sigma = "" if learn is None else f"model.learn_sigma={str(learn).lower()} "
            hint += (f"\n  hint: a released GroupDiff {kind}file needs {sigma}model.sample_embed=cond "
                     f"model.max_group_size={rows}")
        raise CheckpointError(
            f"{source} does not fit {model.config.get('name', type(model).__name__)} "
            f"(nothing was loaded):\n" + "\n".join(problems) + hint
        )
    model.load_state_dict(state, strict=False)
    return [k for k in OPTIONAL_KEYS if k in model.state_dict() and k not in state]


def load_pretrained(model: SiT, path: str | os.PathLike) -> dict[str, Any]:
    """Load official SiT/DiT weights or a gd export into ``model`` (in place, any dtype/device).

    Returns ``{"entry": "ema"|"model"|"<flat>"|..., "absent_optional": [...], "config": embedded config or None}``.
    """
    state, config, entry = unpack_checkpoint(read_checkpoint(path), source=str(path))
    absent = load_state(model, state, source=f"{path} [{entry}]", entry=entry)
    return {"entry": entry, "absent_optional": absent, "config": config}


def save_model(model: SiT, path: str | os.PathLike, state_dict: dict[str, Tensor] | None = None, *,
               objective: str | None = None) -> None:
    """Write ``{"format", "config", "model"}`` atomically (temp file + os.replace); tensors go to CPU.

    ``state_dict`` replaces the model's own weights (e.g. the EMA copy) and must fit the model. ``objective``
    ("flow" | "ddpm", the diffusion it was trained with) is stored as ``"objective"`` so sampling with the other
    one is refused (:func:`stored_objective`).
    """
    if not model.config:
        raise ValueError("model.config is empty: build the model with gd.models.build_model so it can be rebuilt")
    state = model.state_dict() if state_dict is None else state_dict
    problems = _mismatch_report(model, state)
    if problems:
        raise CheckpointError("state_dict does not fit the model:\n" + "\n".join(problems))
    payload = {"format": FORMAT, "config": dict(model.config), "model": {k: v.detach().cpu() for k, v in state.items()}}
    if objective is not None:
        payload["objective"] = str(objective)
    atomic_torch_save(payload, path)


def stored_objective(obj: Any) -> str | None:
    """The diffusion objective a gd export (as read by :func:`read_checkpoint`) says it was trained with, or None
    (official and released files, exports written before the objective was recorded)."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT and isinstance(obj.get("objective"), str):
        return obj["objective"]
    return None


def sidecar_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``model.json`` beside ``path`` (the config of a flat state dict), or None when there is none; like the
    file itself it is untrusted, and checked by :func:`build_checked`."""
    sidecar = Path(path).parent / "model.json"
    if not sidecar.is_file():
        return None
    if sidecar.stat().st_size > _MAX_SIDECAR:
        raise CheckpointError(f"{sidecar} is {sidecar.stat().st_size} bytes; a model config is under {_MAX_SIDECAR}")
    try:
        return json.loads(sidecar.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{sidecar} is not a JSON model config: {err}") from err


def build_checked(config: Any, state: dict[str, Tensor], source: str, entry: str = "") -> SiT:
    """Build the model an untrusted ``config`` (a file's embedded config or ``model.json``) describes and load
    ``state`` into it, allocating nothing until the config is within :data:`CONFIG_BOUNDS` and the same model
    built on the ``meta`` device has every key and shape of ``state`` (whose tensors :func:`unpack_checkpoint`
    has checked to be dense, so the real model is no larger than what the file stores)."""
    check_model_config(config, source)
    config = dict(config)
    name = config.pop("name")
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated until they match the stored weights
            shapes = build_model(name, **config)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{source}: its model config cannot be built: {err}") from err
    where = f"{source} [{entry}]" if entry else source
    problems = _mismatch_report(shapes, state)
    if problems:
        raise CheckpointError(f"{where}: the weights do not fit the model its config describes (nothing "
                              f"was built):\n" + "\n".join(problems))
    model = build_model(name, **config)
    load_state(model, state, source=where)
    return model


def load_model(path: str | os.PathLike, **overrides: Any) -> SiT:
    """Rebuild and load a model from a gd export (embedded config) or a flat file with ``model.json`` beside it.

    ``overrides`` change runtime options of the stored config (e.g. ``attn_backend``, ``group_t_window``).
    """
    path = Path(path)
    state, config, entry = unpack_checkpoint(read_checkpoint(path), source=str(path))
    if config is None:
        config = sidecar_config(path)
    if config is None:
        raise CheckpointError(
            f"{path} has no embedded model config and there is no {path.parent / 'model.json'}; use "
            f"build_model(...) and load_pretrained(model, path) for official checkpoints"
        )
    return build_checked({**config, **overrides} if isinstance(config, dict) else config, state, str(path), entry)
