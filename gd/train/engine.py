"""The DeepSpeed engine: process group, batch layout, DeepSpeed config generated from ``cfg.train``, client optimizer.

Everything that can be wrong with a config is checked by :func:`batch_layout` / :func:`deepspeed_config` before
any process group, model or data exists, so a bad run fails in seconds with the offending values in the message.

Unused parameters: on a conditional GroupDiff-l step ``sample_embed`` receives no gradient. Plain torch AdamW skips
a parameter whose ``grad`` is None, but ZeRO (and DeepSpeed's bf16 optimizers) step flat fp32 partitions with a zero
gradient there, so Adam's momentum (m / sqrt(v)) still moves it on those steps: a known deviation from plain torch
AdamW. Weight decay would additionally shrink it every conditional step, so ``sample_embed`` sits in a parameter
group with ``weight_decay=0`` (:func:`param_groups`).
"""
from __future__ import annotations

import copy
import datetime
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

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


@dataclass(frozen=True)
class BatchLayout:
    """How the global batch (images per optimizer step) splits over processes and micro-steps."""

    global_batch: int
    micro_batch: int
    world_size: int
    grad_accum: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun/SLURM-style env; (0, 1, 0) when unset."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(timeout_s: float = 1800.0) -> Dist:
    """Initialise torch.distributed from env (gloo on CPU, nccl on CUDA); a lone process gets a world of 1.

    DeepSpeed needs a process group even for one process, so a run started without torchrun makes its own.
    """
    rank, world, local_rank = dist_env()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if torch.cuda.is_available():
        # Sites that bind one GPU per task show each process a single device whatever its LOCAL_RANK.
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def uses_groups(diffusion_cfg: Mapping[str, Any]) -> bool:
    """Whether any step of this diffusion config is a group step (so batches must split into groups)."""
    mode = diffusion_cfg.get("mode", "none")
    return mode == "f" or (mode == "l" and float(diffusion_cfg.get("p_group", 0.0)) > 0.0)


def batch_layout(train_cfg: Mapping[str, Any], world_size: int, group_size: int = 1,
                 max_group_size: int | None = None) -> BatchLayout:
    """Check the batch arithmetic and return the layout; raises ValueError naming every bad value.

    global_batch images per optimizer step = micro_batch images per process per micro-step x world_size x
    gradient accumulation; a group step's micro batch holds micro_batch / group_size whole groups.
    """
    gb, mb = int(train_cfg["global_batch"]), int(train_cfg["micro_batch"])
    errors = []
    if gb < 1 or mb < 1:
        errors.append(f"train.global_batch={gb} and train.micro_batch={mb} must be >= 1")
    elif gb % (mb * world_size):
        errors.append(f"train.global_batch={gb} is not divisible by train.micro_batch={mb} x world size "
                      f"{world_size} = {mb * world_size}")
    if group_size < 1:
        errors.append(f"diffusion.group_size={group_size} must be >= 1")
    elif mb % group_size:
        errors.append(f"train.micro_batch={mb} images is not divisible by diffusion.group_size={group_size}: "
                      f"a micro batch must hold whole groups")
    if max_group_size is not None and group_size > max_group_size:
        errors.append(f"diffusion.group_size={group_size} exceeds model.max_group_size={max_group_size}")
    if errors:
        raise ValueError("invalid batch configuration:\n  " + "\n  ".join(errors))
    return BatchLayout(gb, mb, world_size, gb // (mb * world_size))


def _deep_update(base: dict, extra: Mapping) -> dict:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def deepspeed_config(train_cfg: Mapping[str, Any], layout: BatchLayout) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``cfg.train`` (checked); ``train.deepspeed`` is merged in last, verbatim.

    Knobs (``train.ds``) that matter on few GPUs: ZeRO stage 0/1 avoids gradient partitioning when memory
    allows; contiguous gradients and large buckets mean fewer, larger collectives; bf16 ``immediate_grad_update``
    folds bf16 gradients into the fp32 master copy during backward instead of keeping a second buffer.
    """
    stage = int(train_cfg["zero_stage"])
    precision = str(train_cfg["precision"])
    if stage not in ZERO_STAGES:
        raise ValueError(f"train.zero_stage={stage}: expected one of {ZERO_STAGES}")
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}: expected one of {PRECISIONS} (fp16 is not supported)")
    ds = dict(train_cfg.get("ds") or {})
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(
            contiguous_gradients=bool(ds.get("contiguous_gradients", True)),
            overlap_comm=bool(ds.get("overlap_comm", False)),
            reduce_bucket_size=int(float(ds.get("reduce_bucket_size", 5e8))),
            allgather_bucket_size=int(float(ds.get("allgather_bucket_size", 5e8))),
            reduce_scatter=bool(ds.get("reduce_scatter", True)),
        )
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
        "gradient_clipping": float(train_cfg.get("grad_clip") or 0.0),
        "zero_optimization": zero,
        # The client optimizer is a guarded torch AdamW subclass, which ZeRO does not know by type.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True, "immediate_grad_update": bool(ds.get("immediate_grad_update", True))}
        if stage in (1, 2, 3):
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    elif precision == "bf16_autocast":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return _deep_update(config, train_cfg.get("deepspeed") or {})


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips the whole update when any gradient on any rank is NaN/inf.

    DeepSpeed wraps it (ZeRO hands it fp32 master partitions; stage 0 the module's parameters), so the check sees
    exactly the gradients the update would use. ``partitioned`` says whether each rank holds a disjoint slice
    (ZeRO >= 1: squared norms add across ranks) or a full replica (stage 0). ``force_skip`` (set identically on
    every rank, e.g. after a non-finite loss) skips the next update without looking. After each ``step()``,
    ``last_skipped`` and ``last_grad_norm`` describe it.
    """

    def __init__(self, params: Iterable, *, partitioned: bool, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.partitioned = partitioned
        self.last_skipped = False
        self.last_grad_norm = float("nan")
        self.skipped_total = 0
        self.force_skip = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 (see class docstring)
        if self.force_skip:
            self.force_skip, self.last_skipped, self.last_grad_norm = False, True, float("nan")
            self.skipped_total += 1
            return None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else self.param_groups[0]["params"][0].device
        sq = torch.zeros((), dtype=torch.float32, device=device)
        if grads:
            sq = torch.stack([n.float() for n in torch._foreach_norm(grads)]).pow(2).sum()
        bad = (~torch.isfinite(sq)).float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            packed = torch.stack([torch.nan_to_num(sq, nan=0.0, posinf=0.0), bad])
            dist.all_reduce(packed)
            sq = packed[0] if self.partitioned else packed[0] / dist.get_world_size()
            bad = packed[1]
        self.last_skipped = bool(bad.item() > 0)
        self.last_grad_norm = float("nan") if self.last_skipped else float(sq.sqrt())
        if self.last_skipped:
            self.skipped_total += 1
            return None
        return super().step(closure)


NO_DECAY = ("sample_embed",)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups: parameters named in :data:`NO_DECAY` get ``weight_decay=0``.

    With ``weight_decay == 0`` there is a single group, so such runs (and their checkpoints) keep one group.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if weight_decay == 0.0:
        return [{"params": [p for _, p in params]}]
    decay = [p for n, p in params if n not in NO_DECAY]
    no_decay = [p for n, p in params if n in NO_DECAY]
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(params: Iterable, train_cfg: Mapping[str, Any], device: torch.device) -> GuardedAdamW:
    """AdamW from ``cfg.train`` (lr, betas, weight_decay), fused on CUDA, foreach elsewhere.

    ``params``: parameters or parameter groups (a group's own ``weight_decay`` overrides ``cfg.train``'s)."""
    betas = tuple(float(b) for b in train_cfg.get("betas", (0.9, 0.999)))
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return GuardedAdamW(params, partitioned=int(train_cfg["zero_stage"]) >= 1, lr=float(train_cfg["lr"]),
                        betas=betas, weight_decay=float(train_cfg.get("weight_decay", 0.0)), **impl)


def build_engine(model: torch.nn.Module, train_cfg: Mapping[str, Any], layout: BatchLayout,
                 device: torch.device) -> tuple[Any, GuardedAdamW]:
    """``deepspeed.initialize`` with the generated config and a :class:`GuardedAdamW`; compiles when asked."""
    import deepspeed

    config = deepspeed_config(train_cfg, layout)
    model = model.to(device)
    optimizer = build_optimizer(param_groups(model, float(train_cfg.get("weight_decay", 0.0))), train_cfg, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                           dist_init_required=False)
    if train_cfg.get("compile"):
        engine.compile()
    return engine, optimizer


def engine_dtype(engine: Any) -> torch.dtype:
    """The dtype the engine's module computes in (bf16 under DeepSpeed bf16, else fp32)."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
