"""Checks that run before anything is submitted: cluster shape, batch arithmetic, data reachability and validity,
credentials.

Every problem found is reported at once, each naming the offending value and what was expected, so a bad
config costs seconds at the terminal instead of a queue wait and a crash on the first step. Credentials are
refused wherever they appear in the config (gd.secrets scans every string value; a finding names the key, never
the value): a config is copied into launch.yaml, config.yaml, every checkpoint, the sbatch script and
submitit's pickles.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gd.launch.errors import LaunchError
from gd.secrets import find_credentials, looks_like_credential, redact

TASKS = ("train", "sample", "evaluate")
CLUSTER_KINDS = ("local", "slurm")
GROUP_MODES = ("l", "f", "none")
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
    if not problems and cfg.task == "train":
        problems += _check_batch(cfg)
        if cfg.launcher.check_data:
            problems += _check_data(cfg)
    elif not problems:
        problems += _check_sampling(cfg)
    if problems:
        raise LaunchError("rejected, nothing was submitted:\n  - " + "\n  - ".join(problems))
    return warnings


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
    train, diffusion, cluster = cfg.train, cfg.diffusion, cfg.cluster
    batch, micro, n = train.global_batch, train.micro_batch, diffusion.group_size
    world = world_size(cluster)
    ranks = f"{world} processes (cluster.nodes={cluster.nodes} x {tasks_per_node(cluster)} tasks per node)"
    problems = []
    for key, value in (("train.global_batch", batch), ("train.micro_batch", micro), ("diffusion.group_size", n)):
        if not isinstance(value, int) or value < 1:
            problems.append(f"{key}={value!r}: expected a positive integer")
    if diffusion.mode not in GROUP_MODES:
        problems.append(f"diffusion.mode={diffusion.mode!r} is not one of {', '.join(GROUP_MODES)}")
    if problems:
        return problems
    if diffusion.mode == "none" and n != 1:
        problems.append(f"diffusion.group_size={n} with diffusion.mode=none: plain training has group_size 1")
    if n > cfg.model.max_group_size:
        problems.append(f"diffusion.group_size={n} exceeds model.max_group_size={cfg.model.max_group_size} "
                        "(the sample embedding has one row per group member)")
    if batch % n:
        problems.append(f"train.global_batch={batch} is not divisible by diffusion.group_size={n}: "
                        "a group step needs whole groups")
    elif world > batch // n:
        problems.append(f"{ranks} but train.global_batch={batch} holds only {batch // n} groups of "
                        f"diffusion.group_size={n}: use at most {batch // n} processes or a larger batch")
    if micro % n:
        problems.append(f"train.micro_batch={micro} is not divisible by diffusion.group_size={n}: "
                        "each process needs whole groups in every micro-batch")
    if batch % (world * micro):
        problems.append(f"train.global_batch={batch} is not a multiple of {ranks} x train.micro_batch={micro}"
                        f" = {world * micro} (gradient accumulation must be a whole number of micro-batches)")
    if not problems:
        from gd.train.engine import BatchLayout, deepspeed_config

        try:  # ZeRO stage, precision and their combination, as the trainer will check them
            deepspeed_config(cfg.train, BatchLayout(batch, micro, world, batch // (world * micro)))
        except ValueError as err:
            problems.append(str(err))
    return problems


def _check_sampling(cfg: DictConfig) -> list[str]:
    """task=sample|evaluate: the checkpoint to sample from (and for evaluate, a FID reference) must exist."""
    problems = []
    ckpt = OmegaConf.select(cfg, "sample.ckpt")
    if not ckpt:
        problems.append(f"task={cfg.task} needs sample.ckpt=<run.dir>/ema.pt (or an official SiT checkpoint)")
    elif not is_url(ckpt) and not Path(ckpt).is_file():
        problems.append(f"sample.ckpt={ckpt} does not exist: train the run first (task=train) or point "
                        "sample.ckpt at an exported ema.pt")
    if cfg.task == "evaluate" and not OmegaConf.select(cfg, "metrics.reference"):
        problems.append("task=evaluate needs a FID reference: +metrics.reference=<image folder | .npz | "
                        "cleanfid:<name>:<res>:<split>> (other metric settings: conf/evaluate.yaml, as +metrics.*)")
    return problems


def _check_data(cfg: DictConfig) -> list[str]:
    root = str(cfg.data.root)
    parts = ["plain"] + (["group"] if cfg.diffusion.mode != "none" else [])
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
    if n_max is not None and cfg.diffusion.mode != "none" and n > n_max:
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
