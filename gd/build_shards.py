"""Build pre-grouped latent shards (MDS) from an image collection: ``python -m gd.build_shards`` / ``gd-build-shards``
(also ``tools/build_shards.py``); settings in conf/build_shards.yaml, the pipeline in gd/data/build.py.

Each stage is resumable: re-run the same command after a crash or preemption. Multi-process / multi-machine:
run with rank=i world=n (defaults: a SLURM job array times the job's processes, torchrun's RANK/WORLD_SIZE or
srun's SLURM_PROCID/SLURM_STEP_NUM_TASKS) against a work_dir on a filesystem all machines share (the out= store can
be s3://). Chunk c goes to rank c % world. retrieve needs every embed chunk and write every retrieve chunk: either
let the ranks wait for each other (all running at once, e.g. `srun -N4 --ntasks-per-node 8 python -m
gd.build_shards ...`; they wait up to wait_timeout_s, 6 h by default), or run `stages=[read,encode,embed]` as a job
array, then the remaining stages.
"""
from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from gd.config import hydra_main


def main() -> None:
    """Hydra entry point (conf/build_shards.yaml); torch and the pipeline load only once a build starts."""
    @hydra_main("build_shards", groups=())  # it reads no config group (+cluster=... is refused)
    def _main(cfg: DictConfig) -> int:
        problem = _missing_input(cfg)
        if problem:  # before the pipeline's imports (streaming, torch, faiss: tens of seconds)
            print(f"gd.build_shards: {problem}", file=sys.stderr)
            return 2
        from gd.data.build import Builder, config_from_dict

        Builder(config_from_dict(OmegaConf.to_container(cfg, resolve=True))).run()
        return 0

    code = _main()
    if code:
        sys.exit(code)


def _missing_input(cfg: DictConfig) -> str | None:
    """The images the build reads, checked first: a folder source's root, the Fashion-MNIST files."""
    from pathlib import Path

    source = str(cfg.get("source"))
    spec = OmegaConf.select(cfg, f"sources.{source}") or {}
    root = spec.get("root")
    if source == "folder" and (not root or not Path(str(root)).is_dir()):
        return (f"sources.folder.root={root}: no such folder; expected an ImageNet-style <root>/<class>/<image> tree "
                "(e.g. sources.folder.root=/data/imagenet/train)")
    if source == "fashion_mnist" and root and not Path(str(root)).is_dir():
        return (f"sources.fashion_mnist.root={root}: no such folder; Debian's dataset-fashion-mnist package installs "
                "it at /usr/share/datasets/fashion-mnist")
    return None


if __name__ == "__main__":
    main()
