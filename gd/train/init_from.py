"""Starting a run from a pretrained file (``train.init_from``): fine-tuning a converged SiT/DiT.

The first start of a run copies the file's weights into the network (and its EMA into the EMA); the optimizer, the
step counter, the data position and the LR schedule start fresh, as the released GroupDiff ``train.py --load_from``
does. Once the run has a checkpoint of its own, the trainer resumes from that and ignores ``init_from``.

Accepted files (read weights-only, memory-mapped; refused when a symlink, foreign-owned or group/other-writable, like
a resume): official SiT/DiT (flat, or ``train.py``'s ``{model, ema, opt, args}``), REPA (``{model, ema, ...}`` with
``projectors.*``, dropped), the released GroupDiff files (``{model, model_ema, ...}``), a gd export (``ema.pt``) and
a gd step checkpoint folder (its fp32 master weights and ``ema.pt``).

What is changed on the way, every change listed (:attr:`Pretrained.notes`): REPA's and the released SiTs run in the
reverse time convention (t = 1 noise, velocity eps - x), so their time embedding's first layer and the velocity head
are rewritten exactly into this stack's convention (u(x, t) = -v'(x, 1 - t); docs/finetune.md); a learned-sigma head
feeding a run without one keeps its velocity channels (the flow objective never reads the others); a sample
embedding the file lacks keeps the run's own initialisation (N(0, 0.02) for ``sample_embed=cond``, as released).
Anything else missing, unexpected or mis-shaped is refused in one error listing all of it, before anything is built.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gd.io import untrusted_reason
from gd.models.checkpoints import (
    CheckpointError, FORMAT, RELEASED_ENTRY, normalise_state, read_checkpoint, stored_objective,
)

WEIGHTS = ("model", "ema")        # train.init_weights: which of the file's weight sets seeds the network
EMA_SOURCES = ("file", "weights")  # train.init_ema: the file's EMA (when it has one) or a copy of the network's
TIMES = ("auto", "forward", "reverse")  # train.init_time: the file's time convention (auto: from its layout)
DROPPED_PREFIXES = ("projectors.",)     # REPA's representation-alignment heads: not part of the denoiser
_HEAD = "final_layer.linear."
_T_IN = "t_embedder.mlp.0.weight"


class InitFromError(CheckpointError):
    """A ``train.init_from`` file that cannot start this run."""


@dataclass
class Pretrained:
    """What ``train.init_from`` starts the run with: full state dicts in the run model's keys and shapes."""

    path: Path
    layout: str
    weights: dict[str, Tensor]
    ema: dict[str, Tensor] | None          # None: the EMA starts as a copy of ``weights``
    weights_entry: str
    ema_entry: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """A plain record of where the run's initial weights came from (logged, stored in every checkpoint)."""
        return {"path": str(self.path), "layout": self.layout, "weights": self.weights_entry, "ema": self.ema_entry,
                "notes": list(self.notes)}


def check_init_cfg(train: Mapping[str, Any]) -> None:
    """``train.init_weights`` / ``init_ema`` / ``init_time``: ValueError naming a value outside its choices."""
    for key, choices in (("init_weights", WEIGHTS), ("init_ema", EMA_SOURCES), ("init_time", TIMES)):
        value = train.get(key, choices[0])
        if value not in choices:
            raise ValueError(f"train.{key}={value!r}: expected one of {', '.join(choices)}")


def check_init_file(path: Path) -> None:
    """The trust rule of a resume, for a file that will be loaded: it and everything under it (a step folder) must
    be plain, ours or root's, not group/other-writable, and readable."""
    if not os.path.lexists(path):
        raise InitFromError(f"train.init_from={path}: no such file (fetch the pretrained checkpoint first; "
                            "docs/finetune.md lists where each one comes from)")
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            paths += [Path(root, name) for name in (*dirs, *files)]
    problems = [reason for p in paths if (reason := untrusted_reason(p))]
    problems += [f"{p} is not readable by this user" for p in paths if not os.access(p, os.R_OK)]
    if problems:
        raise InitFromError(f"refusing train.init_from={path}: loading it puts its contents into the model, and "
                            "these paths could have been written by someone else:\n  " + "\n  ".join(problems[:10]))


def read_pretrained(path: str | os.PathLike, model_kwargs: Mapping[str, Any], objective: str, *,
                    init_weights: str = "model", init_ema: str = "file", init_time: str = "auto") -> Pretrained:
    """Read ``path`` on the CPU (memory-mapped) and fit it to the model ``model_kwargs`` (build_model arguments,
    ``name`` included) for the ``objective`` ("flow" | "ddpm"); raises :class:`InitFromError` listing every misfit.
    Nothing is allocated for the model: its shapes come from a build on the meta device."""
    check_init_cfg({"init_weights": init_weights, "init_ema": init_ema, "init_time": init_time})
    path = Path(path)
    check_init_file(path)
    if path.is_dir():
        layout, entries, trained = _read_step_folder(path)
    else:
        layout, entries, trained = _read_file(path)
    if trained is not None and trained != objective:
        raise InitFromError(f"train.init_from={path} was trained with diffusion.objective={trained}, this run has "
                            f"{objective}")
    weights_entry = "ema" if init_weights == "ema" and "ema" in entries else "model"
    ema_entry = "ema" if init_ema == "file" and "ema" in entries else weights_entry
    reverse = init_time == "reverse" or (init_time == "auto" and objective == "flow"
                                         and layout in ("REPA", "released GroupDiff"))
    own, buffers = _model_shapes(model_kwargs)
    notes: list[str] = []
    states = {}
    for entry in dict.fromkeys((weights_entry, ema_entry)):
        states[entry] = _fit(entries[entry], own, buffers, objective, reverse, notes, f"{path} [{entry}]")
    return Pretrained(path, layout, states[weights_entry], states[ema_entry] if ema_entry != weights_entry else None,
                      weights_entry, ema_entry, notes)


Entries = dict[str, "dict[str, Tensor] | str"]  # "model" always, "ema" when the file has one; a str: unavailable, why


def _read_file(path: Path) -> tuple[str, Entries, str | None]:
    """(layout, {"model": state, "ema": state?}, objective the file says it was trained with)."""
    obj = read_checkpoint(path, mmap=True)
    if not isinstance(obj, dict):
        raise InitFromError(f"train.init_from={path}: expected a state dict or checkpoint dict, got "
                            f"{type(obj).__name__}")
    src = str(path)
    if obj.get("format") == FORMAT:
        state = normalise_state(obj.get("model"), src, "model")
        return "gd export", {"model": state}, stored_objective(obj)
    if isinstance(obj.get(RELEASED_ENTRY), dict):
        ema = normalise_state(obj[RELEASED_ENTRY], src, RELEASED_ENTRY)
        model = normalise_state(obj["model"], src, "model") if isinstance(obj.get("model"), dict) else ema
        return "released GroupDiff", {"model": model, "ema": ema}, None
    if isinstance(obj.get("ema"), dict) or isinstance(obj.get("model"), dict):
        entries = {k: normalise_state(obj[k], src, k) for k in ("model", "ema") if isinstance(obj.get(k), dict)}
        entries.setdefault("model", entries.get("ema"))
        return ("REPA" if _is_repa(entries) else "official train.py"), entries, None
    if isinstance(obj.get("state_dict"), dict):
        entries = {"model": normalise_state(obj["state_dict"], src, "state_dict")}
    else:
        entries = {"model": normalise_state(obj, src, "<flat>")}
    return ("REPA" if _is_repa(entries) else "official SiT/DiT (flat)"), entries, None


def _is_repa(entries: Mapping[str, Mapping[str, Tensor]]) -> bool:
    """REPA's SiTs carry their alignment projectors (its released last.pt: a flat EMA state dict with them)."""
    return any(k.startswith(DROPPED_PREFIXES) for state in entries.values() for k in state)


def _read_step_folder(path: Path) -> tuple[str, Entries, str | None]:
    """A gd step checkpoint: the fp32 master weights (ZeRO 0-2) as "model", the consolidated EMA as "ema"."""
    from gd.train.checkpoint import load_weights_only
    from gd.train.reshard import checkpoint_settings, master_weights

    if not (path / "meta.json").is_file() or not (path / "ema.pt").is_file():
        raise InitFromError(f"train.init_from={path} is a folder but not a gd step checkpoint (it needs meta.json "
                            "and ema.pt; a run's newest is <run.dir>/checkpoints/step_XXXXXXXX)")
    meta = json.loads((path / "meta.json").read_text())
    ema = normalise_state(load_weights_only(path / "ema.pt", map_location="cpu", mmap=True), str(path), "ema.pt")
    try:
        model: dict[str, Tensor] | str = master_weights(path / "engine", checkpoint_settings(path))
    except ValueError as err:  # ZeRO-3 / BF16_Optimizer partitions: only the EMA can seed the run
        model = str(err)
    return "gd step checkpoint", {"model": model, "ema": ema}, meta.get("objective", "flow")


def _model_shapes(model_kwargs: Mapping[str, Any]) -> tuple[dict[str, torch.Size], set[str]]:
    """The run model's state-dict shapes and its buffer names, from a build on the meta device (no memory)."""
    from gd.models import build_model

    kwargs = dict(model_kwargs)
    name = kwargs.pop("name")
    with torch.device("meta"):
        model = build_model(name, **kwargs)
    return {k: v.shape for k, v in model.state_dict().items()}, {k for k, _ in model.named_buffers()}


def _fit(state: dict[str, Tensor] | str, own: dict[str, torch.Size], buffers: set[str], objective: str,
         reverse: bool, notes: list[str], source: str) -> dict[str, Tensor]:
    """``state`` in the run model's keys and shapes (unfilled keys left out), or InitFromError listing misfits."""
    if isinstance(state, str):
        raise InitFromError(f"{source}: {state}; set train.init_weights=ema to start from its EMA")
    state = dict(state)
    dropped = sorted(k for k in state if k.startswith(DROPPED_PREFIXES))
    for k in dropped:
        del state[k]
    _note(notes, f"dropped {len(dropped)} keys not part of the denoiser: " + _short(dropped), bool(dropped))
    head_w, head_b = state.get(_HEAD + "weight"), state.get(_HEAD + "bias")
    channels = _channels(state, own)
    if head_w is not None and (_HEAD + "weight") in own and channels is not None:
        c, p2 = channels
        have, want = head_w.shape[0] // p2, own[_HEAD + "weight"][0] // p2
        if have == 2 * c and want == c and objective == "flow":
            state[_HEAD + "weight"] = head_w.view(p2, 2 * c, -1)[:, :c].reshape(p2 * c, -1)
            state[_HEAD + "bias"] = head_b.view(p2, 2 * c)[:, :c].reshape(p2 * c)
            _note(notes, f"final_layer.linear: kept the {c} velocity channels of the file's {2 * c} (its learned-"
                         "sigma half is never read by the flow objective; model.learn_sigma=false)")
    # A run's EMA (ema.pt of a step folder) holds parameters only; buffers (the fixed pos_embed) are the model's.
    missing = [k for k in own if k not in state and k != "sample_embed" and k not in buffers]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k])}" for k in own
              if k in state and state[k].shape != own[k]]
    if missing or unexpected or shapes:
        lines = [f"  {title} ({len(items)}):\n    " + "\n    ".join(items[:25])
                 + (f"\n    ... and {len(items) - 25} more" if len(items) > 25 else "")
                 for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("shape mismatches", shapes)) if items]
        raise InitFromError(f"{source} does not fit this run's model (model.* settings; nothing was built):\n"
                            + "\n".join(lines))
    if "sample_embed" in own and "sample_embed" not in state:
        _note(notes, "sample_embed: not in the file; initialised as the run's model initialises it (N(0, 0.02) for "
                     "sample_embed=cond, the released code's; zeros for tokens)")
    if reverse:
        if objective != "flow":
            raise InitFromError(f"{source}: train.init_time=reverse applies to the flow objective only")
        _to_forward_time(state, channels)
        _note(notes, "time: the file runs in the reverse convention (t = 1 noise, velocity eps - x; REPA, released "
                     "GroupDiff SiT); t_embedder.mlp.0.weight and the velocity head were rewritten exactly into this "
                     "stack's (t = 0 noise): u(x, t) = -v'(x, 1 - t)")
    return state


def _channels(state: Mapping[str, Tensor], own: Mapping[str, torch.Size]) -> tuple[int, int] | None:
    """(latent channels C, patch area p*p) from the patch embedding (the run's, else the file's)."""
    w = own.get("x_embedder.proj.weight") or (state["x_embedder.proj.weight"].shape
                                              if "x_embedder.proj.weight" in state else None)
    return None if w is None or len(w) != 4 else (int(w[1]), int(w[2] * w[3]))


@torch.no_grad()
def _to_forward_time(state: dict[str, Tensor], channels: tuple[int, int] | None) -> None:
    """Rewrite a reverse-time SiT so that model(x, t) = -file_model(x, 1 - t), exactly.

    The sinusoidal time features are [cos(f t), sin(f t)] per frequency f; those of 1 - t are a fixed rotation of
    those of t (cos(f - ft) = cos f cos ft + sin f sin ft, sin(f - ft) = sin f cos ft - cos f sin ft), so the first
    time layer absorbs it: W' = W R. Negating the velocity rows of the output layer flips the velocity's sign."""
    from gd.models.sit import TimestepEmbedder

    w = state[_T_IN].double()
    half = w.shape[1] // 2
    freqs = TimestepEmbedder.timestep_embedding(torch.ones(1), 2 * half)  # [cos f, sin f] in the model's fp32 freqs
    cos_f, sin_f = freqs[0, :half].double(), freqs[0, half:].double()
    a, b = w[:, :half], w[:, half:2 * half]
    out = w.clone()
    out[:, :half] = a * cos_f + b * sin_f
    out[:, half:2 * half] = a * sin_f - b * cos_f
    state[_T_IN] = out.to(state[_T_IN].dtype)
    c, p2 = channels if channels is not None else (None, None)
    head_w, head_b = state[_HEAD + "weight"], state[_HEAD + "bias"]
    rows = head_w.shape[0] // p2 if p2 else None
    sign = torch.ones(head_w.shape[0], dtype=head_w.dtype)
    if rows is not None and c is not None:
        sign.view(p2, rows)[:, :c] = -1.0   # velocity channels only; a learned-sigma half keeps its sign
    else:
        sign.fill_(-1.0)
    state[_HEAD + "weight"] = head_w * sign[:, None]
    state[_HEAD + "bias"] = head_b * sign


def _note(notes: list[str], text: str, when: bool = True) -> None:
    if when and text not in notes:
        notes.append(text)


def _short(keys: list[str]) -> str:
    heads = sorted({k.split(".")[0] + "." + k.split(".")[1] if k.count(".") else k for k in keys})
    return ", ".join(heads[:6]) + (" ..." if len(heads) > 6 else "")


def fill(model: torch.nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` completed with the model's own values for the keys it leaves to the model (``sample_embed``), as
    fp32 CPU tensors: a full state dict of ``model``."""
    own = model.state_dict()
    return {k: (state[k] if k in state else own[k]).detach().to("cpu", torch.float32) for k in own}


def load_weights(model: torch.nn.Module, pretrained: Pretrained) -> None:
    """Copy the pretrained weights into ``model`` (before the engine wraps it) and complete ``pretrained``'s states
    with the keys the model keeps (so the EMA seeds agree with the network on them)."""
    pretrained.weights = fill(model, pretrained.weights)
    if pretrained.ema is not None:
        pretrained.ema = fill(model, pretrained.ema)
    model.load_state_dict(pretrained.weights, strict=True)


def describe(pretrained: Pretrained) -> str:
    """One log paragraph: the file, its layout, the entries used, and every change."""
    ema = "a copy of the weights" if pretrained.ema is None else f"the file's {pretrained.ema_entry!r}"
    lines = [f"initialised from {pretrained.path} ({pretrained.layout}): weights from {pretrained.weights_entry!r}, "
             f"EMA from {ema}; optimizer, step, data position and LR schedule start fresh"]
    return "\n  ".join(lines + pretrained.notes)

