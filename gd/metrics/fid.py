"""FID, Inception Score and k-NN precision/recall on Inception features, and reference statistics.

References (``reference_features``):
- ``cleanfid:<name>:<res>:<split>``: clean-fid's precomputed statistics for a dataset, read from clean-fid's
  stats folder (never downloaded here; a missing file is reported with its URL and the place to put it);
- a folder of images (features through clean-fid's ``get_folder_features`` with our extractor);
- an ``.npz``: ADM-style reference batch (``arr_0`` uint8 N×H×W×3 images, features recomputed with our
  extractor so both sides share network and resize), or precomputed ``mu``/``sigma`` (used as given).
Image features of folders / arrays are cached by file identity and extractor provenance.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gd.io import atomic_save_npy, private_dir
from gd.metrics.inception import InceptionExtractor


@dataclass
class FeatureStats:
    """Gaussian statistics of Inception features; ``feats`` kept when available (precision/recall needs them)."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int
    feats: np.ndarray | None = None
    source: str = ""


def feature_stats(feats: np.ndarray, source: str = "") -> FeatureStats:
    """Mean and unbiased covariance (float64) of N×D features."""
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need an N×D feature matrix with N >= 2, got shape {feats.shape}")
    f = feats.astype(np.float64)
    return FeatureStats(mu=f.mean(0), sigma=np.cov(f, rowvar=False), num=len(f), feats=feats, source=source)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) in float64.

    Tr (S1 S2)^½ is computed as the sum of square roots of the eigenvalues of S1^½ S2 S1^½ (symmetric PSD,
    same spectrum as S1 S2): no complex round-off and no failure on the rank-deficient covariances of small
    sample sets, where ``scipy.linalg.sqrtm`` of the non-symmetric product can break down.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    w1, v1 = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    middle = root1 @ s2 @ root1
    w = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(w, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) from N×K logits: exp E_x KL(p(y|x) || p(y))."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"need N×K logits with N >= splits={splits}, got shape {logits.shape}")
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    p = np.exp(logp)
    scores = []
    for part_p, part_logp in zip(np.array_split(p, splits), np.array_split(logp, splits)):
        log_marginal = np.log(part_p.mean(0) + 1e-300)
        kl = (part_p * (part_logp - log_marginal)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_dist(a: torch.Tensor, b: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([torch.cdist(a[i:i + batch], b) for i in range(0, len(a), batch)])


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 4096) -> tuple[float, float]:
    """Improved precision / recall (Kynkäänniemi et al. 2019) with k-NN manifolds on the given features.

    Precision: fraction of fake samples inside some real sample's ball (radius = distance to its k-th real
    neighbour); recall: the same with the roles swapped. O(N²) distances, batched, float64.
    """
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"real/fake features must be N×D with equal D, got {tuple(r.shape)} and {tuple(f.shape)}")
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than k samples per side, got {len(r)}, {len(f)}")

    def radii(x: torch.Tensor) -> torch.Tensor:
        d = _pairwise_dist(x, x, batch)
        return d.kthvalue(k + 1, dim=1).values  # index 0 is the point itself

    def coverage(points: torch.Tensor, centres: torch.Tensor, r_centres: torch.Tensor) -> float:
        inside = [(torch.cdist(points[i:i + batch], centres) <= r_centres[None]).any(1)
                  for i in range(0, len(points), batch)]
        return float(torch.cat(inside).double().mean())

    return coverage(f, r, radii(r)), coverage(r, f, radii(f))


# ---------------------------------------------------------------------------------------------- references


def _cache_path(cache_dir: Path, target: Path, extractor: InceptionExtractor, extra: str = "") -> Path:
    st = target.stat()
    key = json.dumps([str(target.resolve()), st.st_size, st.st_mtime_ns, extractor.describe(), extra])
    return cache_dir / f"ref_{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"


def _cached(cache_dir: Path | None, target: Path, extractor: InceptionExtractor, compute, extra: str = ""):
    """Reference features from ``cache_dir`` (a private directory: a planted ``ref_*.npy`` would become the
    reference of every FID computed with it), else computed and stored there."""
    if cache_dir is None:
        return compute()
    path = _cache_path(private_dir(cache_dir), target, extractor, extra)
    if path.is_file():
        return np.load(path)
    feats = compute()
    atomic_save_npy(path, feats)
    return feats


def cleanfid_stats_path(name: str, res: str | int, split: str, mode: str) -> tuple[Path, str]:
    """Local path and URL of clean-fid's reference statistics (its naming, ``inception_v3`` model): in
    ``$GD_CLEANFID_STATS_DIR`` when set (site-packages is read-only on many clusters), else clean-fid's own
    ``stats`` folder."""
    import cleanfid

    rel = f"{name}_{mode}_{split}_{res}.npz".lower()
    folder = os.environ.get("GD_CLEANFID_STATS_DIR") or Path(cleanfid.__file__).parent / "stats"
    return Path(folder) / rel, f"https://www.cs.cmu.edu/~clean-fid/stats/{rel}"


def _warn_incomparable(target: Path, mode: str) -> None:
    """ADM's reference batches carry mu/sigma computed by the TF Inception graph with TF's own resize: they match
    only our legacy_tensorflow features; against clean-mode features the FID is off by a mode-dependent bias."""
    message = (f"metrics.use_precomputed=true with metrics.mode={mode}: the mu/sigma in {target} (ADM reference "
               "batches) come from the TensorFlow Inception pipeline and are not comparable with clean-mode "
               "features; use metrics.mode=legacy_tensorflow, or use_precomputed=false to recompute the "
               "reference from its arr_0 images")
    warnings.warn(message, UserWarning, stacklevel=3)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def reference_features(ref: str, extractor: InceptionExtractor, *, batch_size: int = 64,
                       cache_dir: str | os.PathLike | None = None, use_precomputed: bool = False,
                       max_images: int | None = None, progress: bool = False) -> FeatureStats:
    """Statistics (and features when images are available) of a reference: see the module docstring."""
    if ref.startswith("cleanfid:"):
        parts = ref.split(":")[1:]
        if len(parts) != 3:
            raise ValueError(f"clean-fid reference {ref!r}: expected cleanfid:<name>:<res>:<split>, "
                             "e.g. cleanfid:cifar10:32:train")
        name, res, split = parts
        path, url = cleanfid_stats_path(name, res, split, extractor.mode)
        if not path.is_file():
            raise FileNotFoundError(f"clean-fid reference statistics {path.name} are not on this machine and "
                                    f"nothing downloads here: fetch {url} and put it at {path}")
        stats = np.load(path)
        return FeatureStats(mu=stats["mu"], sigma=stats["sigma"], num=-1, source=f"{ref} ({path})")
    target = Path(ref).expanduser()
    if target.is_dir():
        from cleanfid.fid import get_folder_features

        def compute():
            return get_folder_features(str(target), model=extractor, num_workers=0, num=max_images,
                                       batch_size=batch_size, device=extractor.device, mode=extractor.mode,
                                       verbose=progress).astype(np.float32)

        feats = _cached(cache_dir, target, extractor, compute, extra=f"folder:{max_images}")
        return feature_stats(feats, source=f"folder {target}")
    if target.suffix == ".npz" and target.is_file():
        with np.load(target) as npz:
            keys = set(npz.files)
            if "arr_0" in keys and not (use_precomputed and {"mu", "sigma"} <= keys):
                def compute():
                    images = npz["arr_0"] if max_images is None else npz["arr_0"][:max_images]
                    return extractor.images_features(images, batch_size=batch_size, progress=progress)

                feats = _cached(cache_dir, target, extractor, compute, extra=f"npz:{max_images}")
                return feature_stats(feats, source=f"npz images {target}")
            if {"mu", "sigma"} <= keys:
                if use_precomputed and extractor.mode != "legacy_tensorflow":
                    _warn_incomparable(target, extractor.mode)
                return FeatureStats(mu=npz["mu"], sigma=npz["sigma"], num=-1, source=f"npz mu/sigma {target}")
        raise ValueError(f"reference {target} has neither arr_0 (uint8 images) nor mu/sigma (found {sorted(keys)})")
    raise FileNotFoundError(f"reference {ref!r}: expected an existing image folder, an .npz (arr_0 images or "
                            "mu/sigma) or cleanfid:<name>:<res>:<split>")
