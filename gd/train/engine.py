"""The DeepSpeed engine: process group, batch layout, DeepSpeed config generated from ``cfg.train``, client optimizer.

Everything that can be wrong with a config is checked by :func:`gd.diffusion.plan.batch_layout` and
:func:`deepspeed_config` before any process group, model or data exists, so a bad run fails in seconds with the
offending values in the message.

Weight decay (the released GroupDiff recipe): only the matrices of the attention, MLP, adaLN and output layers
decay; 1-D tensors (biases), embeddings (patch, timestep, class, sample) and norms do not (:func:`decays`). The
optimizer takes one parameter group (see :class:`GuardedAdamW`), so the rule is applied through views of the fp32
masters. Unused parameters: with ``sample_embed="tokens"``, a conditional GroupDiff-l step gives ``sample_embed`` no
gradient; ZeRO steps flat fp32 partitions with a zero gradient there, so Adam's momentum still moves it, a known
deviation from plain torch AdamW (the released "cond" embedding is used on every step).

Step cost: DeepSpeed's own gradient clipping, overflow checks and norms loop over every parameter with small kernels
between host syncs; measured with ``python -m gd.bench.step_cost`` that is ~4,400 operators and 6 syncs per step
of ZeRO-2 bf16 on SiT-XL/2's 290 tensors, against 15 operators for a plain fused-AdamW step. The generated config
switches them off and the client optimizer does the same work in a few foreach kernels and one host read.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gd.distributed import env as _env
from gd.distributed.env import device_index
from gd.diffusion.plan import BatchLayout

# DeepSpeed picks its accelerator at import time; on a machine without CUDA it must be told "cpu" first.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

PRECISIONS = ("bf16", "bf16_autocast", "fp32")
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) by :func:`gd.distributed.env.place` (torchrun's, else SLURM's, else 0, 1, 0)."""
    p = _env.place()
    return p.rank, p.world_size, p.local_rank


def init_distributed(timeout_s: float = 1800.0) -> Dist:
    """Initialise torch.distributed from env (gloo on CPU, nccl on CUDA); a lone process gets a world of 1.

    DeepSpeed needs a process group even for one process, so a run started without torchrun makes its own, on an
    in-memory store: no port to pick and lose to another process before it is bound. On CUDA the process's GPU
    follows :mod:`gd.distributed.env`'s rule, which :func:`build_engine` also hands to DeepSpeed. A bare ``srun``
    step of several tasks has no rendezvous to join: it is refused (launch through gd-launch or torchrun).
    ``timeout_s`` bounds every collective until :class:`CollectiveTimeouts` shortens it after the first step.
    """
    place = _env.place()
    local_rank = place.local_rank
    if place.source == "slurm" and place.world_size > 1:
        raise RuntimeError(f"a bare srun step of {place.world_size} tasks (SLURM_PROCID={place.rank}) sets no "
                           f"torch.distributed rendezvous: launch the trainer with gd-launch or torchrun")
    alone = place.source != "torchrun"
    if alone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # what streaming and the launchers read
    if torch.cuda.is_available():
        index = device_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        import deepspeed

        if backend == "gloo":
            _private_extension_cache()
        timeout = datetime.timedelta(seconds=timeout_s)
        if alone:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def _private_extension_cache() -> None:
    """DeepSpeed JIT-builds its CPU communication op (gloo runs) into TORCH_EXTENSIONS_DIR, by default one folder
    shared by every environment of the user: two environments with different torch builds rebuild it for each other
    and wait on each other's build lock. Unless it is set, each environment (sys.prefix) gets its own folder; the
    first build there is announced, since it takes 1-2 minutes without a word from DeepSpeed."""
    import hashlib
    import sys
    from pathlib import Path

    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        env = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "torch_extensions" / f"env-{env}")
    folder = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    if _env.local_rank() == 0 and not any(folder.glob("*/deepspeed_shm_comm/*.so")):
        print(f"gd.train: building DeepSpeed's CPU communication op for this environment, once (1-2 min), into "
              f"{folder}", file=sys.stderr, flush=True)


def all_process_groups() -> list[Any]:
    """Every process group this rank belongs to: the default one and those DeepSpeed made (its data-parallel
    clone of the world, ...), each of which holds its own timeout."""
    from torch.distributed import distributed_c10d as c10d

    groups = [g for g in getattr(c10d._world, "pg_map", {}) if g not in (None, dist.GroupMember.NON_GROUP_MEMBER)]
    return groups or [None]


class LostRankError(RuntimeError):
    """A collective that failed because another rank stopped answering."""


class CollectiveTimeouts:
    """How long any collective may wait for the other ranks: ``init_s`` while ranks start, load or write a
    checkpoint or export (rank 0 may work alone for minutes while the others wait in a barrier), ``step_s`` once
    the first step has run on every rank (a step's collectives then complete in seconds; a rank that froze or was
    lost ends the job after ``step_s`` instead of after torch's 30 minutes). torchtitan does the same (100 s after
    the first step). Work one rank does alone while the others wait (a checkpoint, the EMA export, the sample grid)
    runs inside :meth:`relaxed`.
    """

    def __init__(self, init_s: float, step_s: float) -> None:
        if not 0 < step_s <= init_s:
            raise ValueError(f"train.step_timeout_s={step_s}, train.init_timeout_s={init_s}: expected "
                             "0 < step_timeout_s <= init_timeout_s")
        self.init_s, self.step_s = float(init_s), float(step_s)
        self.steady = False

    def _set(self, seconds: float) -> None:
        if not dist.is_initialized():
            return
        for group in all_process_groups():
            dist.set_timeout(datetime.timedelta(seconds=seconds), group)

    def first_step_done(self) -> None:
        if not self.steady:
            self.steady = True
            self._set(self.step_s)

    @contextlib.contextmanager
    def relaxed(self, sync: bool = False) -> Iterator[None]:
        """``init_s`` inside the block (checkpoint writes, the EMA export, the sample grid), then back to ``step_s``
        if it applied. Every rank must enter it. With ``sync`` the block ends with a barrier (when it did not
        raise): the ranks that finish early wait for the one working alone there, under ``init_s``, instead of in
        the next step's collective under ``step_s``."""
        if self.steady:
            self._set(self.init_s)
        try:
            yield
            if sync and dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()
        finally:
            if self.steady:
                self._set(self.step_s)


def _deep_update(base: dict, extra: Mapping) -> dict:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def overlap_comm(value: Any, world_size: int) -> bool:
    """``train.ds.overlap_comm``: true / false as given; null means on when ``world_size`` > 1 (one process has no
    gradient communication to hide, only the side stream's bookkeeping)."""
    if value is None:
        return world_size > 1
    if not isinstance(value, bool):
        raise ValueError(f"train.ds.overlap_comm={value!r}: expected true, false or null (on with > 1 process)")
    return value


def deepspeed_config(train_cfg: Mapping[str, Any], layout: BatchLayout) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``cfg.train`` (checked); ``train.deepspeed`` is merged in last, verbatim.

    Knobs (``train.ds``) that matter on few GPUs: ZeRO stage 0/1 avoids gradient partitioning when memory
    allows; contiguous gradients and large buckets mean fewer, larger collectives; bf16 ``immediate_grad_update``
    folds bf16 gradients into the fp32 master copy during backward instead of keeping a second buffer;
    ``reduce_scatter: false`` makes ZeRO-2 all-reduce its bucket without the per-parameter split and copy-back.
    ``overlap_comm`` (null: on with more than one process) reduces each gradient bucket on a side stream during the
    rest of the backward; buckets of 5e7 elements give it a dozen buckets of SiT-XL/2 to overlap
    (docs/communication.md has the arithmetic).

    Always off, because :class:`GuardedAdamW` does the same once per step in foreach kernels: DeepSpeed's gradient
    clipping, its grad norm (``compute_grad_norm``: only ZeRO-1/2 can skip it, and not ZeRO-1 bf16, which runs
    DeepSpeed's BF16_Optimizer), the bf16 overflow scan, and the throughput timer (two device syncs per step).
    """
    stage = int(train_cfg["zero_stage"])
    precision = str(train_cfg["precision"])
    if stage not in ZERO_STAGES:
        raise ValueError(f"train.zero_stage={stage}: expected one of {ZERO_STAGES}")
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}: expected one of {PRECISIONS} (fp16 is not supported)")
    if stage == 0 and precision == "bf16":
        raise ValueError("train.zero_stage=0 with train.precision=bf16 runs DeepSpeed's unfused bf16 optimizer, which "
                         "reads every parameter's overflow flag on the host: ~290 device syncs per SiT-XL step. Use "
                         "train.precision=bf16_autocast (fp32 weights, no per-parameter syncs) or zero_stage >= 1")
    compile_options(train_cfg)  # a bad compile_mode fails here too, before any process starts work
    ds = dict(train_cfg.get("ds") or {})
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(
            contiguous_gradients=bool(ds.get("contiguous_gradients", True)),
            overlap_comm=overlap_comm(ds.get("overlap_comm"), layout.world_size),
            reduce_bucket_size=int(float(ds.get("reduce_bucket_size", 5e7))),
            allgather_bucket_size=int(float(ds.get("allgather_bucket_size", 5e8))),
            reduce_scatter=bool(ds.get("reduce_scatter", False)),
        )
        if stage == 2 or (stage == 1 and precision != "bf16"):  # ZeRO-1 bf16 runs BF16_Optimizer, which refuses it
            zero["compute_grad_norm"] = False
    if stage == 3:
        # One optimizer sub-group: the non-finite guard decides once per step for all parameters.
        zero.update(sub_group_size=int(1e12),
                    stage3_prefetch_bucket_size=int(float(ds.get("prefetch_bucket_size", 5e7))),
                    stage3_param_persistence_threshold=int(float(ds.get("param_persistence_threshold", 1e5))),
                    stage3_gather_16bit_weights_on_model_save=False)
        zero.pop("allgather_bucket_size")
    config: dict[str, Any] = {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": 0.0,  # GuardedAdamW clips (train.grad_clip)
        "zero_optimization": zero,
        # The client optimizer is a guarded torch AdamW subclass, which ZeRO does not know by type.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "dump_state": False,
        "timers": {"throughput": {"enabled": False}},
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True, "immediate_grad_update": bool(ds.get("immediate_grad_update", True)),
                          "check_grad_overflow": False}
        if stage in (1, 2, 3):
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    elif precision == "bf16_autocast":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return _deep_update(config, train_cfg.get("deepspeed") or {})


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that decides once per step, over all parameters on all ranks, what the step does.

    * A NaN/inf gradient anywhere skips the whole update (weights, moments and step count untouched).
    * Otherwise the gradients are clipped to ``max_norm`` by their global norm (as torch's ``clip_grad_norm_``;
      0 = off) and decoupled weight decay (``weight_decay``: AdamW's ``p *= 1 - lr * wd``) is applied to the
      elements in ``decayed()`` (set after ``deepspeed.initialize``: views of the fp32 tensors this optimizer
      steps, see :func:`master_views`; unset: everything), in one foreach kernel; AdamW itself then runs with
      weight decay 0.

    DeepSpeed hands it what it updates: ZeRO >= 1 one flat fp32 partition per rank (``partitioned``: squared norms
    add across ranks), stage 0 the module's parameters (replicas: the all-reduce averages). It takes a single
    parameter group because ZeRO-1/2/3 call ``step()`` once per group, which would split the decision. Doing this
    here instead of in DeepSpeed (``gradient_clipping``, its overflow checks) replaces per-parameter loops of small
    kernels and their host syncs with a few foreach kernels and one host read. ``force_skip`` (set identically on
    every rank, e.g. after a non-finite loss) skips the next update without looking. After each ``step()``,
    ``last_skipped`` and ``last_grad_norm`` (before clipping) describe it.
    """

    def __init__(self, params: Iterable, *, partitioned: bool, max_norm: float = 0.0, weight_decay: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(params, weight_decay=0.0, **kwargs)
        if len(self.param_groups) != 1:
            raise ValueError(f"GuardedAdamW takes one parameter group, got {len(self.param_groups)}: ZeRO steps "
                             f"each group separately, so the skip/clip decision would not cover the whole model")
        if max_norm < 0 or weight_decay < 0:
            raise ValueError(f"train.grad_clip={max_norm} and train.weight_decay={weight_decay}: expected >= 0")
        self.param_groups[0]["masked_weight_decay"] = float(weight_decay)  # torch owns "decoupled_weight_decay"
        self.partitioned = partitioned
        self.max_norm = float(max_norm)
        self.decayed: Callable[[], list[torch.Tensor | None]] | None = None
        self._decay_views: list[torch.Tensor] | None = None
        self.last_skipped = False
        self.last_grad_norm = float("nan")
        self.skipped_total = 0
        self.force_skip = False

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 (see class docstring)
        if self.force_skip:
            self.force_skip, self.last_skipped, self.last_grad_norm = False, True, float("nan")
            self.skipped_total += 1
            return None
        params = self._params()
        grads = [p.grad for p in params if p.grad is not None]
        device = grads[0].device if grads else params[0].device
        sq = torch.zeros((), dtype=torch.float32, device=device)
        if grads:
            sq = torch.stack([n.float() for n in torch._foreach_norm(grads)]).pow(2).sum()
        bad = (~torch.isfinite(sq)).float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            packed = torch.stack([torch.nan_to_num(sq, nan=0.0, posinf=0.0), bad])
            dist.all_reduce(packed)
            sq = packed[0] if self.partitioned else packed[0] / dist.get_world_size()
            bad = packed[1]
        bad_value, sq_value = torch.stack([bad, sq]).tolist()  # the step's one host sync
        self.last_skipped = bad_value > 0
        if self.last_skipped:
            self.last_grad_norm = float("nan")
            self.skipped_total += 1
            return None
        self.last_grad_norm = math.sqrt(sq_value)
        coef = self.max_norm / (self.last_grad_norm + 1e-6) if self.max_norm > 0 else 1.0
        if coef < 1.0 and grads:
            torch._foreach_mul_(grads, coef)
        self._decay()
        return super().step(closure)

    def _decay(self) -> None:
        group = self.param_groups[0]
        wd = float(group.get("masked_weight_decay", 0.0))
        if wd == 0.0:
            return
        views = self._decay_views
        if views is None:
            # Resolved at the first decayed step (after any checkpoint load); not cached before decayed is set.
            views = self._checked_views()
            if self.decayed is not None:
                self._decay_views = views
        if views:
            torch._foreach_mul_(views, 1.0 - float(group["lr"]) * wd)

    def _checked_views(self) -> list[torch.Tensor]:
        if self.decayed is None:
            return list(self.param_groups[0]["params"])
        views = [v for v in self.decayed() if v is not None and v.numel()]
        spans = []
        for p in self._params():
            storage = p.untyped_storage()
            spans.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        for v in views:
            if not any(lo <= v.data_ptr() < hi for lo, hi in spans):
                raise RuntimeError("a weight-decay view does not alias the tensors this optimizer updates: this "
                                   "DeepSpeed keeps its fp32 masters elsewhere (see gd.train.engine.master_views)")
        return views


NO_DECAY_WORDS = ("embed", "norm", "bias")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies to parameter ``name``: matrices (>= 2-D) outside embeddings and norms.

    The released GroupDiff code's rule (no decay for ndim < 2 or a name containing "embed", "norm", "bias", ...);
    on SiT it decays exactly the qkv, proj, fc1, fc2, adaLN and final linear weights.
    """
    shape = getattr(param, "ds_shape", None) or param.shape  # ZeRO-3 partitions hold a flat slice
    return len(shape) >= 2 and not any(word in name for word in NO_DECAY_WORDS)


def decayed_names(module: torch.nn.Module) -> list[str]:
    """The parameters of ``module`` that :func:`decays` names."""
    return [name for name, p in module.named_parameters() if decays(name, p)]


def master_views(engine: Any, names: Iterable[str]) -> list[torch.Tensor | None]:
    """This rank's fp32 master elements of the named parameters, as views of the tensors its optimizer updates.

    ZeRO-1/2 and DeepSpeed's BF16_Optimizer: the parameter's fragment of the flat fp32 partition (``_hp_mapping``;
    None where this rank owns none of it). ZeRO-3: its slice of the flat fp32 partition. Stage 0 (fp32 weights):
    the parameter itself.
    """
    wanted, opt = set(names), engine.optimizer
    views: list[torch.Tensor | None] = []
    for name, p in engine.module.named_parameters():
        if name not in wanted:
            continue
        if hasattr(p, "_hp_mapping"):
            views.append(None if p._hp_mapping is None else p._hp_mapping.get_hp_fragment())
        elif hasattr(p, "ds_id"):
            views.append(opt.get_local_fp32_param(p))
        else:
            views.append(p)
    return views


def build_optimizer(params: Iterable, train_cfg: Mapping[str, Any], device: torch.device,
                    fused: bool | None = None) -> GuardedAdamW:
    """:class:`GuardedAdamW` from ``cfg.train`` (lr, betas, weight_decay, grad_clip); ``fused`` None = fused on
    CUDA, foreach elsewhere."""
    betas = tuple(float(b) for b in train_cfg.get("betas", (0.9, 0.999)))
    fused = device.type == "cuda" if fused is None else fused
    impl = {"fused": True} if fused else {"foreach": True}
    return GuardedAdamW(params, partitioned=int(train_cfg["zero_stage"]) >= 1, lr=float(train_cfg["lr"]),
                        betas=betas, weight_decay=float(train_cfg.get("weight_decay", 0.0)),
                        max_norm=float(train_cfg.get("grad_clip") or 0.0), **impl)


def build_engine(model: torch.nn.Module, train_cfg: Mapping[str, Any], layout: BatchLayout,
                 device: torch.device, fused: bool | None = None) -> tuple[Any, GuardedAdamW]:
    """``deepspeed.initialize`` with the generated config and a :class:`GuardedAdamW`; compiles when asked.

    ``fused``: see :func:`build_optimizer` (the benchmarks force the CUDA choice on the CPU)."""
    import deepspeed

    config = deepspeed_config(train_cfg, layout)
    model = model.to(device)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], train_cfg, device, fused)
    # Left alone, DeepSpeed calls set_device(LOCAL_RANK): "invalid device ordinal" where each task sees one GPU.
    # (On the CPU its set_device does nothing; it still needs a rank >= 0 to keep the world size.)
    rank_on_node = dist_env()[2]
    args = argparse.Namespace(device_rank=device.index if device.type == "cuda" else rank_on_node)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    names = decayed_names(engine.module)
    optimizer.decayed = lambda: master_views(engine, names)
    if layout.world_size == 1 and int(train_cfg["zero_stage"]) == 0:
        # Stage 0 all-reduces after backward, flattening every gradient and copying it back, even in a world of 1.
        engine.enable_backward_allreduce = False
    if train_cfg.get("compile"):
        engine.compile(**compile_options(train_cfg))
    return engine, optimizer


COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(train_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``engine.compile`` arguments from ``train.compile_mode`` (torch.compile's mode: ``reduce-overhead`` adds CUDA
    graphs, ``max-autotune`` also tunes GEMM kernels; null = torch's default). Off by default: it changes how the
    step runs, not what it computes, and ``gd.bench.gpu_check`` measures it before a recipe uses it."""
    mode = train_cfg.get("compile_mode")
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile_mode={mode!r}: expected one of {COMPILE_MODES}")
    return {"compile_kwargs": {"mode": mode} if mode else {}}


def engine_dtype(engine: Any) -> torch.dtype:
    """The dtype the engine's module computes in (bf16 under DeepSpeed bf16, else fp32)."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
