"""Does group attention help? The paper's Table 1 ablation at a scale that runs here: ``python -m gd.bench.method``.

    python -m gd.bench.method                                   # CPU profile (conf/bench/method.yaml)
    python -m gd.bench.method --config-name bench/method_gpu    # one GPU (conf/bench/method_gpu.yaml)
    python -m gd.bench.method 'bench.seeds=[0]' 'bench.configs=[plain,sim4]'   # a subset
    python -m gd.bench.method bench.report_only=true            # tables from what is scored so far

For each configuration of ``bench.configs`` (plain SiT; GroupDiff-l with random, class or similarity grouping at
group size N) and each seed of ``bench.seeds``, one run is trained with ``python -m gd.train`` and scored with
``python -m gd.evaluate``: the commands a researcher types (printed, and kept in the run folder), not a copy of
the trainer. Every run sees the same images (steps x batch), the same null-label rate (plain SiT drops 10% of its
labels per image; GroupDiff-l makes 10% of its micro-batches null-label group micro-batches), the same model,
optimiser and sampler; a seed fixes the initial weights and the order of the conditional images in every
configuration, so differences to plain SiT are also reported paired by seed.

Before the runs: the FID reference (gd.demo's Fashion-MNIST test split) and one shard set per grouping of
``bench.groupings`` (tools/build_shards.py), built once into ``bench.shards_dir`` under a name that hashes its
settings (embeddings are computed once per setting, however often the benchmark runs); then, for every grouping,
the neighbour-count histogram, the fallback rate and the class purity of the partners a group gets (how often they
share the anchor's class), at its own tau and at each tau of ``bench.tau_sweep`` (grouping.json).

Resumable: a run with an eval.json is read back, not redone; a killed run resumes from its checkpoint and its
finished sample chunks; a run folder made with other settings is refused (delete it or change ``bench.name``).
``bench.report_only=true`` writes the outputs from the runs already scored, training nothing (a bench cut short).
``bench.previous=[.../results.json]`` counts the runs an earlier bench scored (another machine, a run folder since
lost) as done, if they were scored with the same settings: a bench can be completed over several sessions.
``bench.checkpoints_from=<another bench.dir>`` trains nothing: it scores that bench's checkpoints with this
bench's sampler and metrics (a CFG scale, a step count), refusing a run trained with other settings.
Output in ``bench.dir``: results.json (every run and the summary per configuration), table.md, method.png (FID vs
N, FID vs S_cross), grouping.json.

``bench.mode=finetune`` (``bench.finetune``; plan and measured step times in docs/bench/finetune.md): one plain SiT,
the base, is trained once per settings into ``bench.shards_dir/base/<hash>`` and scored (its FID and loss curve in
results.json); every configuration then fine-tunes the base's ema.pt (``train.init_from``) for the same images, with
held-out probes (gd.train.probes) on shards of the Fashion-MNIST test split every ``train.probe_every`` steps; each
GroupDiff run is scored twice from the same checkpoint and sample seed, grouped and alone (``sample.group_size=1``),
the within-checkpoint FID. Output in ``bench.finetune.dir``; selectivity.png plots own-member share vs 1/N per step.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from gd.io import atomic_path, atomic_write_text

REPO = Path(__file__).resolve().parents[2]
DIFFUSIONS = ("plain", "groupdiff_l", "groupdiff_f")


# ---- overrides --------------------------------------------------------------------------------------------------
def override_value(value: Any) -> str:
    """A value in hydra's override grammar: null, booleans, numbers, quoted strings, [lists], {dicts}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if text and all(c.isalnum() or c in "_-./:" for c in text) and text not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def flatten(tree: Any, prefix: str = "") -> list[str]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``["a.b=1", "c=[1,2]"]``: nested settings as dotted overrides."""
    tree = OmegaConf.to_container(tree, resolve=True) if isinstance(tree, DictConfig) else tree
    out = []
    for key, value in (tree or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += flatten(value, name + ".")
        else:
            out.append(f"{name}={override_value(value)}")
    return out


def settings_key(name: str, overrides: list[str]) -> str:
    return f"{name}-{hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:10]}"


# ---- plan -------------------------------------------------------------------------------------------------------
def check_bench(cfg: DictConfig) -> None:
    """Every configuration names a known diffusion and grouping, and its N fits the grouping's shards."""
    b = cfg.bench
    problems = []
    if not b.seeds:
        problems.append("bench.seeds is empty")
    if not 0.0 < float(b.null_rate) < 1.0:
        problems.append(f"bench.null_rate={b.null_rate}: expected a share of null-label images in (0, 1)")
    for name in b.configs:
        c = b.variants.get(name)
        if c is None:
            problems.append(f"bench.configs names {name!r}, which bench.variants does not define "
                            f"(known: {sorted(b.variants)})")
            continue
        if c.diffusion not in DIFFUSIONS:
            problems.append(f"bench.variants.{name}.diffusion={c.diffusion!r}: expected one of {DIFFUSIONS}")
        g = b.groupings.get(c.grouping)
        if g is None:
            problems.append(f"bench.variants.{name}.grouping={c.grouping!r}: not in bench.groupings "
                            f"({sorted(b.groupings)})")
        elif int(c.group_size) > int(g.get("n_max", 4)):
            problems.append(f"bench.variants.{name}.group_size={c.group_size} exceeds the n_max={g.get('n_max', 4)} "
                            f"of grouping {c.grouping!r}")
        if (c.diffusion == "plain") != (int(c.group_size) == 1):
            problems.append(f"bench.variants.{name}: plain SiT has group_size 1 and GroupDiff group_size > 1, got "
                            f"diffusion={c.diffusion} group_size={c.group_size}")
    if b.get("mode") == "finetune":
        base = b.variants.get(b.get("baseline"))
        if base is None or base.diffusion != "plain":
            problems.append(f"bench.baseline={b.get('baseline')!r}: a fine-tune bench needs a plain SiT baseline "
                            "(the base is that configuration trained first)")
        if int(b.finetune.probe_pool) < int(b.run.train.get("probe_images", 64)):
            problems.append(f"bench.finetune.probe_pool={b.finetune.probe_pool}: expected at least "
                            f"train.probe_images={b.run.train.get('probe_images', 64)} test images")
    if problems:
        raise ValueError("invalid benchmark config:\n  " + "\n  ".join(problems))


def run_overrides(cfg: DictConfig, name: str, seed: int, shards: Path) -> list[str]:
    """The hydra overrides of one run (training and evaluation share them); ``bench.run`` is added or overridden
    (``++``), so it may set keys the root config lacks (model.hidden_size, ...)."""
    b = cfg.bench
    c = b.variants[name]
    n = int(c.group_size)
    rate = float(b.null_rate)
    # The same share of null-label images: plain SiT drops labels per image, GroupDiff-l nulls whole group
    # micro-batches (p_group) and never drops a conditional label (released recipe).
    null = ([f"diffusion.class_dropout={rate}"] if c.diffusion == "plain" else
            [f"diffusion.p_group={rate}", "diffusion.class_dropout=0.0"])
    out = [f"diffusion={c.diffusion}", *null, *(f"++{o}" for o in flatten(b.run)),
           f"diffusion.group_size={n}", f"model.max_group_size={n}", f"seed={int(seed)}",
           f"sample.batch_groups={max(1, int(b.sample_batch) // n)}",
           f"data.root={shards}", f"run.root={Path(b.dir) / 'runs'}", f"run.name={name}_s{int(seed)}"]
    if b.get("mode") == "finetune":
        out += finetune_overrides(cfg, c.diffusion)
    return out


def finetune_overrides(cfg: DictConfig, diffusion: str) -> list[str]:
    """What a fine-tune run adds: the base's ema.pt as ``train.init_from`` and the held-out probe shards. Plain SiT
    (the base and its continuation) has no sample embedding, as the official SiT files; a GroupDiff fine-tune adds
    its own (N(0, 0.02), gd.train.init_from)."""
    out = [f"++train.init_from={base_dir(cfg) / 'ema.pt'}", f"++train.probe_data={probe_root(cfg)}"]
    return out + (["++model.sample_embed=none"] if diffusion == "plain" else [])


# ---- subprocesses -----------------------------------------------------------------------------------------------
def _python(cfg: DictConfig) -> str:
    return str(cfg.bench.get("python") or sys.executable)


def run_logged(cmd: list[str], log: Path, threads: int) -> float:
    """Run ``cmd`` from the repository root with its output in ``log``; seconds taken. A failure raises with the
    log's tail."""
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}  # every run is its own one-process job
    env = {**env, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"exit code {proc.returncode}: {' '.join(cmd)}\n(log {log})\n{tail}")
    return time.perf_counter() - start


def _load() -> float:
    return round(os.getloadavg()[0], 2)


# ---- data -------------------------------------------------------------------------------------------------------
def build_reference(cfg: DictConfig) -> Path:
    b = cfg.bench
    out = Path(b.shards_dir) / f"reference_test_{int(b.ref_images)}.npz"
    if not out.is_file():
        from gd.demo import write_reference

        write_reference(out, int(b.ref_images))
    return out


def grouping_overrides(cfg: DictConfig, grouping: str) -> list[str]:
    b = cfg.bench
    return [f"limit={int(b.train_images)}", *flatten(b.build), *flatten(b.groupings[grouping]), "progress=false"]


def kind(cfg: DictConfig, name: str) -> str:
    """plain | similarity | the grouping's name (random, class): how a configuration groups its images."""
    c = cfg.bench.variants[name]
    if c.diffusion == "plain":
        return "plain"
    return "similarity" if c.grouping == cfg.bench.similarity else str(c.grouping)


def grouping_root(cfg: DictConfig, grouping: str) -> Path:
    """Where the shard set of ``grouping`` is (or will be) built: its runs' data.root."""
    return Path(cfg.bench.shards_dir) / settings_key(grouping, grouping_overrides(cfg, grouping)) / "shards"


def build_grouping(cfg: DictConfig, grouping: str) -> Path:
    """The shard set of ``grouping`` (built once per settings); returns its root (data.root)."""
    return _build_shards(cfg, grouping, grouping_overrides(cfg, grouping), grouping_root(cfg, grouping))


def _build_shards(cfg: DictConfig, what: str, overrides: list[str], out: Path) -> Path:
    b = cfg.bench
    base = out.parent
    if (out / "meta.json").is_file():
        return out
    cmd = [_python(cfg), "tools/build_shards.py", f"out={out}", f"work_dir={base / 'work'}", *overrides]
    print(f"[shards] {what}: {' '.join(cmd[1:])}", flush=True)
    secs = run_logged(cmd, base / "build.log", int(b.threads) * int(b.parallel))
    print(f"[shards] {what}: built in {secs:.0f} s (load {_load()})", flush=True)
    return out


def probe_overrides(cfg: DictConfig) -> list[str]:
    """tools/build_shards.py settings of the held-out probe set: the first ``bench.finetune.probe_pool`` images of
    the Fashion-MNIST test split (never trained on), plain records only (no grouping is drawn from it)."""
    b = cfg.bench
    return [f"limit={int(b.finetune.probe_pool)}", *flatten(b.build), "sources.fashion_mnist.split=test",
            "embedder=random", "tau=-1.0", "n_max=4", "progress=false"]


def probe_root(cfg: DictConfig) -> Path:
    """Where the probe shards are (or will be) built: every fine-tune's train.probe_data."""
    return Path(cfg.bench.shards_dir) / settings_key("probe_test", probe_overrides(cfg)) / "shards"


def _work_arrays(work: Path) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of a finished build's work dir, in row order (gd.data.build's chunk files)."""
    chunks = sorted((work / "embed").glob("chunk-*.emb.npy"))
    if not chunks:
        raise FileNotFoundError(f"no embeddings under {work / 'embed'}: the shard build did not finish")
    emb = np.concatenate([np.load(p) for p in chunks])
    labels = np.concatenate([np.load(work / "read" / p.name.replace(".emb.", ".labels.")) for p in chunks])
    return emb, labels


def grouping_report(emb: np.ndarray, labels: np.ndarray, k: int, taus: list[float],
                    group_sizes: list[int]) -> list[dict]:
    """Per tau: the histogram of how many of the K nearest neighbours pass, the fallback rate and the expected class
    purity of the partners per group size (gd.data.grouping's retrieval and draw rules)."""
    from gd.data import grouping

    index = grouping.build_index(emb, grouping.index_plan(len(emb), emb.shape[1], "flat", use_gpu=False))
    nbr, sim = grouping.search_neighbours(index, emb, np.arange(len(emb)), k)
    rows = []
    for tau in taus:
        order_n, order_s, count = grouping.order_candidates(nbr, sim, labels, labels, float(tau), "topk")
        same = labels[np.maximum(order_n, 0)] == labels[:, None]
        stats = grouping.group_stats(count, order_s, k, max(group_sizes), float(tau))
        row = {"tau": float(tau), "neighbour_count_hist": stats["neighbour_count_hist"],
               "mean_count": stats["mean_count"], "mean_similarity_passing": stats["mean_similarity_passing"]}
        for n in group_sizes:
            row[f"fallback_rate_n{n}"] = float((count < n - 1).mean())
            row[f"class_purity_n{n}"] = float(grouping.partner_class_purity(same, count, n).mean())
        rows.append(row)
    return rows


# ---- fine-tune mode: the base --------------------------------------------------------------------------------------
MODES = ("scratch", "finetune")


def resolve_mode(cfg: DictConfig) -> DictConfig:
    """``cfg`` with interpolations resolved and, for ``bench.mode=finetune``, the fine-tune bench in place: its
    folder, configurations and null-label rate, ``bench.run`` with ``bench.finetune.run`` on top (every fine-tune)
    and ``bench.finetune.base.run`` as ``bench.run`` with the base's settings on top. Resolving first keeps
    ``${bench.*}`` references at the values the user gave."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    b = tree["bench"]
    if b.get("resolved"):                          # once: a second merge would put the fine-tune's run in the base's
        return OmegaConf.create(tree)
    b["resolved"] = True
    mode = b.get("mode") or "scratch"
    if mode not in MODES:
        raise ValueError(f"bench.mode={mode!r}: expected one of {MODES}")
    b["mode"] = mode
    if mode == "finetune":
        ft = b["finetune"]
        run = OmegaConf.create(b["run"])
        ft["base"]["run"] = OmegaConf.to_container(OmegaConf.merge(run, ft["base"].get("run") or {}))
        b["run"] = OmegaConf.to_container(OmegaConf.merge(run, ft.get("run") or {}))
        b["dir"], b["configs"], b["null_rate"], b["seeds"] = ft["dir"], ft["configs"], ft["null_rate"], ft["seeds"]
    return OmegaConf.create(tree)


def base_overrides(cfg: DictConfig) -> list[str]:
    """The hydra overrides of the base (plain SiT, no sample embedding, ``bench.finetune.base``), on the plain
    configuration's shards; its run folder is named by a hash of its training settings, so a base is built once
    per settings and a changed setting builds another."""
    b = cfg.bench
    base = b.finetune.base
    shards = grouping_root(cfg, str(b.variants[b.baseline].grouping))
    train = ["diffusion=plain", f"diffusion.class_dropout={float(base.null_rate)}",
             *(f"++{o}" for o in flatten(base.run)), "diffusion.group_size=1", "model.max_group_size=1",
             "++model.sample_embed=none", f"seed={int(base.seed)}", f"data.root={shards}"]
    key = settings_key("base", training_overrides(train))
    return [*train, f"sample.batch_groups={int(b.sample_batch)}", f"run.root={Path(b.shards_dir) / 'base'}",
            f"run.name={key}"]


def base_dir(cfg: DictConfig) -> Path:
    """The base's run folder (its ema.pt is every fine-tune's train.init_from)."""
    name = next(o for o in base_overrides(cfg) if o.startswith("run.name=")).split("=", 1)[1]
    return Path(cfg.bench.shards_dir) / "base" / name


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_base(cfg: DictConfig, reference: Path) -> dict[str, Any]:
    """Train the base once (``python -m gd.train``: a killed build resumes from its checkpoint) and score it with
    this bench's sampler and metrics (one eval file per scoring setting); its FID, loss curve and sha256."""
    b = cfg.bench
    overrides = base_overrides(cfg)
    out = base_dir(cfg)
    scoring = [*(o for o in overrides if o.startswith(_SCORING_ONLY)), *flatten(b.metrics, "metrics."),
               f"ref={int(b.ref_images)}"]
    tag = hashlib.sha256(json.dumps(scoring).encode()).hexdigest()[:10]
    eval_path = out / f"eval-{tag}.json"
    train_cmd = [_python(cfg), "-m", "gd.train", *overrides, "train.progress=false"]
    eval_cmd = [_python(cfg), "-m", "gd.evaluate", *overrides, f"ckpt={out / 'ema.pt'}",
                f"metrics.reference={reference}", f"metrics.reference_max_images={int(b.ref_images)}",
                f"metrics.out={eval_path}", f"sample.out={out / f'samples-{tag}'}",
                *flatten(b.metrics, "metrics."), "sample.progress=false"]
    timing_path = out / "bench_timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    threads = int(b.threads) * int(b.parallel)     # the base runs alone: every thread the parallel runs would use
    if not (out / "ema.pt").is_file():
        print(f"[base] {' '.join(train_cmd[1:])}", flush=True)
        load0 = _load()
        timing["train_s"] = timing.get("train_s", 0.0) + run_logged(train_cmd, out / "bench_train.log", threads)
        timing["train_load"] = [load0, _load()]
        atomic_write_text(timing_path, json.dumps(timing))
    atomic_write_text(out / "bench_base.json", json.dumps({"overrides": overrides, "train": train_cmd}, indent=1))
    if not eval_path.is_file():
        print(f"[base] {' '.join(eval_cmd[1:])}", flush=True)
        load0 = _load()
        timing[f"eval_s_{tag}"] = run_logged(eval_cmd, out / "bench_eval.log", threads)
        timing[f"eval_load_{tag}"] = [load0, _load()]
        atomic_write_text(timing_path, json.dumps(timing))
    ev = json.loads(eval_path.read_text())
    curve = [(int(r["step"]), float(r["loss"])) for r in _metric_records(out) if "loss" in r]
    row = {"dir": str(out), "fid": float(ev["fid"]), "precision": ev.get("precision"), "recall": ev.get("recall"),
           "num_images": ev["num_images"], "steps": curve[-1][0] if curve else None, "loss_curve": curve,
           "ema_sha256": sha256(out / "ema.pt"), "train_s": timing.get("train_s"),
           "eval_s": timing.get(f"eval_s_{tag}")}
    print(f"[base] FID {row['fid']:.2f} after {row['steps']} steps, last loss "
          f"{curve[-1][1] if curve else float('nan'):.4f} ({out})", flush=True)
    return row


# ---- runs -------------------------------------------------------------------------------------------------------
def _metric_records(run_dir: Path) -> list[dict[str, Any]]:
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _read_metrics(run_dir: Path) -> dict[str, Any]:
    """From the trainer's metrics.jsonl: the last S_cross, the median img/s, the last step, and the held-out probes
    (``probes``: one record of ``probe_*`` values per probed step, when the run had ``train.probe_every``)."""
    s_cross, ips, step, probes = None, [], 0, []
    for rec in _metric_records(run_dir):
        step = max(step, int(rec.get("step", 0)))
        if "s_cross" in rec:
            s_cross = float(rec["s_cross"])
        if "img_per_s" in rec:
            ips.append(float(rec["img_per_s"]))
        values = {k: v for k, v in rec.items() if k.startswith("probe_")}
        if values:
            probes.append({"step": int(rec["step"]), **values})
    out = {"s_cross": s_cross, "img_per_s": float(np.median(ips)) if ips else None, "steps": step}
    return {**out, "probes": probes} if probes else out


_SCORING_ONLY = ("sample.", "++sample.", "metrics.", "++metrics.", "run.root=")


def training_overrides(overrides: list[str]) -> list[str]:
    """The overrides of a run that decide its checkpoint: all but the sampler's, the metrics' and the run folder."""
    return [o for o in overrides if not o.startswith(_SCORING_ONLY)]


def trained_elsewhere(cfg: DictConfig, name: str, seed: int, overrides: list[str]) -> Path | None:
    """With ``bench.checkpoints_from`` (another bench's dir): that bench's run folder of (``name``, ``seed``), whose
    ema.pt this bench scores instead of training, so sampler settings (CFG scale, steps) are compared on the very
    same weights. Refused, naming the folder and the settings, when it is missing, unfinished or trained otherwise."""
    source = cfg.bench.get("checkpoints_from")
    if not source:
        return None
    src = Path(source) / "runs" / f"{name}_s{seed}"
    stamp, ema = src / "bench_run.json", src / "ema.pt"
    if not (stamp.is_file() and ema.is_file()):
        raise FileNotFoundError(f"bench.checkpoints_from={source}: {name} seed {seed} has no trained run there "
                                f"(expected {stamp} and {ema}); run that bench first or drop {name}/seed {seed}")
    have = training_overrides(json.loads(stamp.read_text())["overrides"])
    want = training_overrides(overrides)
    if have != want:
        changed = sorted(set(have) ^ set(want))
        raise ValueError(f"bench.checkpoints_from={source}: {src} was trained with other settings "
                         f"({', '.join(changed)}); only sample.* and metrics.* may differ")
    return src


def check_stamp(run_dir: Path, overrides: list[str]) -> None:
    """A run folder made with other overrides (a fine-tune of another base included) is refused, naming them."""
    stamp = run_dir / "bench_run.json"
    if stamp.is_file():
        have = json.loads(stamp.read_text())["overrides"]
        if have != overrides:
            changed = sorted(set(have) ^ set(overrides))
            raise ValueError(f"{run_dir} was made with other settings ({', '.join(changed)}): delete it or set "
                             "another bench.name")


def run_one(cfg: DictConfig, name: str, seed: int, shards: Path, reference: Path) -> dict[str, Any]:
    """Train and score configuration ``name`` at ``seed`` (skipped when its eval.json exists); with
    ``bench.checkpoints_from`` score that bench's checkpoint instead of training."""
    b = cfg.bench
    overrides = run_overrides(cfg, name, seed, shards)
    run_dir = Path(b.dir) / "runs" / f"{name}_s{seed}"
    source = trained_elsewhere(cfg, name, seed, overrides)
    train_dir = source or run_dir
    stamp = run_dir / "bench_run.json"
    check_stamp(run_dir, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_cmd = [_python(cfg), "-m", "gd.train", *overrides, "train.progress=false"]
    eval_cmd = [_python(cfg), "-m", "gd.evaluate", *overrides, f"ckpt={train_dir / 'ema.pt'}",
                f"metrics.reference={reference}",
                f"metrics.reference_max_images={int(b.ref_images)}", f"metrics.out={run_dir / 'eval.json'}",
                *flatten(b.metrics, "metrics."), "sample.progress=false"]
    atomic_write_text(stamp, json.dumps({"overrides": overrides, "train": train_cmd, "evaluate": eval_cmd},
                                        indent=1))
    timing_path = run_dir / "bench_timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    threads = int(b.threads)
    if not (run_dir / "eval.json").is_file():
        if not (train_dir / "ema.pt").is_file():
            print(f"[run] {name} seed {seed}: {' '.join(train_cmd[1:])}", flush=True)
            load0 = _load()
            timing["train_s"] = run_logged(train_cmd, run_dir / "bench_train.log", threads)
            timing["train_load"] = [load0, _load()]
            atomic_write_text(timing_path, json.dumps(timing))
        print(f"[run] {name} seed {seed}: {' '.join(eval_cmd[1:])}", flush=True)
        load0 = _load()
        timing["eval_s"] = run_logged(eval_cmd, run_dir / "bench_eval.log", threads)
        timing["eval_load"] = [load0, _load()]
        atomic_write_text(timing_path, json.dumps(timing))
    c = b.variants[name]
    alone = None
    if b.get("mode") == "finetune" and b.finetune.get("alone") and int(c.group_size) > 1:
        alone = run_dir / "eval_alone.json"
        if not alone.is_file():   # the same checkpoint and sample seed, every image alone (N = 1)
            alone_cmd = [o for o in eval_cmd if not o.startswith(("sample.batch_groups=", "metrics.out="))]
            alone_cmd += ["sample.group_size=1", f"sample.batch_groups={int(b.sample_batch)}",
                          f"sample.out={run_dir / 'samples_alone'}", f"metrics.out={alone}"]
            print(f"[run] {name} seed {seed} alone: {' '.join(alone_cmd[1:])}", flush=True)
            load0 = _load()
            timing["eval_alone_s"] = run_logged(alone_cmd, run_dir / "bench_eval_alone.log", threads)
            timing["eval_alone_load"] = [load0, _load()]
            atomic_write_text(timing_path, json.dumps(timing))
    ev = json.loads((run_dir / "eval.json").read_text())
    row = {"config": name, "seed": int(seed), "grouping": kind(cfg, name),
           "group_size": int(c.group_size), "fid": float(ev["fid"]), "fid_label": ev.get("fid_label"),
           "precision": ev.get("precision"), "recall": ev.get("recall"), "num_images": ev["num_images"],
           **_read_metrics(train_dir), **timing, "run_dir": str(run_dir)}
    if alone is not None:
        ev1 = json.loads(alone.read_text())
        row.update(fid_alone=float(ev1["fid"]), fid_grouped_minus_alone=row["fid"] - float(ev1["fid"]),
                   precision_alone=ev1.get("precision"), recall_alone=ev1.get("recall"))
    if source is not None:
        row["trained_in"] = str(source)
    if int(c.group_size) == 1:
        row["s_cross"] = None
    print(f"[run] {name} seed {seed}: FID {row['fid']:.2f}  precision {row['precision']}  recall {row['recall']}"
          f"  S_cross {row['s_cross']}  ({row.get('train_s', float('nan')):.0f} s train, "
          f"{row.get('eval_s', float('nan')):.0f} s eval, load {timing.get('train_load')})", flush=True)
    return row


# ---- report -----------------------------------------------------------------------------------------------------
def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else None


def summarize(cfg: DictConfig, rows: list[dict]) -> list[dict]:
    """Per configuration: mean and sample sd over seeds of every metric, and FID minus plain SiT's paired by seed."""
    b = cfg.bench
    plain = {r["seed"]: r["fid"] for r in rows if r["config"] == b.get("baseline")}
    out = []
    for name in b.configs:
        mine = [r for r in rows if r["config"] == name]
        if not mine:
            continue
        c = b.variants[name]
        s = {"config": name, "label": str(c.label), "grouping": mine[0]["grouping"], "group_size": int(c.group_size),
             "seeds": [r["seed"] for r in mine], "fid_per_seed": [r["fid"] for r in mine],
             "paper_fid": c.get("paper_fid"), "paper_s_cross": c.get("paper_s_cross")}
        for key in ("fid", "precision", "recall", "s_cross", "img_per_s", "train_s", "eval_s"):
            s[key], s[f"{key}_sd"] = _mean_sd([r.get(key) for r in mine])
        diffs = [r["fid"] - plain[r["seed"]] for r in mine if r["seed"] in plain]
        if name != b.get("baseline") and diffs:
            s["fid_minus_plain"], s["fid_minus_plain_sd"] = _mean_sd(diffs)
        if any("fid_alone" in r for r in mine):
            for key in ("fid_alone", "fid_grouped_minus_alone"):
                s[key], s[f"{key}_sd"] = _mean_sd([r.get(key) for r in mine])
        last = [r["probes"][-1] for r in mine if r.get("probes")]
        for key in PROBE_SUMMARY:
            if any(key in p for p in last):
                s[key], s[f"{key}_sd"] = _mean_sd([p.get(key) for p in last])
        out.append(s)
    return out


# The held-out probe values a fine-tune's summary reports (its last probe, mean over seeds): docs/probes.md.
PROBE_SUMMARY = ("probe_own_class", "probe_own_random", "probe_own_uniform", "probe_loss_cond",
                 "probe_loss_uncond", "probe_loss_class_minus_alone", "probe_loss_random_minus_alone")


def _pm(mean: float | None, sd: float | None, digits: int = 1, scale: float = 1.0) -> str:
    if mean is None:
        return "—"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {sd * scale:.{digits}f}" if sd is not None else "")


def markdown_table(summary: list[dict], fid_label: str) -> str:
    head = ("| configuration | FID ↓ (mean ± sd) | per seed | Δ vs plain, paired | precision | recall | S_cross "
            "| paper FID (S_cross) | train s/run |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for s in summary:
        paper = "—" if s["paper_fid"] is None else f"{s['paper_fid']:.2f}"
        if s.get("paper_s_cross") is not None:
            paper += f" ({s['paper_s_cross']:.1f}%)"
        lines.append(
            f"| {s['label']} | {_pm(s['fid'], s['fid_sd'])} | {', '.join(f'{v:.1f}' for v in s['fid_per_seed'])} "
            f"| {_pm(s.get('fid_minus_plain'), s.get('fid_minus_plain_sd'))} "
            f"| {_pm(s['precision'], s['precision_sd'], 3)} | {_pm(s['recall'], s['recall_sd'], 3)} "
            f"| {_pm(s['s_cross'], s['s_cross_sd'], 1, 100.0)}{'%' if s['s_cross'] is not None else ''} "
            f"| {paper} | {_pm(s['train_s'], None, 0)} |")
    return head + "\n".join(lines) + f"\n\nFID: {fid_label}; sd over seeds (ddof 1).\n"


def finetune_table(summary: list[dict], base: dict, fid_label: str) -> str:
    """The fine-tune bench's table: FID across runs (paired vs the continued plain SiT), the within-checkpoint FID
    (grouped minus alone, same weights and sample seed) and the last held-out probe of each configuration."""
    head = ("| configuration | FID ↓ | Δ vs plain, paired | FID alone (same ckpt) | grouped − alone | own share "
            "class / random (1/N) | Δloss class − alone | Δloss random − alone | probe loss cond |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for s in summary:
        own = "—"
        if s.get("probe_own_class") is not None:
            own = (f"{s['probe_own_class']:.3f} / {s.get('probe_own_random') or float('nan'):.3f} "
                   f"({s['probe_own_uniform']:.3f})")
        lines.append(
            f"| {s['label']} | {_pm(s['fid'], s['fid_sd'])}"
            f" | {_pm(s.get('fid_minus_plain'), s.get('fid_minus_plain_sd'))}"
            f" | {_pm(s.get('fid_alone'), s.get('fid_alone_sd'))}"
            f" | {_pm(s.get('fid_grouped_minus_alone'), s.get('fid_grouped_minus_alone_sd'))} | {own}"
            f" | {_pm(s.get('probe_loss_class_minus_alone'), None, 5)}"
            f" | {_pm(s.get('probe_loss_random_minus_alone'), None, 5)} | {_pm(s.get('probe_loss_cond'), None, 4)} |")
    loss = f"{base['loss_curve'][-1][1]:.4f}" if base.get("loss_curve") else "—"
    return (head + "\n".join(lines) + f"\n\nBase (plain SiT, {base['steps']} steps): FID {base['fid']:.2f}, last "
            f"training loss {loss}, ema.pt sha256 {base['ema_sha256'][:12]}. FID: {fid_label}; sd over seeds "
            "(ddof 1). Own share and Δloss: the last held-out probe (test split), mean over seeds.\n")


def plot_selectivity(rows: list[dict], base: dict, out: Path) -> None:
    """Member selectivity over fine-tuning steps (own share, class and random groups, vs 1/N) per run, and the
    base's training loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(x for x in rows if x.get("probes")):
        color = colors[i % len(colors)]
        steps = [p["step"] for p in r["probes"]]
        for ax, key in ((ax1, "probe_own_class"), (ax2, "probe_own_random")):
            if any(key in p for p in r["probes"]):
                ax.plot(steps, [p.get(key, math.nan) for p in r["probes"]], color=color, marker=".",
                        label=f"{r['config']} s{r['seed']}")
                ax.plot(steps, [p.get("probe_own_uniform", math.nan) for p in r["probes"]], color=color,
                        linestyle="--", linewidth=0.8)
    for ax, title in ((ax1, "same-class groups"), (ax2, "random groups")):
        ax.set_xlabel("fine-tune step")
        ax.set_ylabel("own-member attention share (dashed: 1/N)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    curve = base.get("loss_curve") or []
    ax3.plot([c[0] for c in curve], [c[1] for c in curve], color="k")
    ax3.set_xlabel("base step")
    ax3.set_ylabel("training loss")
    ax3.set_title(f"base plain SiT: FID {base['fid']:.1f}", fontsize=9)
    ax3.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot(summary: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    sim = sorted((s for s in summary if s["grouping"] == "similarity"), key=lambda s: s["group_size"])
    if sim:
        ax1.errorbar([s["group_size"] for s in sim], [s["fid"] for s in sim], yerr=[s["fid_sd"] or 0 for s in sim],
                     marker="o", capsize=3, label="similarity grouping")
    markers = {"plain": ("k", "s"), "random": ("tab:red", "v"), "class": ("tab:green", "^")}
    for s in summary:
        if s["grouping"] != "similarity":
            color, marker = markers.get(s["grouping"], ("tab:purple", "D"))
            ax1.errorbar([s["group_size"]], [s["fid"]], yerr=[s["fid_sd"] or 0], color=color, marker=marker,
                         capsize=3, linestyle="none", label=s["label"])
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("group size N (1 = plain SiT)")
    ax1.set_ylabel("FID ↓ (mean ± sd over seeds)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    for s in summary:
        if s["s_cross"] is None:
            continue
        ax2.errorbar([100 * s["s_cross"]], [s["fid"]], xerr=[100 * (s["s_cross_sd"] or 0)],
                     yerr=[s["fid_sd"] or 0], marker="o", capsize=3, linestyle="none")
        ax2.annotate(s["label"], (100 * s["s_cross"], s["fid"]), fontsize=7, xytext=(4, 4),
                     textcoords="offset points")
    ax2.set_xlabel("S_cross (%), last probe of training")
    ax2.set_ylabel("FID ↓")
    ax2.grid(alpha=0.3)
    fig.suptitle("GroupDiff-l ablation (paper Table 1) at benchmark scale")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ---- the benchmark ----------------------------------------------------------------------------------------------
# What decides a run's outcome; the rest of the bench config (seeds, parallelism, folders, labels) does not.
_OUTCOME_KEYS = ("null_rate", "train_images", "ref_images", "build", "run", "sample_batch", "mode")


def run_settings(b: Any, name: str) -> dict[str, Any]:
    """Everything of bench config ``b`` that decides the result of configuration ``name`` (for any seed)."""
    b = OmegaConf.to_container(b, resolve=True) if isinstance(b, DictConfig) else b
    v = b["variants"][name]
    metrics = {k: val for k, val in (b.get("metrics") or {}).items() if k != "cache_dir"}
    out = {"variant": {k: v[k] for k in ("diffusion", "grouping", "group_size")},
           "grouping": b["groupings"][v["grouping"]], "metrics": metrics, **{k: b.get(k) for k in _OUTCOME_KEYS}}
    if (b.get("mode") or "scratch") == "finetune":   # the base and the probe set decide a fine-tune too
        out["finetune"] = {k: val for k, val in b["finetune"].items() if k not in ("configs", "dir", "seeds")}
    else:
        out["mode"] = "scratch"
    return out


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: {b!r} there, {a!r} here"]


def previous_rows(cfg: DictConfig) -> dict[tuple[str, int], dict[str, Any]]:
    """Scored runs taken from the results.json files of ``bench.previous`` (a bench begun on another machine or in a
    run folder since lost), keyed by (configuration, seed), for the planned runs only. A run scored with settings
    other than this bench's is refused, naming the file and the settings that differ. A run scored in ``bench.dir``
    wins over a previous one."""
    b = cfg.bench
    wanted = {(str(n), int(s)) for s in b.seeds for n in b.configs}
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for path in b.get("previous") or []:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"bench.previous: {path} does not exist (expected an earlier bench's "
                                    "results.json)")
        prev = json.loads(path.read_text())
        for row in prev.get("runs", []):
            key = (str(row["config"]), int(row["seed"]))
            scored_here = (Path(b.dir) / "runs" / f"{key[0]}_s{key[1]}" / "eval.json").is_file()
            if key not in wanted or key in found or scored_here:
                continue
            diff = _differences(run_settings(b, key[0]), run_settings(prev["bench"], key[0]))
            if diff:
                raise ValueError(f"bench.previous: {path} scored {key[0]} seed {key[1]} with other settings "
                                 f"({'; '.join(diff)}): drop it from bench.previous or match those settings")
            found[key] = {**row, "from": str(path)}
    return found


def planned_runs(cfg: DictConfig, previous: dict[tuple[str, int], dict[str, Any]] | None = None
                 ) -> list[tuple[str, int]]:
    """The (configuration, seed) runs of this call, whole seeds first (so a partial bench has complete seeds); with
    ``bench.report_only`` only those already scored here or in ``bench.previous`` (``previous``: its rows, read
    once by the caller), so a table can be written while or after a bench is cut short."""
    b = cfg.bench
    previous = previous_rows(cfg) if previous is None else previous
    jobs = [(name, int(seed)) for seed in b.seeds for name in b.configs]
    if b.get("report_only"):
        jobs = [(n, s) for n, s in jobs if (n, s) in previous
                or (Path(b.dir) / "runs" / f"{n}_s{s}" / "eval.json").is_file()]
        if not jobs:
            raise ValueError(f"bench.report_only: no run of {list(b.configs)} x seeds {list(b.seeds)} has been "
                             f"scored in {Path(b.dir) / 'runs'} (expected <config>_s<seed>/eval.json)")
    return jobs


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build data, run every (configuration, seed) not yet done, write results.json, table.md and method.png; with
    ``bench.mode=finetune`` first the base (once per settings) and the probe shards, then selectivity.png."""
    cfg = resolve_mode(cfg)
    check_bench(cfg)
    previous = previous_rows(cfg)
    jobs = planned_runs(cfg, previous)  # before any build: a report with nothing scored is refused at once
    b = cfg.bench
    for name, seed in jobs:             # and a checkpoint to score that is missing or trained otherwise
        if (name, seed) not in previous:
            root = grouping_root(cfg, str(b.variants[name].grouping))
            overrides = run_overrides(cfg, name, seed, root)
            trained_elsewhere(cfg, name, seed, overrides)
            check_stamp(Path(b.dir) / "runs" / f"{name}_s{seed}", overrides)
    out = Path(b.dir)
    out.mkdir(parents=True, exist_ok=True)
    started, load0 = time.perf_counter(), _load()
    reference = build_reference(cfg)
    needed = sorted({str(b.variants[n].grouping) for n in b.configs})
    finetune = b.mode == "finetune"
    if finetune:
        needed = sorted({*needed, str(b.variants[b.baseline].grouping)})    # the base trains on plain's shards
    shards = {g: build_grouping(cfg, g) for g in needed}
    base = None
    if finetune:
        _build_shards(cfg, "probe (test split)", probe_overrides(cfg), probe_root(cfg))
        base = build_base(cfg, reference)
    report = {}
    for g in needed:
        meta = json.loads((shards[g] / "meta.json").read_text())
        emb, labels = _work_arrays(shards[g].parent / "work")
        taus = sorted({float(meta["tau"]), *(float(t) for t in (b.tau_sweep if g == b.similarity else []))})
        sizes = sorted({int(b.variants[n].group_size) for n in b.configs if b.variants[n].grouping == g} - {1}) or [4]
        report[g] = {"embedder": meta["embedder"], "tau": meta["tau"], "k": meta["k"], "n_max": meta["n_max"],
                     "by_tau": grouping_report(emb, labels, int(meta["k"]), taus, sizes)}
    atomic_write_text(out / "grouping.json", json.dumps(report, indent=1))
    for g, rep in report.items():
        for row in rep["by_tau"]:
            purity = "  ".join(f"N={k.split('_n')[1]}: {v:.3f}" for k, v in row.items() if k.startswith("class_pur"))
            print(f"[grouping] {g} tau {row['tau']:+.2f}: mean count {row['mean_count']:.2f} of {rep['k']}, "
                  f"histogram {row['neighbour_count_hist']}, partner class purity {purity}", flush=True)
    with ThreadPoolExecutor(max_workers=int(b.parallel)) as pool:
        done = pool.map(lambda job: run_one(cfg, job[0], job[1], shards[str(b.variants[job[0]].grouping)],
                                            reference), [j for j in jobs if j not in previous])
        mine = {(r["config"], r["seed"]): r for r in done}
    rows = [mine[j] if j in mine else previous[j] for j in jobs]
    summary = summarize(cfg, rows)
    fid_label = rows[0].get("fid_label") or "FID"
    table = finetune_table(summary, base, fid_label) if finetune else markdown_table(summary, fid_label)
    result = {"bench": OmegaConf.to_container(b, resolve=True), "runs": rows, "summary": summary,
              "report_only": bool(b.get("report_only")), **({"base": base} if finetune else {}),
              "grouping": report, "seconds": round(time.perf_counter() - started, 1),
              "load": [load0, _load()], "cpus": os.cpu_count()}
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    atomic_write_text(out / "table.md", table)
    plot(summary, out / "method.png")
    if finetune:
        plot_selectivity(rows, base, out / "selectivity.png")
    print("\n" + table, flush=True)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'method.png'} in {result['seconds']:.0f} s "
          f"(load {result['load']})", flush=True)
    return result


def compose_method(overrides: list[str], config_name: str = "bench/method") -> DictConfig:
    """conf/bench/method.yaml (or another profile) with command-line overrides, without running it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def main() -> None:
    import hydra

    @hydra.main(config_path="../../conf", config_name="bench/method", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        run(cfg)

    _main()


if __name__ == "__main__":
    main()
