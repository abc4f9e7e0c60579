"""Config composition and validation: every experiment composes on both clusters, bad configs are rejected."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from gd.launch import LaunchError
from gd.launch.validate import validate, world_size
from tests.launch.conftest import compose_cfg, run_launch

EXPERIMENTS = ("demo", "sit_xl2_baseline", "groupdiff4", "groupdiff16", "finetune_sit_xl2_groupdiff4",
               "finetune_dit_xl2_groupdiff4", "finetune_repa_groupdiff4")


@pytest.mark.parametrize("cluster", ["local", "slurm"])
@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes(cluster: str, exp: str) -> None:
    cfg = compose_cfg(f"+cluster={cluster}", f"+exp={exp}")
    assert cfg.cluster.kind == cluster
    assert cfg.task == "train"
    assert cfg.diffusion.group_size <= cfg.model.max_group_size
    assert cfg.train.global_batch % cfg.diffusion.group_size == 0


def test_groupdiff16_is_the_paper_recipe() -> None:
    cfg = compose_cfg("+cluster=slurm", "+exp=groupdiff16")
    assert cfg.model.name == "SiT-XL/2"
    assert (cfg.model.in_channels, cfg.model.input_size, cfg.model.num_classes) == (4, 32, 1000)
    assert (cfg.diffusion.mode, cfg.diffusion.group_size, cfg.diffusion.p_group) == ("l", 16, 0.1)
    t = cfg.train
    assert (t.global_batch, t.lr, t.ema_decay, t.precision, t.zero_stage) == (256, 1e-4, 0.9999, "bf16_autocast", 2)
    assert cfg.model.learn_sigma is False  # the released SiT layout: 4 output channels
    assert OmegaConf.is_missing(cfg.data, "root")  # the user's shard set: required, no placeholder bucket
    assert world_size(cfg.cluster) == 8
    with pytest.raises(LaunchError, match="data.root is required: the shard set tools/build_shards.py wrote"):
        validate(compose_cfg("+cluster=slurm", "+exp=groupdiff16", "launcher.dry_run=true"))


def test_demo_is_tiny_cpu_groupdiff_l() -> None:
    cfg = compose_cfg("+cluster=local", "+exp=demo")
    assert (cfg.model.name, cfg.model.in_channels, cfg.model.num_classes) == ("SiT-S/4", 1, 10)
    assert (cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads) == (128, 4, 4)
    assert (cfg.diffusion.mode, cfg.diffusion.group_size, cfg.diffusion.p_group) == ("l", 2, 0.1)
    assert cfg.train.precision == "fp32" and cfg.train.steps <= 1000
    assert (cfg.train.global_batch, cfg.train.micro_batch) == (64, 64)
    assert cfg.sample.cfg_scale > 1.0
    assert cfg.cluster.gpus_per_node == 0 and world_size(cfg.cluster) == 1


def _rejection(*overrides: str) -> str:
    cfg = compose_cfg(*overrides)
    with open_dict(cfg):
        cfg.launcher.check_data = False
    with pytest.raises(LaunchError) as err:
        validate(cfg)
    return str(err.value)


def test_group_size_must_divide_the_batch() -> None:
    msg = _rejection("+cluster=slurm", "+exp=groupdiff16", "train.global_batch=250")
    assert "train.global_batch=250 is not divisible by diffusion.group_size=16" in msg


def test_more_gpus_than_groups_in_the_batch() -> None:
    msg = _rejection("+cluster=slurm", "+exp=groupdiff16", "cluster.nodes=4", "train.micro_batch=16")
    assert "32 processes" in msg and "only 16 groups" in msg


def test_groupdiff16_on_four_nodes_says_what_to_change() -> None:
    """Fails before the fix: the refusal of groupdiff16 on 4 nodes x 8 GPUs said only "use at most 16 processes or a
    larger batch", not which settings give that (nodes, tasks per node, group parallelism) or how large a batch
    would do."""
    msg = _rejection("+cluster=slurm", "+exp=groupdiff16", "cluster.nodes=4")
    assert "32 processes = cluster.nodes=4 x 8 tasks per node" in msg
    assert "use at most 16 processes (fewer nodes, or fewer tasks per node)" in msg.lower()
    assert "raise train.global_batch to a multiple of 512" in msg


def test_groupdiff16_on_four_nodes_with_two_ranks_per_group() -> None:
    """The design card's headline run, 4 x 8 GPUs at batch 256 (8 images per rank): refused without group
    parallelism with the fix named, accepted with train.group_parallel=2. Heads that Ulysses cannot split are
    refused naming the heads, P and the implementation; all-gather takes them. Sampling checks its own P."""
    four = ("+cluster=slurm", "+exp=groupdiff16", "cluster.nodes=4", "train.micro_batch=8")
    msg = _rejection(*four)
    assert "32 processes but train.global_batch=256 holds only 16 groups" in msg
    assert "set train.group_parallel=2" in msg
    cfg = compose_cfg(*four, "train.group_parallel=2")
    with open_dict(cfg):
        cfg.launcher.check_data = False
    assert validate(cfg) == []
    msg = _rejection(*four, "train.group_parallel=8", "model.num_heads=12")
    assert "num_heads=12 is not divisible by group_parallel P=8" in msg and "train.group_parallel_impl" in msg
    cfg = compose_cfg(*four, "train.group_parallel=8", "model.num_heads=12", "train.group_parallel_impl=allgather")
    with open_dict(cfg):
        cfg.launcher.check_data = False
    assert validate(cfg) == []
    msg = _rejection("+cluster=slurm", "+exp=groupdiff16", "task=sample", "sample.group_parallel=3")
    assert "sample.group_size=16 is not divisible by sample.group_parallel=3" in msg


def test_micro_batch_times_world_must_divide_the_batch() -> None:
    msg = _rejection("+cluster=slurm", "+exp=groupdiff4", "cluster.nodes=2")
    assert "not a multiple of 16 processes" in msg and "= 512" in msg


def test_engine_settings_are_checked_before_submission() -> None:
    msg = _rejection("+cluster=slurm", "+exp=groupdiff16", "train.zero_stage=0", "train.precision=bf16")
    assert "train.zero_stage=0 with train.precision=bf16" in msg and "bf16_autocast" in msg
    assert "train.precision='fp16'" in _rejection("+cluster=local", "+exp=demo", "train.precision=fp16")


def test_group_larger_than_the_model_allows() -> None:
    msg = _rejection("+cluster=local", "+exp=demo", "diffusion.group_size=8")
    assert "exceeds model.max_group_size=2" in msg


@pytest.mark.parametrize("key", ["AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "WANDB_API_KEY", "HF_TOKEN",
                                 "DB_PASSWORD", "my_secret"])
def test_credentials_in_cluster_env_are_refused(key: str) -> None:
    msg = _rejection("+cluster=slurm", "+exp=groupdiff4", f"+cluster.env.{key}=hunter2")
    assert f"cluster.env sets {key}" in msg and "~/.aws" in msg and "launch.yaml" in msg
    assert "hunter2" not in msg


def test_plain_cluster_env_is_accepted() -> None:
    """Ordinary variables (no credential words, no credentials in values) pass without a warning; catches a scan
    that refuses every cluster.env entry or flags URLs without a password."""
    cfg = compose_cfg("+cluster=local", "+exp=demo", "+cluster.env.NCCL_IB_DISABLE='1'",
                      "+cluster.env.S3_ENDPOINT_URL=http://127.0.0.1:9000")
    with open_dict(cfg):
        cfg.launcher.check_data = False
    assert validate(cfg) == []


def test_local_cluster_is_one_node() -> None:
    msg = _rejection("+cluster=local", "+exp=demo", "cluster.nodes=2")
    assert "cluster.nodes=2" in msg


def test_missing_local_data_path(tmp_path: Path) -> None:
    cfg = compose_cfg("+cluster=local", "+exp=demo", f"data.root={tmp_path}/nope")
    with pytest.raises(LaunchError, match=f"data.root={tmp_path}/nope does not exist"):
        validate(cfg)


def test_shards_that_do_not_fit_the_model(tiny_shards: Path) -> None:
    cfg = compose_cfg("+cluster=local", "+exp=demo", f"data.root={tiny_shards}", "model.input_size=32")
    with pytest.raises(LaunchError, match=r"shape \[1, 16, 16\] but the model expects .* = \[1, 32, 32\]"):
        validate(cfg)


def test_missing_s3_data_path(s3_bucket: str) -> None:
    cfg = compose_cfg("+cluster=slurm", "+exp=groupdiff4", f"data.root=s3://{s3_bucket}/none")
    with pytest.raises(LaunchError, match=f"s3://{s3_bucket}/none/plain/index.json not found"):
        validate(cfg)


def test_cfg_job_prints_the_composed_config(tmp_path: Path) -> None:
    out = run_launch("+cluster=slurm", "+exp=groupdiff16", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "group_size: 16" in out.stdout and "kind: slurm" in out.stdout and "task: train" in out.stdout


def test_unknown_key_is_rejected_before_anything_runs(tmp_path: Path) -> None:
    out = run_launch("+cluster=local", "+exp=demo", "train.lr_warmup=10", cwd=tmp_path)
    assert out.returncode != 0
    assert "Key 'lr_warmup' is not in struct" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_config_exits_with_a_readable_message(tmp_path: Path) -> None:
    out = run_launch("+cluster=local", "+exp=demo", "train.global_batch=30", cwd=tmp_path)
    assert out.returncode == 2
    assert "rejected, nothing was submitted" in out.stderr and "train.global_batch=30" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs" / "demo" / "submitit").exists()


def test_no_cluster_chosen(tmp_path: Path) -> None:
    out = run_launch("+exp=demo", cwd=tmp_path)
    assert out.returncode == 2 and "+cluster=local" in out.stderr


def test_sampling_needs_an_existing_checkpoint(tmp_path: Path) -> None:
    cfg = compose_cfg("+cluster=local", "+exp=demo", "task=sample", f"run.root={tmp_path}")
    with pytest.raises(LaunchError, match=f"sample.ckpt={tmp_path}/demo/ema.pt does not exist"):
        validate(cfg)


def test_evaluate_needs_a_reference(tmp_path: Path) -> None:
    ckpt = tmp_path / "ema.pt"
    ckpt.write_bytes(b"")
    cfg = compose_cfg("+cluster=local", "+exp=demo", "task=evaluate", f"sample.ckpt={ckpt}")
    with pytest.raises(LaunchError, match=r"metrics.reference="):
        validate(cfg)


def test_unknown_task() -> None:
    with pytest.raises(LaunchError, match="task='fit' is not one of train, sample, evaluate"):
        validate(compose_cfg("+cluster=local", "+exp=demo", "task=fit"))


def test_demo_without_groups_is_valid() -> None:
    cfg = compose_cfg("+cluster=local", "+exp=demo", "diffusion=plain", "launcher.check_data=false")
    assert (cfg.diffusion.mode, cfg.diffusion.group_size) == ("none", 1)
    assert validate(cfg) == []


def _checkpoint(run_dir: Path, step: int, world: int, **train: object) -> None:
    """A checkpoint's meta.json and config.yaml (what the launcher reads), as the trainer writes them."""
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": step, "world_size": world}))
    settings = {"zero_stage": 2, "precision": "fp32", "micro_batch": 32, "global_batch": 64, **train}
    (ckpt / "config.yaml").write_text(OmegaConf.to_yaml({"train": settings}))
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")


def _demo_on_one_rank(tmp_path: Path) -> list[str]:
    return ["+cluster=local", "+exp=demo", f"run.root={tmp_path}", "train.micro_batch=32"]


def test_a_world_size_change_the_checkpoint_cannot_take_is_refused_at_launch(tmp_path: Path) -> None:
    """Fails before the fix: relaunching a 2-process run on 1 process was refused only by the job, after the queue
    wait. Step 6 of 2 ranks (1 micro-batch per step) is inside a 10-micro-batch block of the demo's batch plan."""
    _checkpoint(tmp_path / "demo", 6, 2)
    msg = _rejection(*_demo_on_one_rank(tmp_path))
    assert "resumes" in msg and "step_00000006: checkpoint at step 6 was written by 2 processes, this run has 1" in msg
    assert "step 6 is inside a block of the batch plan" in msg and "(1 processes = cluster.nodes=1" in msg


def test_a_world_size_change_the_checkpoint_can_take_is_announced(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "demo", 10, 2)
    cfg = compose_cfg(*_demo_on_one_rank(tmp_path))
    with open_dict(cfg):
        cfg.launcher.check_data = False
    warnings = validate(cfg)
    assert any("re-split over 1 ranks (optimizer state exact)" in w for w in warnings), warnings
    _checkpoint(tmp_path / "z3" / "demo", 10, 2, zero_stage=3)
    msg = _rejection(*_demo_on_one_rank(tmp_path / "z3"), "train.zero_stage=3")
    assert "train.zero_stage=3 train.precision=fp32 keeps optimizer state in a layout" in msg


def test_init_from_is_checked_at_launch(tmp_path: Path) -> None:
    """train.init_from: a missing file and a file of another model size are refused before submission, naming the
    file and the keys; a fitting one passes; once the run has a checkpoint of its own the file is not read."""
    import torch

    from gd.models import build_model

    base = [*_demo_on_one_rank(tmp_path)]
    missing = tmp_path / "absent.pt"
    assert f"train.init_from={missing}: no such file" in _rejection(*base, f"train.init_from={missing}")
    cfg = compose_cfg(*base)
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if v is not None}
    small = build_model(kwargs.pop("name"), **{**kwargs, "hidden_size": 64, "num_heads": 4, "sample_embed": "none"})
    torch.save(small.state_dict(), tmp_path / "small.pt")
    msg = _rejection(*base, f"train.init_from={tmp_path / 'small.pt'}")
    assert "does not fit this run's model" in msg and "x_embedder.proj.weight: file (64," in msg
    fits = build_model(kwargs.pop("name", cfg.model.name), **{**kwargs, "sample_embed": "none"})
    torch.save(fits.state_dict(), tmp_path / "fits.pt")
    cfg = compose_cfg(*base, f"train.init_from={tmp_path / 'fits.pt'}")
    with open_dict(cfg):
        cfg.launcher.check_data = False
    assert validate(cfg) == []
    _checkpoint(tmp_path / "demo", 10, 1)
    cfg = compose_cfg(*base, f"train.init_from={tmp_path / 'small.pt'}")
    with open_dict(cfg):
        cfg.launcher.check_data = False
    assert any("has a checkpoint of its own and resumes it: train.init_from=" in w for w in validate(cfg))


@pytest.mark.parametrize("exp,objective,learn_sigma,steps,file", [
    ("finetune_sit_xl2_groupdiff4", "flow", False, 500_456, "SiT-XL-2-256.pt"),
    ("finetune_dit_xl2_groupdiff4", "ddpm", True, 500_456, "DiT-XL-2-256x256.pt"),
    ("finetune_repa_groupdiff4", "flow", False, 500_000, "repa-sit-xl-2-256.pt"),
])
def test_finetune_experiments_are_their_rows(exp: str, objective: str, learn_sigma: bool, steps: int,
                                             file: str) -> None:
    """Table 4's fine-tunes: 100 epochs = ceil(100 x 1,281,167 / 256) steps at batch 256 (the released one: 500K),
    GroupDiff-l with N=4 on the pretrained file's backbone."""
    cfg = compose_cfg("+cluster=slurm", f"+exp={exp}")
    assert steps in (500_000, -(-100 * 1_281_167 // 256))
    assert (cfg.train.steps, cfg.train.global_batch, cfg.diffusion.group_size) == (steps, 256, 4)
    assert (cfg.diffusion.get("objective") or "flow", cfg.model.learn_sigma) == (objective, learn_sigma)
    assert cfg.train.init_from == f"{cfg.run.root}/pretrained/{file}"


def test_dry_runs_and_refused_launches_write_nothing(tmp_path: Path) -> None:
    """Before: both left runs/<name>/hydra/launch.log behind (hydra makes its output folder before the task)."""
    ok = run_launch("+cluster=local", "+exp=demo", "launcher.dry_run=true", "launcher.check_data=false", cwd=tmp_path)
    assert ok.returncode == 0 and "nothing was submitted" in ok.stdout, ok.stderr[-2000:]
    refused = run_launch("+cluster=local", "+exp=demo", "train.micro_batch=7", cwd=tmp_path)
    assert refused.returncode == 2 and "rejected, nothing was submitted" in refused.stderr
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "metrics.jsonl").write_text("{}\n")  # a real run's folder stays as it was
    run_launch("+cluster=local", "+exp=demo", "launcher.dry_run=true", "launcher.check_data=false", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "runs" / "demo").iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("override,needle", [
    ("model.name=SiT-XXL/2", "model: model name 'SiT-XXL/2': expected 'SiT-<S|B|L|XL>/<2|4|8>'"),
    ("model.attn_backend=flash", "model: attn_backend='flash': expected one of ('sdpa', 'xformers', 'math')"),
])
def test_model_settings_are_checked_at_launch(override: str, needle: str) -> None:
    """Before: both passed the dry run and failed only when the job started."""
    assert needle in _rejection("+cluster=slurm", "+exp=groupdiff4", override)
