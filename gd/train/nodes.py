"""The job's nodes: which ranks share a machine, and the checks that only fail once a job spans several.

On one node every rank sees the same files, /tmp and /dev/shm. Across nodes they do not, and three things then go
wrong silently unless checked right after the process group forms (before a model is built or a shard read):

- the run directory must be the same folder on every node (checkpoints are written by every rank; a run dir on
  node-local disk lets node 0 resume while the others start fresh, and the job deadlocks);
- every rank must resume from the same checkpoint (:meth:`Nodes.agree`);
- the shard cache must be node-local: streaming decompresses shards into it, and two nodes writing one folder
  collide (seen on a two-node job here: ``FileNotFoundError: .../shard.00000.mds.tmp``).

Whether two nodes see one folder is found out, not guessed from its path: the first rank of each node (its
"leader", LOCAL_RANK 0) creates a file with a fresh random name there, and after a barrier every leader looks up
every node's name. A name never looked up before is not in any client cache, so NFS answers from the server.
All ranks run the same collectives in the same order whatever they find, so a refusal reaches every rank instead of
leaving some blocked in a barrier.
"""
from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from gd.distributed.env import local_rank

PROBE_PREFIX = ".gd-node-probe-"


class NodeLayoutError(RuntimeError):
    """Nodes of one job that do not see the same run directory or checkpoint, or that share a node-local folder."""


def node_name() -> str:
    """This node's name: SLURM's node name (several may share one host, as on this machine), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    contiguous = ranks == list(range(ranks[0], ranks[-1] + 1))
    return f"ranks {ranks[0]}-{ranks[-1]}" if contiguous else f"ranks {', '.join(map(str, ranks))}"


class Nodes:
    """Which ranks run on which node (gathered once, collective); ``leader`` is LOCAL_RANK 0, as for streaming."""

    def __init__(self) -> None:
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.name = node_name()
        self.leader = local_rank() == 0
        names = self.gather(self.name)
        self.names = list(dict.fromkeys(names))  # in order of their first rank
        self.ranks = {n: [r for r, m in enumerate(names) if m == n] for n in self.names}

    def __len__(self) -> int:
        return len(self.names)

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order (collective)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out

    def describe(self, name: str) -> str:
        return f"node {name} ({_ranks(self.ranks[name])})"

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ---- what every rank must agree on -------------------------------------------------------------------------
    def agree(self, what: str, value: Any, fix: str) -> None:
        """Raise :class:`NodeLayoutError` on every rank unless all ranks hold the same ``value`` (collective); the
        message lists each node's values and says ``fix``."""
        values = self.gather(value)
        if len({repr(v) for v in values}) <= 1:
            return
        seen: dict[str, list[int]] = {}
        for rank, v in enumerate(values):
            seen.setdefault(repr(v), []).append(rank)
        by_rank = {r: n for n, rs in self.ranks.items() for r in rs}
        parts = []
        for shown, ranks in seen.items():
            nodes = sorted({by_rank[r] for r in ranks}, key=self.names.index)
            parts.append(f"{shown} on {', '.join(nodes)} ({_ranks(ranks)})")
        raise NodeLayoutError(f"the ranks disagree on {what}: " + "; ".join(parts) + f". {fix}")

    # ---- what folders the nodes share -------------------------------------------------------------------------
    def visibility(self, path: str | os.PathLike, prepare: Callable[[Path], Any] | None = None) -> dict[str, Any]:
        """For each node, the nodes whose probe file its leader saw in ``path`` (a list), or why it could not look
        (a string). ``prepare(path)`` runs on each leader first (e.g. create the folder). Collective."""
        path = Path(path)
        nonce = [secrets.token_hex(8) if self.rank == 0 else None]
        if self.distributed:
            dist.broadcast_object_list(nonce, src=0)
        index = self.names.index(self.name)
        mine = path / f"{PROBE_PREFIX}{nonce[0]}-{index}"
        problem = None
        if self.leader:
            try:
                if prepare is not None:
                    prepare(path)
                if not path.is_dir():
                    raise FileNotFoundError(f"{path} does not exist on this node")
                mine.touch(mode=0o600, exist_ok=False)
            except OSError as err:
                problem = str(err)
        self.barrier()
        seen: Any = problem
        if self.leader and problem is None:
            seen = [n for i, n in enumerate(self.names) if (path / f"{PROBE_PREFIX}{nonce[0]}-{i}").exists()]
        self.barrier()
        if self.leader and problem is None:
            mine.unlink(missing_ok=True)
        reports = self.gather(seen if self.leader else None)
        out = {}
        for name in self.names:
            found = [reports[r] for r in self.ranks[name] if reports[r] is not None]
            out[name] = found[0] if found else "no rank of it has LOCAL_RANK 0"
        return out

    def check_shared(self, path: str | os.PathLike, what: str, fix: str,
                     prepare: Callable[[Path], Any] | None = None) -> None:
        """Refuse (on every rank) unless every node sees the same folder ``path`` (config key ``what``)."""
        if len(self) < 2:
            return
        report = self.visibility(path, prepare)
        blind = []
        for name, seen in report.items():
            if isinstance(seen, str):
                blind.append(f"{self.describe(name)} cannot use it ({seen})")
            elif len(seen) < len(self):
                missing = [n for n in self.names if n not in seen]
                blind.append(f"{self.describe(name)} does not see what {', '.join(missing)} wrote there")
        if blind:
            raise NodeLayoutError(f"{what}={path} is not one folder shared by the job's {len(self)} nodes: "
                                  + "; ".join(blind) + f". {fix}")

    def check_node_local(self, path: str | os.PathLike, what: str, fix: str,
                         prepare: Callable[[Path], Any] | None = None) -> None:
        """Refuse (on every rank) when nodes share the folder ``path`` (config key ``what``), which each node must
        have to itself."""
        if len(self) < 2:
            return
        report = self.visibility(path, prepare)
        problems = [f"{self.describe(name)} cannot use it ({seen})" for name, seen in report.items()
                    if isinstance(seen, str)]
        sharing = [name for name, seen in report.items() if not isinstance(seen, str) and len(seen) > 1]
        if sharing:
            problems.append("it is one folder shared by " + ", ".join(self.describe(n) for n in sharing))
        if problems:
            raise NodeLayoutError(f"{what}={path} must be node-local, but " + "; ".join(problems) + f". {fix}")
