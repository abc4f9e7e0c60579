"""FID-50K of a checkpoint: ``python -m gd.evaluate ckpt=<run.dir>/ema.pt metrics.reference=<ref> [...]``.

Samples with gd.sample (resuming a partial sample folder), then on rank 0: Inception features of the samples
(clean-fid's network, or fid-helper's offline copy, labelled), FID against the reference, Inception Score
(when the network has its output layer) and k-NN precision/recall (when the reference has images). Writes a
JSON with the checkpoint path and hash, the sampler settings, the config hash, the Inception provenance and
the numbers. Metric settings default to conf/evaluate.yaml's ``metrics`` block (also under gd.launch's root
config, which has none).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from gd.config import hydra_main
from gd.distributed import env as _env
from gd.io import atomic_save_npy, atomic_write_bytes
from gd.metrics.fid import feature_stats, frechet_distance, inception_score, precision_recall, reference_features
from gd.metrics.inception import InceptionExtractor, build_inception
from gd.sample import Layout, _paths, generate


def metric_settings(cfg: DictConfig) -> DictConfig:
    """``cfg.metrics`` (conf/metrics/default.yaml, part of every composed config)."""
    return cfg.metrics


def resolve_modes(m: DictConfig) -> tuple[str, bool]:
    """(resize mode, use the reference's precomputed mu/sigma) after ``auto``.

    An ``.npz`` reference is an ADM reference batch (VIRTUAL_imagenet256_labeled.npz): the number SiT, REPA and the
    released GroupDiff report is ADM's TensorFlow evaluator's, which clean-fid's ``legacy_tensorflow`` mode
    reproduces (TF resize, the same Inception weights), with the batch's own mu/sigma. Other references (image
    folders, clean-fid statistics) default to clean-fid's ``clean`` mode.
    """
    ref = str(m.get("reference") or "")
    mode = str(m.mode)
    if mode == "auto":
        mode = "legacy_tensorflow" if ref.endswith(".npz") else "clean"
    pre = m.get("use_precomputed", "auto")
    use_precomputed = mode == "legacy_tensorflow" if str(pre) == "auto" else bool(pre)
    return mode, use_precomputed


def _check_reference(m: DictConfig) -> None:
    ref = m.get("reference")
    if not ref:
        raise ValueError("metrics.reference is not set: give an image folder, an .npz (ADM reference batch with "
                         "arr_0, or mu/sigma) or cleanfid:<name>:<res>:<split>")
    ref = str(ref)
    if not ref.startswith("cleanfid:") and not Path(ref).expanduser().exists():
        hint = ""
        if Path(ref).name.startswith("VIRTUAL_imagenet"):
            hint = (": it is ADM's reference batch, linked from the evaluations/ README of openai/guided-diffusion; "
                    "download it once and pass its local path")
        raise FileNotFoundError(f"metrics.reference={ref!r} does not exist{hint}")


def config_hash(cfg: DictConfig, m: DictConfig) -> str:
    """sha256 of the resolved model / diffusion / sample / metrics config (what defines the reported number)."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "diffusion", "sample") if k in cfg}
    parts["metrics"] = OmegaConf.to_container(m, resolve=True)
    parts["ckpt"] = str(cfg.get("ckpt") or cfg.sample.get("ckpt"))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_features(out: Path, layout: Layout, extractor: InceptionExtractor, batch_size: int,
                    progress: bool) -> np.ndarray:
    """Inception features of all samples in output order, chunk by chunk (never the whole array in memory);
    cached next to the samples per extractor provenance."""
    key = hashlib.sha256(json.dumps(extractor.describe(), sort_keys=True).encode()).hexdigest()[:12]
    cache = out / f"features_{key}.npy"
    if cache.is_file():
        return np.load(cache)
    feats = []
    from tqdm import tqdm

    for k in tqdm(range(layout.num_chunks), desc="Inception features", unit="chunk", disable=not progress):
        feats.append(extractor.images_features(np.load(_paths(out, k)[0])["images"], batch_size=batch_size))
    feats = np.concatenate(feats)
    atomic_save_npy(cache, feats)
    return feats


def evaluate(cfg: DictConfig) -> dict:
    """Sample (all ranks) then compute and write the metrics (rank 0). Returns the JSON dict (rank 0)."""
    m = metric_settings(cfg)
    _check_reference(m)
    rank = _env.rank()
    device = _env.local_device(str(m.device))
    _env.bind_device(device)
    mode, use_precomputed = resolve_modes(m)
    extractor = build_inception(m.inception, mode, m.get("inception_path"), device) if rank == 0 else None
    started = time.time()
    sampled = generate(cfg)
    if rank != 0:
        return sampled
    s = cfg.sample
    out = Path(sampled["out"])
    settings = sampled["settings"]
    layout = Layout(settings["num_images"], settings["num_classes"], settings["group_size"],
                    settings["batch_groups"])
    progress = bool(s.get("progress", True))
    feats = sample_features(out, layout, extractor, int(m.batch_size), progress)
    gen = feature_stats(feats)
    ref = reference_features(str(m.reference), extractor, batch_size=int(m.batch_size), cache_dir=m.get("cache_dir"),
                             use_precomputed=use_precomputed, max_images=m.get("reference_max_images"),
                             progress=progress)
    result = {
        "ckpt": settings["ckpt"],
        "ckpt_sha256": settings["ckpt_sha256"],
        "samples": sampled["npz"],
        "num_images": len(feats),
        "sampler": {k: settings[k] for k in ("objective", "mode", "group_size", "method", "steps", "eta", "cfg_scale",
                                             "cfg_interval", "cfg_channels", "batch_groups", "seed", "precision",
                                             "decoder") if k in settings},
        "settings_hash": sampled["settings_hash"],
        "config_hash": config_hash(cfg, m),
        "inception": extractor.describe(),
        "reference": {"spec": str(m.reference), "source": ref.source, "num_images": ref.num},
        "fid": frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma),
    }
    result["fid_label"] = f"FID ({extractor.label}, {extractor.mode})"
    logits = extractor.logits(feats) if m.inception_score else None
    if logits is not None:
        mean, std = inception_score(logits)
        result["inception_score"] = {"mean": mean, "std": std}
    else:
        result["inception_score"] = None
        result["inception_score_note"] = ("disabled" if not m.inception_score else
                                          "the Inception source has no output layer (fid-helper's file drops it)")
    if m.precision_recall and ref.feats is not None:
        rng = np.random.default_rng(0)
        cap = int(m.pr_max_images) if m.get("pr_max_images") is not None else max(len(ref.feats), len(feats))
        real = ref.feats if len(ref.feats) <= cap else ref.feats[rng.choice(len(ref.feats), cap, replace=False)]
        fake = feats if len(feats) <= cap else feats[rng.choice(len(feats), cap, replace=False)]
        p, r = precision_recall(real, fake, k=int(m.pr_k))
        result.update(precision=p, recall=r, pr_k=int(m.pr_k), pr_num=[len(real), len(fake)])
    else:
        result.update(precision=None, recall=None)
    result["seconds"] = round(time.time() - started, 1)
    path = Path(str(m.out)) if m.get("out") else out / f"eval_{extractor.source}_{extractor.mode}.json"
    atomic_write_bytes(path, json.dumps(result, indent=2).encode())
    result["json"] = str(path)
    return result


def main() -> None:
    """``python -m gd.evaluate`` / ``gd-evaluate``: hydra entry point (conf/evaluate.yaml)."""
    @hydra_main("evaluate")
    def main(cfg: DictConfig) -> int:
        try:
            _check_reference(metric_settings(cfg))  # before sampling: minutes to hours
        except (ValueError, FileNotFoundError) as err:
            print(f"gd.evaluate: {err}", file=sys.stderr)
            return 2
        result = evaluate(cfg)
        if "fid" in result:
            print(f"{result['fid_label']}: {result['fid']:.4f}  ({result['num_images']} samples vs "
                  f"{result['reference']['spec']})  -> {result['json']}")
        return 0

    code = main()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
