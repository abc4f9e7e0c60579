"""Resuming a checkpoint on another number of ranks (a world-size change), exactly and without unpickling code.

What a checkpoint holds per rank, and how it carries over to a new world size W':

- the fp32 master weights and Adam moments. ZeRO-1/2 (DeepSpeed's ZeRO optimizer: stage 2, and stage 1 in fp32)
  split them as one flat buffer into W partitions, one file per rank, each listing which slice of which parameter
  it holds (``param_slice_mappings``). Each new rank reads, memory-mapped and weights-only, just the slices of the
  parameters its new partition covers, and writes them into its flat master, its ``exp_avg`` and ``exp_avg_sq``
  (step count as saved); the bf16/fp32 module weights are then refreshed from the masters. Every value is copied,
  none recomputed: the optimizer state after the change is bit for bit the saved one. Stage 0 keeps the whole
  optimizer state in one file and loads as usual. ZeRO-3 (per-parameter partitions) and ZeRO-1 bf16 (DeepSpeed's
  BF16_Optimizer, another format) are refused;
- the EMA is saved consolidated and loads on any world size;
- the data position: both streams' states are global (streaming counts samples over all ranks, and its sample order
  depends on its canonical node count, not on the ranks) and equal on every rank, so every new rank takes the same
  one and streaming deals the rest of the epoch over the new ranks. This holds only between blocks of the batch plan
  (gd.diffusion.plan: each block's batches are read ahead), so the step resumed from must start a block both under
  the old and the new gradient accumulation; the refusal names the steps that do;
- the global RNG states (ranks that exist in both worlds keep theirs; every training draw comes from generators
  seeded by (seed, step, rank, micro), not from them).

The continuation is a valid run at the new world size: its micro-batches hold other samples than the old world's
would have (ranks partition differently and the plan draws per rank), so it is not the old run bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

SUPPORTED = "ZeRO stage 0, stage 1 in fp32 or bf16_autocast, and stage 2"


def checkpoint_settings(path: str | Path) -> dict[str, Any]:
    """World size, step and training settings of checkpoint ``path`` (its meta.json and config.yaml; plain data)."""
    import json

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    train = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False).get("train", {})
    return {"world_size": int(meta["world_size"]), "step": int(meta["step"]), "zero_stage": int(train["zero_stage"]),
            "precision": str(train["precision"]), "micro_batch": int(train["micro_batch"]),
            "global_batch": int(train["global_batch"])}


def reshard_problems(saved: Mapping[str, Any], world: int, train_cfg: Mapping[str, Any], block: int | None,
                     accum: int) -> list[str]:
    """Why a checkpoint with ``saved`` settings (:func:`checkpoint_settings`) cannot resume on ``world`` ranks with
    ``train_cfg``, gradient accumulation ``accum`` and batch-plan blocks of ``block`` micro-batches per rank (None:
    the plan reads each step's batches by itself, diffusion.mix=step). Empty: it can."""
    if saved["world_size"] == world:
        return []
    problems = []
    stage, precision = int(train_cfg["zero_stage"]), str(train_cfg["precision"])
    if (stage, precision) != (saved["zero_stage"], saved["precision"]):
        problems.append(f"it was written with train.zero_stage={saved['zero_stage']} train.precision="
                        f"{saved['precision']}, this run has {stage} {precision}")
    elif stage == 3 or (stage == 1 and precision == "bf16"):
        problems.append(f"train.zero_stage={stage} train.precision={precision} keeps optimizer state in a layout "
                        f"that is only re-partitioned for {SUPPORTED}")
    if int(train_cfg.get("group_parallel") or 1) > 1:
        problems.append(f"train.group_parallel={train_cfg['group_parallel']}: the streams of group-parallel replicas "
                        "are not re-dealt over another number of ranks")
    step = saved["step"]
    old_accum = saved["global_batch"] // (saved["micro_batch"] * saved["world_size"])
    if block is not None and (step * old_accum % block or step * accum % block):
        every = math.lcm(block // math.gcd(block, old_accum), block // math.gcd(block, accum))
        problems.append(f"step {step} is inside a block of the batch plan ({block} micro-batches per rank, read ahead "
                        f"together) under {old_accum} or {accum} micro-batches per step; a checkpoint at a multiple of "
                        f"{every} steps can change world size (train.ckpt_every)")
    return problems


def describe(saved: Mapping[str, Any], world: int, problems: list[str]) -> str:
    head = (f"checkpoint at step {saved['step']} was written by {saved['world_size']} processes, this run has "
            f"{world}")
    if problems:
        return (f"{head}, and cannot change world size: " + "; ".join(problems) + f". Resume with "
                f"{saved['world_size']} processes, or start a new run.name")
    return (f"{head}: its ZeRO partitions are re-split over {world} ranks (optimizer state exact); the data continues "
            f"from the same sample, dealt over the new ranks")


@torch.no_grad()
def load_optimizer_resharded(engine: Any, engine_dir: Path, old_world: int) -> None:
    """Fill this rank's ZeRO-1/2 flat fp32 partition and its Adam moments from the ``old_world`` partition files in
    ``engine_dir`` (the engine's module weights already loaded), then refresh the module from the masters."""
    from gd.train.checkpoint import _deepspeed_globals, load_weights_only

    opt = engine.optimizer
    if not hasattr(opt, "single_partition_of_fp32_groups") or len(opt.single_partition_of_fp32_groups) != 1:
        raise RuntimeError(f"{type(opt).__name__}: expected DeepSpeed's ZeRO-1/2 optimizer with one parameter group")
    old = [load_weights_only(engine_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", _deepspeed_globals(),
                             map_location="cpu", mmap=True)["optimizer_state_dict"] for r in range(old_world)]
    slices = [o["param_slice_mappings"][0] for o in old]
    sources = {"master": [o["single_partition_of_fp32_groups"][0] for o in old]}
    for key in ("exp_avg", "exp_avg_sq"):
        sources[key] = [o["base_optimizer_state"]["state"][0][key] for o in old]
    flat = opt.single_partition_of_fp32_groups[0]
    targets = {"master": flat, "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    for name, p in engine.module.named_parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            continue
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        for key, target in targets.items():
            full = _gathered(slices, sources[key], name, p.numel(), engine_dir)
            target.narrow(0, hp.start, hp.numel).copy_(full.narrow(0, lp.start, lp.numel))
    state = old[0]["base_optimizer_state"]["state"][0]
    opt.optimizer.state[flat] = {"step": state["step"].clone(), "exp_avg": targets["exp_avg"],
                                 "exp_avg_sq": targets["exp_avg_sq"]}
    opt.update_lp_params()


def _gathered(slices: list[Mapping[str, Any]], flats: list[torch.Tensor], name: str, numel: int,
              engine_dir: Path) -> torch.Tensor:
    """Parameter ``name`` flattened: its slices of the saved partitions in old-rank order."""
    full = torch.cat([flat.narrow(0, slices[r][name].start, slices[r][name].numel)
                      for r, flat in enumerate(flats) if name in slices[r]])
    if full.numel() != numel:
        raise RuntimeError(f"{engine_dir}: the saved partitions hold {full.numel()} elements of {name}, which has "
                           f"{numel}")
    return full


@torch.no_grad()
def master_weights(engine_dir: Path, saved: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint's engine folder as a full state dict (what ``train.init_from`` of a
    step checkpoint seeds the network with); ValueError where the partition layout is not one read here."""
    from gd.train.checkpoint import _deepspeed_globals, load_weights_only

    stage, precision, world = int(saved["zero_stage"]), str(saved["precision"]), int(saved["world_size"])
    if stage == 3 or (stage == 1 and precision == "bf16"):
        raise ValueError(f"its train.zero_stage={stage} train.precision={precision} master weights are partitioned "
                         f"in a layout read only for {SUPPORTED}")
    module = load_weights_only(engine_dir / "mp_rank_00_model_states.pt", _deepspeed_globals(), map_location="cpu",
                               mmap=True)["module"]
    if stage == 0:
        return {k: v.float() for k, v in module.items()}
    old = [load_weights_only(engine_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", _deepspeed_globals(),
                             map_location="cpu", mmap=True)["optimizer_state_dict"] for r in range(world)]
    slices = [o["param_slice_mappings"][0] for o in old]
    flats = [o["single_partition_of_fp32_groups"][0] for o in old]
    out = {}
    for name, value in module.items():
        if any(name in s for s in slices):
            out[name] = _gathered(slices, flats, name, value.numel(), engine_dir).view(value.shape).clone()
        else:  # buffers (pos_embed): the module's own
            out[name] = value.float()
    return out


def merged_rank_state(path: Path, old_world: int, rank: int) -> dict[str, Any]:
    """The per-rank state a new ``rank`` resumes with: the loaders' (equal on every old rank; refused otherwise or
    when batches were read ahead) and its own RNG when it existed before (else None)."""
    from gd.train.checkpoint import CheckpointMismatchError, load_weights_only

    states = [load_weights_only(path / f"rank_{r:05d}.pt", map_location="cpu") for r in range(old_world)]
    loaders = states[0]["loaders"]
    for r, s in enumerate(states[1:], 1):
        if repr({k: v for k, v in s["loaders"].items() if k != "queued"}) != \
                repr({k: v for k, v in loaders.items() if k != "queued"}):
            raise CheckpointMismatchError(f"{path}: ranks 0 and {r} saved different stream positions, so the data "
                                          "position is not global; resume with the world size it was written by")
    queued = {k: len(v) for s in states for k, v in s["loaders"].get("queued", {}).items() if v}
    if queued:
        raise CheckpointMismatchError(f"{path}: batches were read ahead for a block of the batch plan ({queued}); "
                                      "only a checkpoint between blocks can change world size")
    return {"loaders": loaders, "rng": states[rank]["rng"] if rank < old_world else None}
