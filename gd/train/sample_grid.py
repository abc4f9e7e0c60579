"""Sample grids while training: every ``train.sample_every`` steps, a grid from the EMA weights with fixed noise.

A run going wrong (collapsed groups, colour shifts, noise) shows in its samples hours before any FID. The grid holds
``train.sample_grid.classes`` rows (classes evenly spaced over the model's), ``per_class`` images each, sampled as
gd.sample does: with the run's objective's sampler (``diffusion.objective``: flow, or DDPM for DiT; ``sample.*``
settings with the grid's ``method``, ``steps`` and ``cfg_scale``, a few NFEs) in the run's mode
(``BatchPlan.sampling_group_sizes``: GroupDiff-l groups only the unconditional branch, -f both; a class's images
form its groups). Noise, sampler noise and sample-embedding slots come from generators seeded by
``sample_grid.seed`` only, so the grids of one run differ only by the weights.

Written by rank 0 to ``<run.dir>/grids/step_XXXXXXXX.png`` (atomically) and through the run's metrics sinks
(tensorboard, wandb). Under ZeRO the EMA is sharded: gathering it (:meth:`ShardedEMA.full_state`) is a collective,
so every rank runs :meth:`on_step_end`; only rank 0 then samples, while the others wait in a barrier under the
start-up timeout (gd.train.engine.CollectiveTimeouts.relaxed). Sampling leaves the global RNG untouched (a
resumed run draws the same training noise as an uninterrupted one).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gd.io import atomic_write_bytes
from gd.train.callbacks import Callback

if TYPE_CHECKING:
    from gd.train.trainer import Trainer

log = logging.getLogger("gd.train")

__all__ = ["SampleGrid", "grid_classes"]

DEFAULT_METHOD = {"flow": "euler", "ddpm": "ddim"}  # deterministic, good in few steps


def grid_classes(num_classes: int, rows: int) -> list[int]:
    """``rows`` class ids evenly spaced over ``num_classes`` (all of them when there are fewer)."""
    rows = min(int(rows), int(num_classes))
    return [int(c) for c in np.linspace(0, num_classes - 1, rows).round().astype(int)] if rows > 1 else [0]


class SampleGrid(Callback):
    """Samples and writes the grid every ``every`` steps (``cfg``: the run config; its ``train.sample_grid`` block
    and ``sample`` block (sampler options, CFG interval and channels, decoder, precision) say how). Its settings are
    checked here, before any training step."""

    def __init__(self, cfg: Any, every: int) -> None:
        from omegaconf import OmegaConf

        from gd.diffusion.objectives import build_objective
        from gd.diffusion.plan import BatchPlan
        from gd.sample import Layout

        self.cfg, self.every = cfg, int(every)
        g = cfg.train.sample_grid
        if self.every < 1:
            raise ValueError(f"train.sample_every={every}: expected >= 1 (0 turns the grid off)")
        for key in ("classes", "per_class"):
            if int(g[key]) < 1:
                raise ValueError(f"train.sample_grid.{key}={g[key]}: expected >= 1")
        self.objective = build_objective(cfg.diffusion, cfg.model)
        method = g.get("method") or DEFAULT_METHOD[self.objective.name]
        settings = {**OmegaConf.to_container(cfg.sample, resolve=True), "method": method, "steps": g.steps,
                    "cfg_scale": g.cfg_scale}
        try:
            self.sampler = self.objective.sampler(settings)
        except ValueError as err:
            raise ValueError(f"train.sample_grid (method={method!r}, steps={g.steps!r}, cfg_scale={g.cfg_scale}; the "
                             f"rest from sample.*): {err}") from err
        if cfg.sample.decoder == "sdvae" and not cfg.sample.get("vae_path"):
            raise ValueError("train.sample_every needs the VAE to decode the grid: sample.vae_path=<local "
                             "AutoencoderKL folder> (or train.sample_every=0)")
        self.cond_n, self.uncond_n = BatchPlan(str(cfg.diffusion.mode), int(cfg.diffusion.group_size)
                                               ).sampling_group_sizes()
        self.classes = grid_classes(int(cfg.model.num_classes), int(g.classes))
        n = max(self.cond_n, self.uncond_n)
        self.layout = Layout(len(self.classes) * int(g.per_class), len(self.classes), n, 1)
        self._model: torch.nn.Module | None = None
        self._decoder: Any = None

    @classmethod
    def from_config(cls, cfg: Any) -> SampleGrid | None:
        """The grid ``cfg.train.sample_every`` asks for, or None when it is 0 (off)."""
        every = int(cfg.train.get("sample_every") or 0)
        return cls(cfg, every) if every else None

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        if step % self.every:
            return
        # Rank 0 samples alone while the others wait for it: under the start-up timeout (train.init_timeout_s),
        # ending with a barrier, not in the next step's collective under train.step_timeout_s.
        with trainer.timeouts.relaxed(sync=True):
            state = trainer.ema.full_state()  # collective: every rank sends its shard, rank 0 receives the EMA
            if trainer.dist.is_main:
                self._write(trainer, step, state)

    def _write(self, trainer: Trainer, step: int, state: dict[str, torch.Tensor]) -> None:
        grid = self.sample(trainer.model_config, state, trainer.dist.device)
        from gd.sample import png_bytes

        path = trainer.run_dir / "grids" / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, png_bytes(grid))
        metrics = getattr(trainer, "metrics", None)
        if metrics is not None:
            metrics.log_image(step, "samples", grid)
        log.info("sample grid at step %d: %s", step, path)

    @torch.no_grad()
    def sample(self, model_config: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device) -> np.ndarray:
        """The grid (uint8 H x W x 3) of the model ``model_config`` with the weights ``state``."""
        from gd.sample import SeededSlots, build_decoder, chunk_generator, class_grid, slot_noise

        g, s = self.cfg.train.sample_grid, self.cfg.sample
        seed, layout = int(g.seed), self.layout
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            model = self._sampling_model(model_config, state, device)
            if self._decoder is None:
                self._decoder = build_decoder(s, model.in_channels, device)
            slots = np.arange(layout.num_slots)
            rows = layout.slot_labels(slots)
            labels = torch.as_tensor([self.classes[r] for r in rows], device=device)
            noise = slot_noise(seed, slots, (model.in_channels, model.input_size, model.input_size)).to(device)
            net = self.objective.network(model)
            if getattr(model, "embed_mode", "none") == "cond":
                net = SeededSlots(net, model, chunk_generator(seed, 0, stream=2))
            precision = str(s.get("precision", "fp32"))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                latents = self.sampler(net, noise, labels, group_size=self.cond_n, uncond_group_size=self.uncond_n,
                                       generator=chunk_generator(seed, 0), null_class=int(model.num_classes))
            kept = layout.slot_kept(slots)
            images = self._decoder.decode(latents.float()[torch.as_tensor(kept, device=device)]).cpu().numpy()
        return class_grid(images, rows[kept], len(self.classes), layout.per_class)

    def _sampling_model(self, model_config: dict[str, Any], state: dict[str, torch.Tensor],
                        device: torch.device) -> torch.nn.Module:
        """The run's model (built once, on rank 0) holding ``state`` (the EMA's parameters; buffers as built), in
        eval mode without gradients."""
        if self._model is None:
            from gd.models import build_model

            kwargs = dict(model_config)
            self._model = build_model(kwargs.pop("name"), **kwargs).to(device).eval().requires_grad_(False)
        self._model.load_state_dict({**self._model.state_dict(), **{k: v.to(device) for k, v in state.items()}})
        return self._model
