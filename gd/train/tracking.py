"""Weights & Biases as a metrics sink beside ``metrics.jsonl`` and tensorboard (rank 0; optional dependency:
``pip install 'groupdiff[wandb]'``), switched on by ``train.wandb.enabled``.

- One wandb run per gd run: its id comes from ``run.name`` and ``run.dir`` (``train.wandb.id`` overrides), and it is
  opened with ``resume="allow"``, so a requeued or relaunched run continues the same wandb run instead of starting
  a new one. Sweep members (``run.name`` ``<sweep>/<member>``) are grouped under the sweep's name.
- ``WANDB_MODE=offline`` (or ``train.wandb.mode=offline``) needs no network: each attempt writes
  ``<run.dir>/wandb/offline-run-*-<id>/``, and ``wandb sync`` uploads them into that one run.
- The config is logged resolved with every credential redacted (gd.secrets, as in config.yaml), never raw.
- Metrics already logged are not lost or repeated: on opening, the ``metrics.jsonl`` records wandb has not seen
  (wandb switched on for a run that already trained, or a process killed between the two writes) are sent first;
  steps a resumed run repeats after its checkpoint (exactly as before: resumption is exact) are not sent again.
  ``<run.dir>/wandb/gd_logged.json`` holds the last step sent.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from gd.io import atomic_write_text

INSTALL_HINT = "pip install 'groupdiff[wandb]' (or pip install wandb)"


def wandb_requested(cfg: Any) -> bool:
    w = cfg.train.get("wandb")
    return bool(w is not None and w.get("enabled"))


def wandb_installed() -> bool:
    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):  # ValueError: an entry of None in sys.modules, as for a blocked import
        return False


def check_available(cfg: Any) -> None:
    """ImportError with the install command when ``cfg`` asks for wandb and it is not installed (checked without
    importing it, before any expensive work)."""
    if wandb_requested(cfg) and not wandb_installed():
        raise ImportError(f"train.wandb.enabled=true but wandb is not installed: {INSTALL_HINT}, or set "
                          "train.wandb.enabled=false")


def wandb_run_id(run_name: str, run_dir: str) -> str:
    """A wandb run id for the gd run: its name in wandb's alphabet plus a hash of name and directory (two users'
    ``demo`` runs stay apart; a requeue, with the same name and directory, gets the same id)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-")[:48] or "run"
    digest = hashlib.sha1(f"{run_name}\0{Path(run_dir).resolve()}".encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


class WandbSink:
    """Opens (or resumes) the run's wandb run; ``log`` / ``log_image`` / ``close`` as MetricsLogger calls them."""

    def __init__(self, cfg: Any, start_step: int) -> None:
        check_available(cfg)
        import wandb

        from gd.secrets import redacted_container

        w = cfg.train.wandb
        run_dir = Path(str(cfg.run.dir))
        run_name = str(cfg.run.name)
        self.id = str(w.get("id") or wandb_run_id(run_name, str(run_dir)))
        self.marker = run_dir / "wandb" / "gd_logged.json"
        self.marker.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.sent = self._read_marker()
        self._resumed_upto = self.sent
        group = w.get("group") or (run_name.rsplit("/", 1)[0] if "/" in run_name else None)
        self._wandb = wandb
        self.run = wandb.init(project=str(w.project), entity=w.get("entity"), group=group,
                              tags=[str(t) for t in (w.get("tags") or [])], name=run_name, id=self.id,
                              resume="allow", dir=str(run_dir), mode=w.get("mode") or None,
                              config=redacted_container(cfg, resolve=True))
        self._backfill(run_dir / "metrics.jsonl", start_step)

    def _read_marker(self) -> int:
        if not self.marker.is_file():
            return 0
        try:
            record = json.loads(self.marker.read_text())
        except json.JSONDecodeError:
            return 0
        return int(record.get("step", 0)) if record.get("id") == self.id else 0

    def _backfill(self, metrics: Path, start_step: int) -> None:
        """Send the records of ``metrics.jsonl`` up to ``start_step`` that wandb has not seen."""
        if not metrics.is_file():
            return
        for line in metrics.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            step = int(record.pop("step", 0))
            if self.sent < step <= start_step:
                self._send(step, record)
        self._resumed_upto = max(self._resumed_upto, self.sent)

    def _send(self, step: int, values: dict[str, Any]) -> None:
        scalars = {f"train/{k}": v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            self.run.log(scalars, step=step)
        if step > self.sent:
            self.sent = step
            atomic_write_text(self.marker, json.dumps({"id": self.id, "step": step}))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if step > self._resumed_upto:
            self._send(step, values)

    def log_image(self, step: int, tag: str, image: np.ndarray) -> None:
        if step > self._resumed_upto:
            self.run.log({tag: self._wandb.Image(image, caption=f"step {step}")}, step=step)

    def close(self) -> None:
        self.run.finish()
