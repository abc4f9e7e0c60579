"""Build pre-grouped latent shards (MDS) from an image collection; see conf/build_shards.yaml and gd/data/build.py.

Each stage is resumable: re-run the same command after a crash or preemption. Multi-process / multi-machine:
run with rank=i world=n (defaults: a SLURM job array times the job's processes, torchrun's RANK/WORLD_SIZE or
srun's SLURM_PROCID/SLURM_STEP_NUM_TASKS) against a work_dir on a filesystem all machines share (the out= store can
be s3://). Chunk c goes to rank c % world. retrieve needs every embed chunk and write every retrieve chunk: either
let the ranks wait for each other (all running at once, e.g. `srun -N4 --ntasks-per-node 8 python
tools/build_shards.py ...`; they wait up to wait_timeout_s, 6 h by default), or run `stages=[read,encode,embed]` as a
job array, then the remaining stages.
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gd.data.build import Builder, config_from_dict  # noqa: E402


@hydra.main(config_path="../conf", config_name="build_shards", version_base="1.3")
def main(cfg: DictConfig) -> None:
    Builder(config_from_dict(OmegaConf.to_container(cfg, resolve=True))).run()


if __name__ == "__main__":
    main()
