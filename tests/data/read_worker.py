"""One rank of the multi-process read test: iterate one epoch of both loaders, save what this rank saw.

Run as `python -m tests.data.read_worker ROOT CACHE OUT.npz GROUP_SIZE` with RANK/WORLD_SIZE/LOCAL_RANK/
LOCAL_WORLD_SIZE set (as torchrun would)."""
import os
import sys

import numpy as np
import torch

from gd.data.loader import build_loaders


def main() -> None:
    root, cache, out, group_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = {"root": root, "cache": cache, "cache_limit": None, "shuffle": True, "num_workers": 0, "drop_last": False}
    plain, group = build_loaders(cfg, group_size=group_size, micro_batch=8, seed=3, rank=rank, world_size=world)
    p = {k: [] for k in ("latent", "label", "id")}
    for b in plain:
        for k in p:
            p[k].append(b[k])
    g = {k: [] for k in ("latent", "label", "id", "sim", "fallback")}
    for b in group:
        for k in g:
            g[k].append(b[k])
    np.savez(out, **{f"plain_{k}": torch.cat(v).numpy() for k, v in p.items()},
             **{f"group_{k}": torch.cat(v).numpy() for k, v in g.items()})


if __name__ == "__main__":
    main()
