"""The trainer: model + batch plan + data + DeepSpeed engine + EMA, driven step by step.

``train()`` loops over ``train_step()``, which runs ``forward_backward()`` for each of the step's ``grad_accum``
micro-batches and then the update. Each concern with a cadence owns it: the checkpointer (``train.ckpt_every``,
the last step, preemption), the step log (``train.log_every``), the S_cross probe (``train.s_cross_every``) and the
held-out probes (``train.probe_every``); callbacks (gd.train.callbacks) hook in from outside, fault injection
included. The benchmarks time the same ``forward`` / ``backward`` / update methods on synthetic data
(gd.bench.train).

The batch plan (gd.diffusion.plan) decides per micro-batch (released recipe: each rank's each accumulation step
draws its own kind) whether it is conditional (plain stream, group size 1) or a group micro-batch (group stream,
group size N); all hold the same number of images, and the objective's mean over images gives each image the
same weight. The objective (``diffusion.objective``: SiT's flow or DiT's DDPM, gd.diffusion.objectives) owns the
loss and the time the model is called with. Every random draw of a micro-batch (labels dropped, t, noise,
sample-embedding slots) comes from generators seeded by (seed, step, rank, micro), and the data streams resume from their saved state, so a resumed
run repeats the uninterrupted one bit for bit on CPU.

Group parallelism (``train.group_parallel`` P > 1, gd.models.group_parallel): P consecutive ranks share each group,
each holding N/P of its members. They form one replica: the plan, the batches read and every draw are the
replica's (seeded by rank // P), made for the replica's whole micro-batch, and each rank computes the model and
its loss on its rows (gd.diffusion.plan.Shard); a conditional micro-batch is split into P parts of whole images.
ZeRO reduces over the whole world with no mpu: each rank's per-image mean (or per-group sum times P) makes the P
ranks' losses add up to P times the replica's, so the world average is the replicas' average gradient. A run with
P > 1 therefore trains what world/P ranks at P times the micro batch train, up to rounding.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from gd.diffusion.objectives import build_objective
from gd.diffusion.plan import BatchPlan, Shard, StepPlan
from gd.distributed.layout import ParallelLayout
from gd.io import atomic_write_text
from gd.secrets import redacted_yaml
from gd.train import engine as eng
from gd.train.callbacks import Callback, CallbackList
from gd.train.checkpoint import CheckpointMismatchError, Checkpointer, export_ema, model_signature
from gd.train.data import StreamingData
from gd.train.ema import ShardedEMA
from gd.train.guard import NonFiniteError, NonFiniteGuard
from gd.train.init_from import Pretrained, check_init_cfg, describe, load_weights, read_pretrained
from gd.train.metrics import MetricsLogger, StepLog, Throughput
from gd.train.nodes import Nodes
from gd.train.probes import HeldOutProbe, SCrossProbe
from gd.train.sample_grid import SampleGrid
from gd.train.tracking import check_available

log = logging.getLogger("gd.train")

__all__ = ["Trainer", "MicroBatch", "StepResult", "NonFiniteError", "check_train_cfg"]


def check_train_cfg(t: Any) -> None:
    """The loop's own settings (cadences, steps, lr); ValueError naming every bad value."""
    problems = []
    for key in ("steps", "log_every", "ckpt_every", "keep_last", "max_nonfinite"):
        value = t.get(key)
        minimum = 0 if key == "steps" else 1
        if value is None or int(value) < minimum:
            problems.append(f"train.{key}={value}: expected an integer >= {minimum}")
    if float(t.get("lr", 0)) <= 0:
        problems.append(f"train.lr={t.get('lr')}: expected > 0")
    if problems:
        raise ValueError("invalid train config:\n  " + "\n  ".join(problems))


def model_kwargs(model_cfg: Any) -> dict[str, Any]:
    """``cfg.model`` as build_model arguments (``name`` included); unset (null) options keep the model's default."""
    kwargs = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    return {k: v for k, v in kwargs.items() if v is not None or k in ("group_layers", "group_t_window")}


@dataclass
class MicroBatch:
    """One micro-batch as the model sees it: latents and labels on the device, the draws' generator, its plan."""

    x: torch.Tensor
    y: torch.Tensor
    generator: torch.Generator
    plan: StepPlan


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did: which micro-batches (world_size, grad_accum) were group micro-batches, the mean
    loss over ranks and micro-batches and the per-image loss by kind (None when the update was skipped or a kind
    was absent), and whether a stop was requested on any rank."""

    group_micro: np.ndarray
    loss: float | None
    loss_cond: float | None
    loss_group: float | None
    skipped: bool
    stop: bool

    @property
    def has_group(self) -> bool:
        return bool(self.group_micro.any())


# The step's device-side accumulator, summed over micro-batches and ranks and read once per step.
_LOSS, _BAD, _STOP, _COND, _COND_N, _GROUP, _GROUP_N = range(7)


class Trainer:
    """Trains (or resumes) the run ``cfg.run.dir`` to ``cfg.train.steps`` optimizer steps.

    ``stop_requested()`` true on any rank makes every rank checkpoint and ``train()`` return with
    ``preempted=True``. ``data`` replaces the shard streams (benchmarks); ``resume=False`` ignores the run
    directory's checkpoints (benchmarks, which never call ``train()``); ``fused`` picks the AdamW kernels (None:
    fused on CUDA; the benchmarks force the CUDA choice on a CPU).
    """

    def __init__(self, cfg: DictConfig, *, stop_requested: Callable[[], bool] | None = None,
                 callbacks: Iterable[Callback] = (), data: Any = None, resume: bool = True,
                 fused: bool | None = None) -> None:
        t = cfg.train
        check_train_cfg(t)
        check_available(cfg)  # train.wandb asked for but not installed: said before any work
        grid = SampleGrid.from_config(cfg)  # train.sample_every: the EMA's sample grid, a callback like any other
        rank, world, _ = eng.dist_env()
        self.cfg = cfg
        self.objective = build_objective(cfg.diffusion, cfg.model)  # diffusion.objective: flow (SiT) | ddpm (DiT)
        self.layout = BatchPlan.from_config(cfg.diffusion, cfg.model).layout(t, world, int(cfg.model.max_group_size))
        p = self.layout.group_parallel
        self.plan = BatchPlan.from_config(cfg.diffusion, cfg.model, int(cfg.seed), self.layout.grad_accum, p)
        eng.deepspeed_config(t, self.layout)  # rejects bad stage/precision before any process starts work
        self.run_dir = Path(cfg.run.dir)
        self.steps = int(t.steps)
        self.checkpointer = Checkpointer(self.run_dir, int(t.ckpt_every), int(t.keep_last), rank, world)
        self.resume_from, resume_meta = self.checkpointer.resumable(cfg.model) if resume else (None, {})
        self.resume_step = int(resume_meta.get("step", 0))
        trained = resume_meta.get("objective", "flow")  # checkpoints written before DDPM existed are flow
        if self.resume_from is not None and trained != self.objective.name:
            raise CheckpointMismatchError(f"checkpoint {self.resume_from} was trained with diffusion.objective="
                                          f"{trained}, this run has {self.objective.name}; use a new run.dir")
        trained_p = int(resume_meta.get("group_parallel", 1))
        if self.resume_from is not None and trained_p != p:  # its queued batches and loader states are per replica
            raise CheckpointMismatchError(f"checkpoint {self.resume_from} was written with train.group_parallel="
                                          f"{trained_p}, this run has {p}; resume with train.group_parallel="
                                          f"{trained_p} or use a new run.dir")
        if self.resume_from is not None and int(resume_meta["world_size"]) != world:
            self._check_world_change(world)
        # train.init_from: read and fitted on the CPU before any process group or device memory exists
        self.init = self._pretrained(t, resume, rank)
        self.init_summary = self.init.summary() if self.init is not None else resume_meta.get("init_from")

        # The shards are checked before anything is created (the run dir, by _check_nodes): a refused start leaves
        # nothing behind. The loaders reuse the result.
        meta = None
        if data is None:
            from gd.data.loader import check_dataset

            meta = check_dataset(str(cfg.data.root))
        self.timeouts = eng.CollectiveTimeouts(float(t.get("init_timeout_s", 1800)),
                                               float(t.get("step_timeout_s", 100)))
        self.dist = d = eng.init_distributed(self.timeouts.init_s)
        self.nodes = Nodes()
        if resume:
            self._check_nodes()
        random.seed(int(cfg.seed) + d.rank)
        np.random.seed((int(cfg.seed) + d.rank) % 2**32)
        torch.manual_seed(int(cfg.seed))  # identical initial weights on every rank (ZeRO-3 partitions each copy)

        from gd.models import build_model

        kwargs = model_kwargs(cfg.model)
        self.model = build_model(kwargs.pop("name"), **kwargs)
        self.model_config = dict(self.model.config)
        if self.init is not None:
            load_weights(self.model, self.init)
        self.parallel = ParallelLayout.resolve(world, p, self.plan.train_group_size,
                                               getattr(self.model, "num_heads", None),
                                               t.get("group_parallel_impl"), section="train")
        self.shard = Shard(p, self.parallel.member_rank(d.rank))
        if p > 1:  # a collective: every rank creates every group-parallel group
            from gd.models.group_parallel import new_group_parallel

            self.model.set_group_parallel(new_group_parallel(p, self.parallel.impl))
        self.engine, self.optimizer = eng.build_engine(self.model, t, self.layout, d.device, fused=fused)
        self.zero3 = int(t.zero_stage) == 3
        self.ema = ShardedEMA(self.engine.module, float(t.ema_decay), zero3=self.zero3,
                              optimizer=self.engine.optimizer)
        if self.init is not None:
            self._seed_from_pretrained(self.init)
            self.init = None  # the file's tensors are not needed again
        self.data = data if data is not None else StreamingData(
            cfg.data, self.layout, self.plan.train_group_size, int(cfg.seed), d.rank, d.world_size, self.nodes, meta)
        self.guard = NonFiniteGuard(self.optimizer, int(t.max_nonfinite), int(resume_meta.get("skipped_steps", 0)),
                                    verbose=d.is_main)
        self.probe = SCrossProbe(int(t.get("s_cross_every") or 0), self.zero3, self.objective)
        self.held_out = HeldOutProbe.from_config(cfg, self.zero3, self.objective, self.plan.group_size)
        self.callbacks = CallbackList([*callbacks, *([grid] if grid else [])])
        self.stop_requested = stop_requested
        self.net = self.objective.network(self.engine)  # the engine as the objective's loss calls it
        self._acc = torch.zeros(7, dtype=torch.float64, device=d.device)
        self._reduced = [0.0] * 7

    def _pretrained(self, t: Any, resume: bool, rank: int) -> Pretrained | None:
        """The ``train.init_from`` file fitted to this run's model, or None: no file, a benchmark, or a run that
        has a checkpoint of its own (which it resumes, saying that init_from is ignored)."""
        check_init_cfg(t)
        path = t.get("init_from")
        if not path or not resume:
            return None
        if self.resume_from is not None:
            if rank == 0:
                log.warning("resuming from %s, this run's own checkpoint: train.init_from=%s is ignored",
                            self.resume_from, path)
            return None
        return read_pretrained(path, model_kwargs(self.cfg.model), self.objective.name,
                               init_weights=str(t.get("init_weights", "model")),
                               init_ema=str(t.get("init_ema", "file")), init_time=str(t.get("init_time", "auto")))

    def _seed_from_pretrained(self, init: Pretrained) -> None:
        """After the engine exists: the fp32 masters from the file (a bf16 engine made them from its bf16 copy), then
        the EMA from the file's EMA (or the weights)."""
        self.ema.load_masters(init.weights)
        if init.ema is not None:  # the EMA averages parameters; buffers (pos_embed) stay the model's
            self.ema.load_full_state({k: v for k, v in init.ema.items() if k in self.ema.shapes})
        else:
            self.ema.copy_from_model()
        if self.dist.is_main:
            log.warning("%s", describe(init))

    def _check_world_change(self, world: int) -> None:
        """A checkpoint written by another number of ranks: refused unless gd.train.reshard can carry it over."""
        from gd.train.reshard import checkpoint_settings, describe, reshard_problems

        saved = checkpoint_settings(self.resume_from)
        block = self.plan.block if self.plan.mix == "micro" else None
        problems = reshard_problems(saved, world, self.cfg.train, block, self.layout.grad_accum)
        if problems:
            raise CheckpointMismatchError(f"{self.resume_from}: {describe(saved, world, problems)}")
        if eng.dist_env()[0] == 0:
            log.warning("%s: %s", self.resume_from, describe(saved, world, []))

    def _check_nodes(self) -> None:
        """Across nodes (collective): one run directory seen by all, and one checkpoint every rank resumes from."""
        if self.dist.is_main:
            self.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)  # resume refuses a dir others can write
        self.nodes.check_shared(self.run_dir, "run.dir", fix=(
            "Every rank writes its part of each checkpoint there and resumes from it: put run.root on a filesystem "
            "every node mounts (NFS, Lustre, GPFS), not on node-local disk such as /tmp"))
        found = self.resume_from.name if self.resume_from is not None else None
        self.nodes.agree(f"the checkpoint to resume from ({self.run_dir / 'checkpoints' / 'latest'})", found, fix=(
            "Every rank must read the same run.dir: put run.root on a filesystem every node mounts"))

    # ---- the step -----------------------------------------------------------------------------------------------
    def micro_batch(self, step: int, micro: int) -> MicroBatch:
        """Micro-batch ``micro`` of ``step`` on this rank: the next batch of the stream its plan names, its labels as
        the plan drops them (on the host, before the copy) and the generator of its time, noise and slot draws
        (under group parallelism the replica's whole batch and generator: :meth:`forward` takes the rank's rows)."""
        d = self.dist
        fetches = self.plan.block_fetches(step, micro)
        if fetches is not None:
            self.data.prefetch(*fetches)
        plan = self.plan.micro(step, d.rank, micro)
        x, y = self.data.next(plan.is_group)
        x = self.callbacks.on_micro_batch(self, step, micro, x.to(d.device, non_blocking=True))
        y = self.plan.labels(step, y, rank=d.rank, micro=micro).to(d.device, non_blocking=True)
        return MicroBatch(x, y, self.plan.generator(step, rank=d.rank, micro=micro, device=d.device), plan)

    def begin_step(self) -> None:
        """Reset the step's device-side accumulator (loss sum, non-finite count, stop flag)."""
        self._acc.zero_()
        if self.zero3:
            _clear_zero3_grads(self.engine)

    def forward(self, mb: MicroBatch) -> torch.Tensor:
        """The loss of one micro-batch at its plan's group size (the objective's; diffusion.loss_reduction)."""

        shard = self.shard

        def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, group_size: int) -> torch.Tensor:
            slots = None
            if self.model.embed_mode == "cond":  # drawn after t and noise, from the same seeded generator
                slots = self.model.draw_slots(x.shape[0] * shard.parts, group_size, mb.generator, x.device,
                                              whole=True)
                slots = shard.take(slots, group_size)
            return self.net(x, t, y, group_size=group_size, slots=slots)

        loss, _ = self.objective.loss(net, mb.x, mb.y, mb.plan.group_size, mb.generator, shard=shard)
        if mb.plan.is_group:
            self.probe.observe(mb.x, mb.y, mb.plan.group_size)
        self._kind = (_GROUP, _GROUP_N) if mb.plan.is_group else (_COND, _COND_N)
        self._per_image = mb.plan.group_size if self.objective.reduction == "group_sum" else 1
        return loss

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch; the step's last one also reads the step's only host values (the loss sums
        overall and by kind, the non-finite count and the stop flag, summed over ranks) and arms the non-finite
        guard with them."""
        self.engine.backward(loss)
        value = loss.detach().double()
        finite = torch.isfinite(value)
        value = torch.where(finite, value, torch.zeros_like(value))
        self._acc[_LOSS] += value
        self._acc[_BAD] += (~finite).double()
        self._acc[self._kind[0]] += value / self._per_image
        self._acc[self._kind[1]] += 1.0
        if not last:
            return
        if self.stop_requested is not None and self.stop_requested():
            self._acc[_STOP] = 1.0
        if dist.is_initialized() and self.dist.world_size > 1:
            dist.all_reduce(self._acc)
        self._reduced = self._acc.tolist()
        self.guard.arm(self._reduced[_BAD] > 0)

    def forward_backward(self, mb: MicroBatch, last: bool) -> None:
        self.backward(self.forward(mb), last)

    def end_step(self, step: int) -> StepResult:
        """After the last ``engine.step()`` of step ``step`` (0-based): settle the guard, update the EMA."""
        skipped = self.guard.settle(self.engine, step + 1)
        r = self._reduced
        if not skipped:
            self.ema.update()
        group_micro = self.plan.group_micro_batches(step, self.dist.world_size)

        def mean(total: float, n: float) -> float | None:
            return None if skipped or n == 0 else total / n

        return StepResult(group_micro, mean(r[_LOSS], group_micro.size), mean(r[_COND], r[_COND_N]),
                          mean(r[_GROUP], r[_GROUP_N]), skipped, r[_STOP] > 0)

    def train_step(self, step: int) -> StepResult:
        """Optimizer step ``step`` (0-based): every micro-batch's forward and backward, then the update."""
        self.begin_step()
        accum = self.layout.grad_accum
        for micro in range(accum):
            self.forward_backward(self.micro_batch(step, micro), last=micro == accum - 1)
            self.engine.step()  # DeepSpeed applies the update at the accumulation boundary
        return self.end_step(step)

    # ---- the run ------------------------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """Checkpoint after ``step`` steps (collective; rank 0 may write for minutes while the others wait, so the
        collectives get the start-up timeout meanwhile)."""
        meta = {"skipped_steps": self.guard.skipped_total, "model_signature": model_signature(self.cfg.model),
                "model_config": self.model_config, "objective": self.objective.name,
                "group_parallel": self.layout.group_parallel, "init_from": self.init_summary, "time": time.time()}
        with self.timeouts.relaxed():
            self.checkpointer.manager.save(step, self.engine, self.ema, self.data.loaders, meta, self.cfg,
                                           fault_hook=lambda stage: self.callbacks.on_checkpoint_stage(self, step,
                                                                                                       stage))

    def _start(self) -> int:
        """Run directory, then the checkpoint to resume from; returns the first step to run."""
        d = self.dist
        if d.is_main:
            self.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)  # resume refuses a dir others can write
            atomic_write_text(self.run_dir / "config.yaml", redacted_yaml(self.cfg))
        self.checkpointer.manager.clean_partial()
        if self.resume_from is None:
            return 0
        self.checkpointer.manager.load(self.resume_from, self.engine, self.ema, self.data.loaders)
        if d.is_main:
            log.warning("resumed from %s (step %d)", self.resume_from, self.resume_step)
        return self.resume_step

    def train(self) -> dict[str, Any]:
        """Run to ``train.steps``; returns ``{"preempted", "step", "skipped_steps", "loss", "run_dir", "ema"}``."""
        t, d = self.cfg.train, self.dist
        start = self._start()
        self.metrics = logger = MetricsLogger.for_run(self.cfg, d.is_main, start)  # callbacks log images here
        steplog = StepLog(logger, Throughput(self.engine.module, d.world_size, float(t.peak_tflops)),
                          int(t.log_every), self.steps)
        self.callbacks.on_train_start(self, start)
        preempted, step, last_loss = False, start, math.nan
        try:
            while step < self.steps:
                try:
                    result = self.train_step(step)
                except RuntimeError as err:
                    raise self._lost_rank(err, step) from err
                self.timeouts.first_step_done()
                step += 1
                steplog.add(self.layout.micro_batch, result, self.plan.group_size)
                last_loss = result.loss if result.loss is not None else last_loss
                logger.advance()
                probe = self.probe.maybe_measure(step, self.engine)
                if probe is not None:
                    logger.log(step, probe)
                held_out = self.held_out.maybe_measure(step, self.engine)  # train.probe_every
                if held_out is not None:
                    logger.log(step, held_out)
                steplog.maybe_log(step, {
                    "grad_norm": self.optimizer.last_grad_norm,  # global, before clipping
                    "lr": float(self.optimizer.param_groups[0]["lr"]),
                    "group_size": self.plan.group_size if result.has_group else 1,
                    "skipped_steps": self.guard.skipped_total})
                if result.stop and step < self.steps:
                    self.save(step)
                    preempted = True
                    break
                if self.checkpointer.due(step, self.steps):
                    self.save(step)
                self.callbacks.on_step_end(self, step)
            if not preempted and d.is_main:
                log.info("training done at step %d (%s)", step, eng.engine_dtype(self.engine))
            with self.timeouts.relaxed(sync=True):  # rank 0 writes the export alone
                ema_state = self.ema.full_state() if not preempted else None
                if ema_state is not None and d.is_main:
                    export_ema(self.model_config, ema_state, self.run_dir / "ema.pt", objective=self.objective.name)
        finally:
            logger.close()
        return {"preempted": preempted, "step": step, "skipped_steps": self.guard.skipped_total, "loss": last_loss,
                "run_dir": str(self.run_dir), "ema": str(self.run_dir / "ema.pt")}

    def _lost_rank(self, err: RuntimeError, step: int) -> RuntimeError:
        """``err`` of a step's collective, explained: after the first step a collective that does not complete in
        ``train.step_timeout_s`` means another rank stopped answering (frozen, killed, its node lost)."""
        said = str(err)
        if not any(s in said for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset")):
            return err
        return eng.LostRankError(
            f"rank {self.dist.rank} on node {self.nodes.name}, step {step + 1}: a collective failed ({said.strip()}). "
            f"Another rank stopped answering (frozen, killed or its node lost; collectives wait at most "
            f"train.step_timeout_s={self.timeouts.step_s:g} s after the first step). This rank exits so that the job "
            f"ends (srun --kill-on-bad-exit); relaunching the run resumes from its last checkpoint")


def _clear_zero3_grads(engine: Any) -> None:
    """Zero ZeRO-3's flat gradient-partition buffer before a step's first backward.

    DeepSpeed 0.19 ZeRO-3 only writes the gradient partitions of parameters that received a gradient in this
    step and then steps on the whole buffer: a parameter unused in a step (``sample_embed`` on a conditional
    GroupDiff-l step) would be updated again with its last, stale gradient, and a resumed run (fresh, zero
    buffer) would diverge from an uninterrupted one.
    """
    buffer = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
    if isinstance(buffer, torch.Tensor):
        buffer.zero_()
