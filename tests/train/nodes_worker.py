"""One rank of the gd.train.nodes test, acting as its own node (SLURMD_NODENAME set by the test).

`python -m tests.train.nodes_worker RANK SHARED LOCAL`: SHARED is a folder both ranks see, LOCAL one that each
rank's mount namespace replaces with its own. Prints one JSON object: each check's error message (or null)."""
from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from gd.io import atomic_write_text
from gd.train.nodes import NodeLayoutError, Nodes


def _join(rank: int, shared: Path) -> None:
    """Rank 0's store picks a free port and tells rank 1 through the shared folder: no port is guessed."""
    port_file = shared / "port"
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, 2, True, timedelta(seconds=60), wait_for_workers=False)
        atomic_write_text(port_file, str(store.port))
    else:
        deadline = time.monotonic() + 60
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        store = dist.TCPStore("127.0.0.1", int(port_file.read_text()), 2, False, timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)


def main() -> None:
    rank, shared, local = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    _join(rank, shared)
    nodes = Nodes()
    checks = {
        "shared_is_shared": lambda: nodes.check_shared(shared, "run.dir", fix="FIX"),
        "shared_is_node_local": lambda: nodes.check_node_local(shared, "data.cache", fix="FIX"),
        "local_is_shared": lambda: nodes.check_shared(local, "run.dir", fix="FIX"),
        "local_is_node_local": lambda: nodes.check_node_local(local, "data.cache", fix="FIX"),
        "missing_is_shared": lambda: nodes.check_shared(local / f"only-on-{rank}", "run.dir", fix="FIX",
                                                        prepare=lambda p: p.mkdir() if rank == 0 else None),
        "same_value": lambda: nodes.agree("the step", 7, fix="FIX"),
        "different_values": lambda: nodes.agree("the checkpoint", None if rank else "step_00000040", fix="FIX"),
    }
    out = {"names": nodes.names}
    for name, check in checks.items():
        try:
            check()
            out[name] = None
        except NodeLayoutError as err:
            out[name] = str(err)
    print(json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
