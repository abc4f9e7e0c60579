"""Read what an offline wandb run wrote: the records of ``run-<id>.wandb`` (what ``wandb sync`` would upload).

The file is wandb's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version) followed by LevelDB-log
records (4-byte CRC, 2-byte length, 1-byte type: full / first / middle / last) in 32 KiB blocks, each record a
``wandb_internal_pb2.Record`` protobuf. wandb no longer ships a reader, so the tests parse it here.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """The protobuf records of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left  # a block's tail too short for a record header is padding
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
    parsed = []
    for raw in out:
        record = pb.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


@dataclass
class OfflineRun:
    """One offline attempt: its run id, config and history rows (``_step`` -> values)."""

    path: Path
    run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: dict[int, dict[str, Any]] = field(default_factory=dict)


def read_offline_run(path: Path) -> OfflineRun:
    run = OfflineRun(path)
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id
            run.config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run.config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            step = int(row.pop("_step"))
            run.history.setdefault(step, {}).update(row)
    return run


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """Every offline attempt under ``<run_dir>/wandb``, oldest first."""
    return [read_offline_run(p) for p in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))]
