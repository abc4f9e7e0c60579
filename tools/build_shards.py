"""Build pre-grouped latent shards (MDS) from an image collection; see conf/build_shards.yaml and gd/data/build.py.

Each stage is resumable: re-run the same command after a crash or preemption. Multi-process / multi-machine:
run with rank=i world=n (or as a SLURM job array: rank/world default to SLURM_ARRAY_TASK_ID/COUNT) against a
shared work_dir; a rank that reaches retrieve/write before the others have finished embed/encode stops with the
list of missing chunks, so run `stages=[read,encode,embed]` as the array and then the default command once.
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
