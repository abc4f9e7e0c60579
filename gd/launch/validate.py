"""Checks that run before anything is submitted: cluster shape, batch arithmetic, data reachability and validity,
credentials.

Every problem found is reported at once, each naming the offending value and what was expected, so a bad
config costs seconds at the terminal instead of a queue wait and a crash on the first step. Credentials are
refused wherever they appear in the config (gd.secrets scans every string value; a finding names the key, never
the value): a config is copied into launch.yaml, config.yaml, every checkpoint, the sbatch script and
submitit's pickles.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gd.distributed.layout import ParallelLayout
from gd.launch.errors import LaunchError
from gd.secrets import find_credentials, looks_like_credential, redact

TASKS = ("train", "sample", "evaluate")
CLUSTER_KINDS = ("local", "slurm")
NO_CREDENTIALS = ("credentials never go in configs (they would be written into launch.yaml, config.yaml, every "
                  "checkpoint and the job script); they come from the environment the job is submitted from or "
                  "~/.aws")


def tasks_per_node(cluster: DictConfig) -> int:
    """Processes per node: as configured, else one per GPU, else one."""
    if cluster.tasks_per_node is not None:
        return int(cluster.tasks_per_node)
    return int(cluster.gpus_per_node) or 1


def world_size(cluster: DictConfig) -> int:
    """Number of ranks the job will have."""
    return int(cluster.nodes) * tasks_per_node(cluster)


def is_url(path: str) -> bool:
    return "://" in str(path)


def validate(cfg: DictConfig) -> list[str]:
    """Raises LaunchError listing every problem in `cfg`; returns warnings that do not stop the launch."""
    problems: list[str] = []
    warnings: list[str] = []
    if cfg.task not in TASKS:
        problems.append(f"task={cfg.task!r} is not one of {', '.join(TASKS)}")
    problems += _check_cluster(cfg.cluster, warnings)
    found = find_credentials(cfg, names_checked_elsewhere=("cluster.env",))
    if found:
        problems.append("the config holds credentials: " + "; ".join(found) + f". {NO_CREDENTIALS}")
    if not problems and cfg.task in TASKS:
        problems += _check_model(cfg)
        problems += _check_objective(cfg)
    if not problems and cfg.task == "train":
        problems += _check_batch(cfg)
        if not problems:
            problems += _check_resume(cfg, warnings)
        if not problems:
            problems += _check_init_from(cfg, warnings)
        if cfg.launcher.check_data:
            problems += _check_data(cfg)

    elif not problems:
        problems += _check_sampling(cfg)
    return _reject(problems) or warnings


def _reject(problems: list[str]) -> list[str]:
    if problems:
        raise LaunchError("rejected, nothing was submitted:\n  - " + "\n  - ".join(problems))
    return []


def _check_cluster(cluster: DictConfig, warnings: list[str]) -> list[str]:
    problems = []
    if cluster.kind not in CLUSTER_KINDS:
        return [f"cluster.kind={cluster.kind!r} is not one of {', '.join(CLUSTER_KINDS)}"]
    for key in ("nodes", "cpus_per_task", "timeout_min"):
        if not isinstance(cluster[key], int) or cluster[key] < 1:
            problems.append(f"cluster.{key}={cluster[key]!r}: expected a positive integer")
    if not isinstance(cluster.gpus_per_node, int) or cluster.gpus_per_node < 0:
        problems.append(f"cluster.gpus_per_node={cluster.gpus_per_node!r}: expected an integer >= 0")
    tasks = cluster.tasks_per_node
    if tasks is not None and (not isinstance(tasks, int) or tasks < 1):
        problems.append(f"cluster.tasks_per_node={cluster.tasks_per_node!r}: expected a positive integer or null")
    if problems:
        return problems
    tasks = tasks_per_node(cluster)
    if cluster.gpus_per_node and tasks != cluster.gpus_per_node:
        problems.append(f"cluster.tasks_per_node={tasks} with cluster.gpus_per_node={cluster.gpus_per_node}: "
                        "expected one task per GPU (leave tasks_per_node null)")
    secrets = sorted(str(k) for k in (cluster.get("env") or {}) if looks_like_credential(k))
    if secrets:
        problems.append(f"cluster.env sets {', '.join(secrets)}: {NO_CREDENTIALS}")
    if cluster.kind == "local" and cluster.nodes != 1:
        problems.append(f"cluster.nodes={cluster.nodes}: +cluster=local runs on this machine only (nodes=1)")
    if cluster.kind == "slurm":
        if cluster.signal_delay_s >= cluster.timeout_min * 60:
            problems.append(f"cluster.signal_delay_s={cluster.signal_delay_s} must be shorter than the time limit "
                            f"(cluster.timeout_min={cluster.timeout_min} min)")
        if cluster.timeout_min <= 50:
            warnings.append(f"cluster.timeout_min={cluster.timeout_min} <= 50: submitit counts every USR2 "
                            f"(preemption too) as a timeout, so the job stops requeueing after "
                            f"cluster.max_requeues={cluster.max_requeues} of them")
        if cluster.mem_per_task_gb is not None and cluster.mem_per_task_gb <= 0:
            problems.append(f"cluster.mem_per_task_gb={cluster.mem_per_task_gb}: expected a positive number or null")
    return problems


def _check_batch(cfg: DictConfig) -> list[str]:
    """The batch plan's layout check and the engine's stage/precision check, exactly as the trainer runs them."""
    from gd.diffusion.plan import BatchPlan
    from gd.train.engine import deepspeed_config

    world = world_size(cfg.cluster)
    ranks = f"{world} processes = cluster.nodes={cfg.cluster.nodes} x {tasks_per_node(cfg.cluster)} tasks per node"
    try:
        plan = BatchPlan.from_config(cfg.diffusion, cfg.model, int(cfg.seed))
    except ValueError as err:
        return [f"diffusion: {err}"]
    if cfg.diffusion.mode == "none" and cfg.diffusion.group_size != 1:
        return [f"diffusion.group_size={cfg.diffusion.group_size} with diffusion.mode=none: plain training has "
                "group_size 1"]
    try:
        layout = plan.layout(cfg.train, world, int(cfg.model.max_group_size))
        deepspeed_config(cfg.train, layout)
    except ValueError as err:
        lines = [line.strip() for line in str(err).splitlines()[1:]] or [str(err)]
        return [f"{line} ({ranks})" if "processes" in line else line for line in lines]
    return _layout_problems(cfg.model, ParallelLayout(world, layout.group_parallel, plan.train_group_size,
                                                      impl=cfg.train.get("group_parallel_impl") or "ulysses",
                                                      section="train"))


def _layout_problems(model: DictConfig, layout: ParallelLayout) -> list[str]:
    """``layout``'s problems with the model's attention heads filled in (Ulysses needs P | heads); a heads problem
    names the model and the keys to change."""
    from gd.models.sit import size_defaults

    if layout.group_parallel != 1 and isinstance(layout.group_parallel, int):
        heads = int(model.get("num_heads") or size_defaults(str(model.name))["num_heads"])
        layout = dataclasses.replace(layout, heads=heads)
    s = layout.section
    return [f"{line} (model {model.name}; {s}.group_parallel={layout.group_parallel}, {s}.group_parallel_impl)"
            if line.startswith("num_heads=") else line for line in layout.problems()]


def _check_resume(cfg: DictConfig, warnings: list[str]) -> list[str]:
    """Launching a run name again resumes its latest checkpoint: a world-size change it cannot take (gd.train.reshard)
    is refused here, before the queue wait, instead of by the job. Nothing is read from the run dir before the
    trainer's own trust check (:func:`gd.train.checkpoint.check_trusted`, through ``CheckpointManager.latest``)."""
    latest = Path(str(cfg.run.dir)) / "checkpoints" / "latest"
    if not latest.is_file():
        return []
    from gd.diffusion.plan import BatchPlan
    from gd.train.checkpoint import CheckpointManager, CheckpointMismatchError, UntrustedCheckpointError
    from gd.train.reshard import checkpoint_settings, describe, reshard_problems

    try:
        ckpt = CheckpointManager(str(cfg.run.dir), keep_last=1, rank=0, world_size=1).latest()
    except UntrustedCheckpointError as err:
        return [str(err)]
    except CheckpointMismatchError:
        return []  # not a complete checkpoint of this trainer: the job reports it, naming the file
    try:
        saved = checkpoint_settings(ckpt)
    except (OSError, KeyError, ValueError, TypeError):
        return []  # not a complete checkpoint of this trainer: the job reports it, naming the file
    world = world_size(cfg.cluster)
    plan = BatchPlan.from_config(cfg.diffusion, cfg.model, int(cfg.seed))
    accum = plan.layout(cfg.train, world, int(cfg.model.max_group_size)).grad_accum
    plan = BatchPlan.from_config(cfg.diffusion, cfg.model, int(cfg.seed), accum)
    problems = reshard_problems(saved, world, cfg.train, plan.block if plan.mix == "micro" else None, accum)
    ranks = f"{world} processes = cluster.nodes={cfg.cluster.nodes} x {tasks_per_node(cfg.cluster)} tasks per node"
    if problems:
        return [f"run {cfg.run.name} resumes {ckpt}: {describe(saved, world, problems)} ({ranks})"]
    if saved["world_size"] != world:
        warnings.append(f"run {cfg.run.name} resumes {ckpt}: {describe(saved, world, [])}")
    return []


def _check_model(cfg: DictConfig) -> list[str]:
    """model.*: the model builds (name, sizes, backend, sample embedding, ...), on the meta device (no memory)."""
    import torch

    from gd.models import build_model
    from gd.train.trainer import model_kwargs

    kwargs = model_kwargs(cfg.model)
    try:
        with torch.device("meta"):
            build_model(kwargs.pop("name"), **kwargs)
    except (ValueError, TypeError) as err:
        return [f"model: {err}"]
    return []


def _check_init_from(cfg: DictConfig, warnings: list[str]) -> list[str]:
    """train.init_from: the file exists, passes the trust rule and fits the model's shapes (read memory-mapped, on
    the CPU), unless the run has a checkpoint of its own, which it resumes instead."""
    path = OmegaConf.select(cfg, "train.init_from")
    if not path:
        return []
    if (Path(str(cfg.run.dir)) / "checkpoints" / "latest").is_file():
        warnings.append(f"run {cfg.run.name} has a checkpoint of its own and resumes it: train.init_from={path} is "
                        "ignored")
        return []
    from gd.diffusion.objectives import build_objective
    from gd.models.checkpoints import CheckpointError
    from gd.train.init_from import read_pretrained
    from gd.train.trainer import model_kwargs

    t = cfg.train
    try:
        read_pretrained(path, model_kwargs(cfg.model), build_objective(cfg.diffusion, cfg.model).name,
                        init_weights=str(t.get("init_weights", "model")), init_ema=str(t.get("init_ema", "file")),
                        init_time=str(t.get("init_time", "auto")))
    except (CheckpointError, ValueError, OSError) as err:
        return [str(err)]
    return []


def _check_objective(cfg: DictConfig) -> list[str]:
    """The diffusion objective (flow | ddpm), its options and the model's time window in its units; for sampling
    tasks also that sample.method is one of its samplers."""
    from gd.diffusion.objectives import build_objective

    try:
        objective = build_objective(cfg.diffusion, cfg.model)
        if cfg.task != "train":
            objective.sampler(cfg.sample)
    except ValueError as err:
        return [str(err)]
    return []


def _check_sampling(cfg: DictConfig) -> list[str]:
    """task=sample|evaluate: the checkpoint to sample from (and for evaluate, a FID reference) must exist."""
    problems = []
    ckpt = OmegaConf.select(cfg, "sample.ckpt")
    if not ckpt:
        problems.append(f"task={cfg.task} needs sample.ckpt=<run.dir>/ema.pt (or an official SiT checkpoint)")
    elif not is_url(ckpt) and not Path(ckpt).is_file():
        problems.append(f"sample.ckpt={ckpt} does not exist: train the run first (task=train) or point "
                        "sample.ckpt at an exported ema.pt")
    world = world_size(cfg.cluster)
    layout = ParallelLayout(world, cfg.sample.get("group_parallel") or 1, int(cfg.sample.group_size),
                            impl=cfg.sample.get("group_parallel_impl") or "ulysses", section="sample")
    problems += [line if line.startswith(("num_heads=", "sample.group_parallel_impl")) else
                 f"{line} ({world} processes)" for line in _layout_problems(cfg.model, layout)]
    if cfg.task == "evaluate" and not OmegaConf.select(cfg, "metrics.reference"):
        problems.append("task=evaluate needs a FID reference: metrics.reference=<image folder | .npz | "
                        "cleanfid:<name>:<res>:<split>> (other metric settings: conf/metrics/default.yaml)")
    return problems


_ROOT_REQUIRED = ("data.root is required: the shard set tools/build_shards.py wrote (data.root=s3://bucket/prefix or "
                  "a local folder; docs/data.md)")


def _check_data(cfg: DictConfig) -> list[str]:
    if OmegaConf.is_missing(cfg.data, "root"):
        return [_ROOT_REQUIRED]
    root = str(cfg.data.root)
    parts = ["plain", "group"]  # the trainer reads both streams (check_dataset), whatever the mode
    build = ("build it with tools/build_shards.py (see the experiment file's header), or set data.root=... "
             "(or launcher.check_data=false to skip this check)")
    if is_url(root):
        if not root.startswith("s3://"):
            return [f"data.root={root}: expected a local directory or s3://bucket/prefix"]
        for part in parts:
            error = _s3_missing(f"{root.rstrip('/')}/{part}/index.json")
            if error:
                return [f"data.root={root}: {error}; {build}"]
        if _s3_missing(f"{root.rstrip('/')}/meta.json"):
            return []
    else:
        path = Path(root)
        if not path.is_dir():
            return [f"data.root={root} does not exist; {build}"]
        missing = [f"{part}/index.json" for part in parts if not (path / part / "index.json").is_file()]
        if missing:
            return [f"data.root={root} has no {' or '.join(missing)} (not a complete shard set); {build}"]
        if not (path / "meta.json").is_file():
            return []
    from gd.data.validate_shards import ShardSetError, validate_shard_set

    try:  # the same checks the trainer's loaders run: names inside the folder, our columns, sane counts
        meta = validate_shard_set(root, streams=tuple(parts))
    except ShardSetError as err:
        return [f"data.root={root}: {err}"]
    return _check_meta(cfg, meta)


def _check_meta(cfg: DictConfig, meta: dict) -> list[str]:
    """The shards' latent shape, class count and largest group (meta.json) against the model and N."""
    root, model, n = cfg.data.root, cfg.model, cfg.diffusion.group_size
    problems = []
    shape = meta.get("latent_shape")
    want = [model.in_channels, model.input_size, model.input_size]
    if shape is not None and list(shape) != want:
        problems.append(f"data.root={root} holds latents of shape {list(shape)} but the model expects "
                        f"[model.in_channels, model.input_size, model.input_size] = {want}")
    classes = meta.get("num_classes")
    if classes is not None and classes != model.num_classes:
        problems.append(f"data.root={root} has num_classes={classes} but model.num_classes={model.num_classes}")
    n_max = meta.get("n_max")
    from gd.diffusion.plan import BatchPlan

    if n_max is not None and BatchPlan.from_config(cfg.diffusion).train_group_size > n_max:
        problems.append(f"diffusion.group_size={n} but the shards in data.root={root} serve groups of at most "
                        f"n_max={n_max}: rebuild them with n_max>={n}")
    return problems


def _s3_missing(url: str) -> str | None:
    """None when the object at `url` is reachable (S3_ENDPOINT_URL honoured), else why not (credentials in the
    endpoint URL redacted)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = url[len("s3://"):].partition("/")
    client = boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
                          config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))
    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        return f"{url} not found ({err.response.get('Error', {}).get('Code', err)})"
    except BotoCoreError as err:
        return redact(f"{url} not reachable ({err}; S3_ENDPOINT_URL={os.environ.get('S3_ENDPOINT_URL')!r})")
    return None
