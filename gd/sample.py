"""Class-balanced group sampling at scale: ``python -m gd.sample [ckpt=...] [sample.key=value ...]``.

Layout. With C classes, P = num_images / C images per class and group size N, every class gets
ceil(P / N) groups of N members sharing its label. Groups are numbered class-interleaved (group g has class
g mod C) and slot j belongs to group j // N; when N does not divide P the last group of each class generates
a few extra members that are dropped, so the output keeps exactly P per class. The kept slots, in slot
order, are the output images 0..num_images-1.

Sampler. ``diffusion.objective`` picks it (gd.diffusion.objectives): flow (SiT) with ``sample.method`` sde | euler |
heun | dopri5, or ddpm (DiT) with ddpm | ddim over ``sample.steps`` respaced DDPM steps; a method of the other
objective is refused before anything is loaded.

Determinism. The starting noise of slot j comes from a generator seeded by (seed, j), so the same seed
gives the same noise whatever rank or batch generates it. Chunks of ``batch_groups`` groups are the unit of
work, of the sampler's noise (SDE, DDPM, DDIM with eta > 0: one generator per (seed, chunk)) and of resumption;
they are assigned to ranks round-robin, so 1 rank and W ranks produce identical chunks. Changing
``batch_groups`` changes the sampler's noise.

Group parallelism (``sample.group_parallel`` P, gd.models.group_parallel): P consecutive ranks share each group,
so groups larger than one GPU holds (N = 64) can be generated. They form one replica, which takes the chunks one
rank would (round-robin over world/P replicas); each rank runs the model on its members of every group of the
chunk (r*N/P .. (r+1)*N/P - 1) and the outputs are all-gathered, so every rank of the replica integrates the whole
chunk: the sampler's noise, CFG and dopri5's adaptive steps (its error norm over the whole state) are those of one
process, with no further collective, and the replica's first rank decodes and writes the chunk as one process
would. The images equal those of P = 1 up to rounding (a matmul over a different batch shape rounds differently,
with or without group parallelism); in float64 the files are byte-identical (tested).

Outputs under ``sample.out`` (written atomically, a finished chunk is never redone):
  settings.json                 what determines the images (checked on resume) and its hash
  chunks/chunk_XXXXXX.npz       uint8 images, labels, output indices, slots of one chunk (written last)
  png/chunk_XXXXXX.tar          the chunk's PNGs, ``<index>_<class>.png``
  samples.npz                   ADM layout: arr_0 uint8 N×H×W×3, arr_1 int64 labels (assembled by rank 0)
  grid.png                      rows = classes, columns = their first images
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import tarfile
import time
import zipfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from gd.distributed import env as _env
from gd.distributed.layout import ParallelLayout
from gd.io import atomic_path, atomic_write_bytes
from gd.rng import mix_seed, seeded_generator

if TYPE_CHECKING:
    from gd.diffusion.objectives import Objective, Sampler
    from gd.models.group_parallel import GroupParallel

PRECISIONS = ("fp32", "tf32", "bf16")
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: identical runs write identical bytes


# ------------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class Layout:
    """Which slot holds which class and output index; see the module docstring."""

    num_images: int
    num_classes: int
    group_size: int
    batch_groups: int

    def __post_init__(self) -> None:
        for name in ("num_images", "num_classes", "group_size", "batch_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"sample.{name}={getattr(self, name)}: expected a positive integer")
        if self.num_images % self.num_classes:
            raise ValueError(f"sample.num_images={self.num_images} is not a multiple of num_classes="
                             f"{self.num_classes}: class-balanced sampling needs the same count per class")

    @property
    def per_class(self) -> int:
        return self.num_images // self.num_classes

    @property
    def groups_per_class(self) -> int:
        return math.ceil(self.per_class / self.group_size)

    @property
    def num_groups(self) -> int:
        return self.num_classes * self.groups_per_class

    @property
    def num_slots(self) -> int:
        return self.num_groups * self.group_size

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_groups / self.batch_groups)

    def slot_labels(self, slots: np.ndarray) -> np.ndarray:
        return (slots // self.group_size) % self.num_classes

    def slot_kept(self, slots: np.ndarray) -> np.ndarray:
        rounds = (slots // self.group_size) // self.num_classes
        return rounds * self.group_size + slots % self.group_size < self.per_class

    def output_index(self, slots: np.ndarray) -> np.ndarray:
        """Output index of each kept slot (-1 for dropped ones)."""
        kept = self.slot_kept(np.arange(self.num_slots))
        index = np.cumsum(kept) - 1
        return np.where(kept[slots], index[slots], -1)

    def chunk_slots(self, chunk: int) -> np.ndarray:
        g0 = chunk * self.batch_groups
        g1 = min(g0 + self.batch_groups, self.num_groups)
        return np.arange(g0 * self.group_size, g1 * self.group_size)

    def rank_chunks(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, self.num_chunks, world_size))


def slot_noise(seed: int, slots: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Starting noise (float32, CPU) of each slot, from a generator seeded by (seed, slot)."""
    gen = torch.Generator()
    out = torch.empty((len(slots), *shape))
    for i, j in enumerate(slots):
        gen.manual_seed(mix_seed(seed, 0, int(j)))
        out[i] = torch.randn(shape, generator=gen)
    return out


def chunk_generator(seed: int, chunk: int, stream: int = 1) -> torch.Generator:
    """CPU generator of a chunk's sampler noise (stream 1) or sample-embedding slots (stream 2): the same on every
    device and rank."""
    return seeded_generator(seed, stream, chunk)


class SeededSlots:
    """``net(x, t, y, group_size)`` with a "cond" sample embedding's random slots drawn from ``generator`` (on the
    CPU, so any device and rank draws the same ones) instead of torch's global generator: a chunk's images do not
    depend on which rank makes it, or on what ran before."""

    def __init__(self, net: Callable[..., torch.Tensor], model: torch.nn.Module, generator: torch.Generator) -> None:
        self.net, self.model, self.generator = net, model, generator
        self.num_classes = model.num_classes

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, group_size: int) -> torch.Tensor:
        slots = self.model.draw_slots(x.shape[0], group_size, self.generator, whole=True).to(x.device)
        return self.net(x, t, y, group_size, slots=slots)


class MemberSplit:
    """``net(x, t, y, group_size, **kwargs)`` on a chunk's whole groups (G*N, group-major) computed by the P ranks
    of a group-parallel group: each runs ``net`` on its members of every group (gd.diffusion.plan.Shard; any
    per-image tensor argument is split alike) and the outputs are all-gathered, identical on every rank."""

    def __init__(self, net: Callable[..., torch.Tensor], ctx: GroupParallel, group_size: int) -> None:
        from gd.diffusion.plan import Shard

        self.net, self.ctx, self.group_size = net, ctx, int(group_size)
        self.shard = Shard(ctx.degree, ctx.rank)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, group_size: int,
                 **kwargs: Any) -> torch.Tensor:
        batch = x.shape[0]

        def take(value: Any) -> Any:
            per_image = torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch
            return self.shard.take(value, self.group_size) if per_image else value

        out = self.net(take(x), take(t), take(y), group_size, **{k: take(v) for k, v in kwargs.items()})
        return self.ctx.gather_members(out, self.group_size)


def sample_layout(s: DictConfig, world_size: int, heads: int | None = None) -> ParallelLayout:
    """``cfg.sample``'s group-parallel layout on ``world_size`` processes (P = ``sample.group_parallel``, N = the
    layout's group size, which both CFG branches' batches are made of), checked: a ValueError naming the values."""
    return ParallelLayout.resolve(world_size, s.get("group_parallel") or 1, int(s.group_size), heads,
                                  s.get("group_parallel_impl"), section="sample")


def _group_parallel(p: int, impl: str, rank: int, world_size: int, device: torch.device) -> GroupParallel:
    """The group-parallel groups of P consecutive ranks (the process group started from the env:// variables
    torchrun or gd.launch set, unless the caller started one)."""
    import torch.distributed as dist

    from gd.models.group_parallel import new_group_parallel

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://", rank=rank,
                                world_size=world_size)
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ValueError(f"rank {rank} of {world_size} but the process group has rank {dist.get_rank()} of "
                         f"{dist.get_world_size()}")
    return new_group_parallel(p, impl)


def _agreed(todo: list[int], ctx: GroupParallel | None, rank: int, device: torch.device) -> list[int]:
    """The chunks the replica's first rank found unfinished, on every rank of the replica: they must run the same
    chunks together (their collectives pair up), whatever a shared file system shows each of them."""
    if ctx is None:
        return todo
    import torch.distributed as dist

    box = [todo]
    dist.broadcast_object_list(box, src=rank - ctx.rank, group=ctx.group,
                               device=device if device.type == "cuda" else None)
    return list(box[0])


# --------------------------------------------------------------------------------------- atomic writers


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def write_npz(path: Path, arrays: dict[str, Any]) -> None:
    """Atomic, byte-reproducible .npz (stored, fixed timestamps). A value is an array, or (shape, dtype,
    iterable of arrays) streamed in order so a 50k×256×256×3 file never sits in memory."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            if isinstance(value, tuple):
                shape, dtype, parts = value
            else:
                arr = np.ascontiguousarray(value)
                shape, dtype, parts = arr.shape, arr.dtype, [arr]
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            written = 0
            with zf.open(info, "w", force_zip64=True) as fh:
                fh.write(_npy_header(shape, dtype))
                for part in parts:
                    part = np.ascontiguousarray(part, dtype=dtype)
                    fh.write(part.tobytes())
                    written += part.size
            if written != int(np.prod(shape)):
                raise RuntimeError(f"{path}:{name}: wrote {written} values, expected shape {shape}")


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_png_tar(path: Path, images: np.ndarray, indices: np.ndarray, labels: np.ndarray) -> None:
    """A tar of PNGs named ``<index>_<class>.png`` with fixed metadata (reproducible bytes), atomically."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for image, index, label in zip(images, indices, labels):
            data = png_bytes(image)
            info = tarfile.TarInfo(f"{int(index):06d}_{int(label)}.png")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    atomic_write_bytes(Path(path), buf.getvalue())


def class_grid(images: np.ndarray, labels: np.ndarray, classes: int, per_class: int, pad: int = 2) -> np.ndarray:
    """uint8 grid: one row per class (first ``classes`` classes), its first ``per_class`` images."""
    h, w = images.shape[1:3]
    rows = [c for c in range(classes) if (labels == c).any()]
    grid = np.full((len(rows) * (h + pad) + pad, per_class * (w + pad) + pad, 3), 255, np.uint8)
    for r, c in enumerate(rows):
        for k, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            y, x = pad + r * (h + pad), pad + k * (w + pad)
            grid[y:y + h, x:x + w] = images[i]
    return grid


# ------------------------------------------------------------------------------------------------ model


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_path(cfg: DictConfig) -> Path:
    """``ckpt`` (top level, gd.evaluate's argument) or ``sample.ckpt``; must exist."""
    ckpt = cfg.get("ckpt") or cfg.sample.get("ckpt")
    if not ckpt:
        raise ValueError("no checkpoint: pass ckpt=<run.dir>/ema.pt (or an official SiT file with model=...)")
    path = Path(str(ckpt)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint ckpt={ckpt!r} does not exist or is not a file")
    return path


def sampling_objective(cfg: DictConfig, model_config: Any = None) -> Objective:
    """``cfg.diffusion``'s objective (flow when the config has none), checked against ``model_config`` when given
    (the loaded model's config: its time window, its learned variance)."""
    from gd.diffusion.objectives import build_objective

    diffusion = cfg.get("diffusion")
    return build_objective(diffusion if diffusion is not None else {}, model_config)


def load_sampling_model(cfg: DictConfig, path: Path) -> tuple[torch.nn.Module, dict]:
    """Our export (embedded config or model.json beside it) rebuilds itself; an official SiT/DiT file or a released
    GroupDiff checkpoint is loaded into ``build_model(cfg.model.name, **cfg.model)``, the latter as the run's
    objective takes it (a released SiT through ``FromReverseTime``: it samples in the reverse time convention; a
    released DiT as it is). An export that records another objective than ``cfg.diffusion.objective`` is refused."""
    from gd.models import build_model
    from gd.models.checkpoints import (build_checked, is_released, load_state, read_checkpoint, sidecar_config,
                                       stored_objective, unpack_checkpoint)

    objective = sampling_objective(cfg)
    raw = read_checkpoint(path)
    trained = stored_objective(raw)
    if trained is not None and trained != objective.name:
        raise ValueError(f"{path} was trained with diffusion.objective={trained}, but this config samples with "
                         f"diffusion.objective={objective.name}: use the run's own experiment (e.g. "
                         "+exp=groupdiff4_dit for a DDPM/DiT run, +exp=groupdiff4 for a flow/SiT one)")
    state, config, entry = unpack_checkpoint(raw, source=str(path))
    if config is None:
        config = sidecar_config(path)
    overrides = cfg.sample.get("model_overrides")
    runtime = dict(OmegaConf.to_container(overrides, resolve=True)) if overrides else {}
    if config is not None:  # the file's own config: untrusted, checked before anything is allocated
        model = build_checked({**config, **runtime} if isinstance(config, dict) else config, state, str(path), entry)
        source = "gd export"
    else:
        kw = OmegaConf.to_container(cfg.model, resolve=True)
        model = build_model(kw.pop("name"), **{**kw, **runtime})
        load_state(model, state, source=f"{path} [{entry}]", entry=entry)
        convention = "reverse time" if objective.name == "flow" else "DDPM time"
        source = f"released GroupDiff ({convention})" if is_released(entry) else "official"
    info = {"source": source, "entry": entry, "config": dict(model.config)}
    model = model.eval().requires_grad_(False)
    return (objective.from_released(model) if is_released(entry) else model), info


# ------------------------------------------------------------------------------------------------ sampling


def group_sizes(s: DictConfig) -> tuple[int, int]:
    """(conditional, unconditional) group sizes of ``cfg.sample``'s mode, as the batch plan defines them."""
    from gd.diffusion.plan import BatchPlan

    try:
        return BatchPlan(str(s.mode), int(s.group_size)).sampling_group_sizes()
    except ValueError as err:
        raise ValueError(f"sample.mode={s.mode!r}, sample.group_size={s.group_size}: {err}") from err


def sampler_settings(s: DictConfig, num_classes: int, sampler: Sampler) -> dict:
    """The sampler part of the settings (also reported by gd.evaluate): the layout's and the objective's sampler's."""
    return {"mode": s.mode, "group_size": int(s.group_size), "num_images": int(s.num_images),
            "num_classes": num_classes, "batch_groups": int(s.batch_groups), "seed": int(s.seed),
            "precision": s.precision, "decoder": s.decoder, **sampler.settings()}


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _check_sample_cfg(cfg: DictConfig) -> None:
    """Everything about ``cfg.sample`` that needs no model, the sampler against the objective included."""
    s = cfg.sample
    sampling_objective(cfg).sampler(s)
    if s.precision not in PRECISIONS:
        raise ValueError(f"sample.precision={s.precision!r}: expected one of {PRECISIONS}")
    if s.decoder not in ("pixels", "sdvae"):
        raise ValueError(f"sample.decoder={s.decoder!r}: expected pixels or sdvae")
    if s.decoder == "sdvae" and not s.get("vae_path"):
        raise ValueError("sample.decoder=sdvae needs sample.vae_path=<local AutoencoderKL folder>")
    group_sizes(s)


def build_decoder(s: DictConfig, channels: int, device: torch.device):
    """gd.data.encoders' decoder: latents -> uint8 (B, H, W, 3)."""
    from gd.data.encoders import SD_VAE_SCALE, build_encoder

    if s.decoder == "pixels":
        return build_encoder("pixels", channels=channels, scale=float(s.get("decoder_scale") or 1.0))
    return build_encoder("sdvae", path=str(s.vae_path), scale=float(s.get("decoder_scale") or SD_VAE_SCALE),
                         device=str(device))


class Progress:
    """tqdm bar on rank 0: images/s (tqdm's rate) and the projected wall-clock finish time."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", desc="sampling", disable=not enabled, dynamic_ncols=True)
        self.start = time.time()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        rate = self.done / max(time.time() - self.start, 1e-9)
        left = (self.bar.total - self.done) / rate if rate > 0 else float("inf")
        finish = _dt.datetime.now() + _dt.timedelta(seconds=min(left, 1e8))
        self.bar.set_postfix_str(f"finish ~{finish:%Y-%m-%d %H:%M}", refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _paths(out: Path, chunk: int) -> tuple[Path, Path]:
    return out / "chunks" / f"chunk_{chunk:06d}.npz", out / "png" / f"chunk_{chunk:06d}.tar"


def generate(cfg: DictConfig, rank: int | None = None, world_size: int | None = None, *,
             model: torch.nn.Module | None = None, on_chunk: Callable[[int, int], None] | None = None) -> dict:
    """Generate this rank's unfinished chunks; rank 0 then waits for all chunks and writes samples.npz and the
    grid. Returns {"out", "npz" (rank 0), "settings", "settings_hash", "generated", "skipped"}.

    ``model`` (an in-memory SiT, e.g. for benchmarks) replaces loading ``ckpt``; ``on_chunk(chunk, images)`` is
    called after each finished chunk (timing hooks)."""
    s = cfg.sample
    rank = _env.rank() if rank is None else rank
    world_size = _env.world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    _check_sample_cfg(cfg)
    parallel = sample_layout(s, world_size)
    p, replica, replicas = parallel.group_parallel, parallel.replica(rank), parallel.replicas
    ckpt = checkpoint_path(cfg) if model is None else None
    out = Path(str(s.out)).expanduser()
    device = _env.local_device(str(s.get("device", "auto")))
    _env.bind_device(device)
    if s.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if model is None:
        model, model_info = load_sampling_model(cfg, ckpt)
    else:
        model, model_info = model.eval().requires_grad_(False), {"config": dict(getattr(model, "config", {}))}
    objective = sampling_objective(cfg, model_info["config"])  # DDPM: the model's learned variance
    sampler = objective.sampler(s)
    num_classes = int(s.num_classes) if s.get("num_classes") is not None else int(model.num_classes)
    if num_classes != model.num_classes:
        raise ValueError(f"sample.num_classes={num_classes} but the checkpoint's model has {model.num_classes}")
    n = int(s.group_size)
    cond_n, uncond_n = group_sizes(s)
    if max(cond_n, uncond_n) > getattr(model, "max_group_size", n):
        raise ValueError(f"sample.group_size={n} exceeds the model's max_group_size={model.max_group_size}")
    layout = Layout(int(s.num_images), num_classes, n, int(s.batch_groups))
    settings = {"ckpt": str(ckpt) if ckpt else "<in-memory>", "ckpt_sha256": file_sha256(ckpt) if ckpt else None,
                "model": model_info["config"],
                **sampler_settings(s, num_classes, sampler), "decoder_scale": s.get("decoder_scale"),
                "vae_path": s.get("vae_path")}
    digest = settings_hash(settings)
    _claim_out_dir(out, settings, digest)

    ctx = None
    if p > 1:
        ctx = _group_parallel(p, parallel.impl, rank, world_size, device)
        model.set_group_parallel(ctx)  # through FromReverseTime too; refuses heads P does not divide (Ulysses)
    writes = ctx is None or ctx.rank == 0  # the replica's first rank decodes and writes its chunks

    final = out / "samples.npz"
    mine = layout.rank_chunks(replica, replicas)
    todo = _agreed([c for c in mine if not _paths(out, c)[0].is_file()], ctx, rank, device)
    result = {"out": str(out), "settings": settings, "settings_hash": digest, "generated": 0,
              "skipped": len(mine) - len(todo)}
    if final.is_file() and not todo:
        return {**result, "npz": str(final) if rank == 0 else None}

    model.to(device)
    net = objective.network(torch.compile(model) if s.get("compile") else model)
    decoder = build_decoder(s, model.in_channels, device) if todo and writes else None
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if s.precision == "bf16" else nullcontext())
    progress = Progress(sum(int(layout.slot_kept(layout.chunk_slots(c)).sum()) for c in todo),
                        enabled=rank == 0 and bool(s.get("progress", True)))

    for chunk in todo:
        npz_path, tar_path = _paths(out, chunk)
        slots = layout.chunk_slots(chunk)
        with autocast:
            latents = chunk_latents(sampler, net, model, layout, chunk, int(s.seed), (cond_n, uncond_n), device,
                                    group_parallel=ctx)
        result["generated"] += 1
        if not writes:
            continue
        kept = layout.slot_kept(slots)
        images = decoder.decode(latents.float()[torch.as_tensor(kept, device=device)]).cpu().numpy()
        kept_slots = slots[kept]
        indices = layout.output_index(kept_slots)
        kept_labels = layout.slot_labels(kept_slots)
        if s.get("png", True):
            write_png_tar(tar_path, images, indices, kept_labels)
        write_npz(npz_path, {"images": images, "labels": kept_labels.astype(np.int64),
                             "indices": indices.astype(np.int64), "slots": kept_slots.astype(np.int64)})
        progress.update(len(images))
        if on_chunk is not None:
            on_chunk(chunk, len(images))
    progress.close()

    if rank != 0:
        return {**result, "npz": None}
    _wait_for_chunks(out, layout, float(s.get("wait_timeout_s", 86400)))
    assemble(out, layout, s)
    return {**result, "npz": str(final)}


def chunk_latents(sampler: Sampler, net: Callable[..., torch.Tensor], model: torch.nn.Module, layout: Layout,
                  chunk: int, seed: int, group_sizes: tuple[int, int], device: torch.device,
                  group_parallel: GroupParallel | None = None) -> torch.Tensor:
    """The latents of one chunk, a function of (seed, chunk) alone: each slot's noise from (seed, slot), its group's
    class, the sampler's noise and the "cond" sample-embedding slots from the chunk's own generators. ``net`` is the
    model as the objective calls it (``Objective.network``); group_sizes are the (conditional, unconditional)
    CFG branches'. ``group_parallel``: the model computes this rank's members only (:class:`MemberSplit`); the
    whole chunk's latents are returned on every rank of the group."""
    slots = layout.chunk_slots(chunk)
    labels = torch.as_tensor(layout.slot_labels(slots), device=device)
    noise = slot_noise(seed, slots, (model.in_channels, model.input_size, model.input_size)).to(device)
    if group_parallel is not None:
        net = MemberSplit(net, group_parallel, layout.group_size)
    if getattr(model, "embed_mode", "none") == "cond":
        net = SeededSlots(net, model, chunk_generator(seed, chunk, stream=2))
    return sampler(net, noise, labels, group_size=group_sizes[0], uncond_group_size=group_sizes[1],
                   generator=chunk_generator(seed, chunk), null_class=int(model.num_classes))


def _claim_out_dir(out: Path, settings: dict, digest: str) -> None:
    """Record the settings; refuse to resume into a folder made with other settings."""
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("hash") != digest:
            diff = {k: (old["settings"].get(k), v) for k, v in settings.items() if old["settings"].get(k) != v}
            raise ValueError(f"{out} holds samples made with other settings ({diff}); use another sample.out "
                             "or delete the folder")
        return
    atomic_write_bytes(path, json.dumps({"hash": digest, "settings": settings}, indent=2, sort_keys=True).encode())


def _wait_for_chunks(out: Path, layout: Layout, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        missing = [c for c in range(layout.num_chunks) if not _paths(out, c)[0].is_file()]
        if not missing:
            return
        if time.time() > deadline:
            raise TimeoutError(f"rank 0 waited {timeout:.0f}s for chunks {missing[:10]} (of {len(missing)}) under "
                               f"{out}/chunks: a rank died? rerun to resume")
        time.sleep(2.0)


def assemble(out: Path, layout: Layout, s: DictConfig) -> Path:
    """samples.npz (streamed chunk by chunk, in output order) and grid.png from the finished chunks."""
    first = np.load(_paths(out, 0)[0])
    h, w, c = first["images"].shape[1:]
    labels = np.concatenate([np.load(_paths(out, k)[0])["labels"] for k in range(layout.num_chunks)])
    if len(labels) != layout.num_images:
        raise RuntimeError(f"chunks under {out} hold {len(labels)} images, expected {layout.num_images}")

    def parts():
        for k in range(layout.num_chunks):
            yield np.load(_paths(out, k)[0])["images"]

    write_npz(out / "samples.npz", {"arr_0": ((layout.num_images, h, w, c), np.uint8, parts()),
                                    "arr_1": labels.astype(np.int64)})
    per = int(s.get("grid_per_class", 8))
    classes = min(int(s.get("grid_classes", 10)), layout.num_classes)
    # round r of groups (g in [r*C, (r+1)*C)) holds members r*N.. of every class: read only the first rounds
    rounds = math.ceil(per / layout.group_size)
    need = math.ceil(min(layout.num_groups, rounds * layout.num_classes) / layout.batch_groups)
    chunks = [np.load(_paths(out, k)[0]) for k in range(need)]
    imgs = np.concatenate([ch["images"] for ch in chunks])
    labs = np.concatenate([ch["labels"] for ch in chunks])
    atomic_write_bytes(out / "grid.png", png_bytes(class_grid(imgs, labs, classes, per)))
    return out / "samples.npz"


def main() -> None:
    """``python -m gd.sample`` / ``gd-sample``: hydra entry point (conf/evaluate.yaml: the run config + ckpt)."""
    from gd.config import hydra_main

    @hydra_main("evaluate")
    def main(cfg: DictConfig) -> None:
        result = generate(cfg)
        if result.get("npz"):
            print(f"gd.sample: {result['npz']} ({cfg.sample.num_images} images, settings {result['settings_hash']})")

    main()


if __name__ == "__main__":
    main()
