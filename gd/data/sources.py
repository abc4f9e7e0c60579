"""Image sources for the shard builder: ImageNet-style class folders and Fashion-MNIST idx files.

Every source is indexable by a stable dataset id (its position in a sorted listing), so that a build split over
ranks or resumed after a crash assigns the same id to the same image. `read(i)` never raises on a bad file: it
returns `None` and the reason, and the builder lists the skipped files in meta.json.

Image files are untrusted input: a few-KB PNG can declare 10**10 pixels. The size in the header is checked before
anything is decoded, against :func:`default_max_pixels` (what an ADM crop of ``image_size`` can use, or
``sources.folder.max_pixels``), and PIL's ``DecompressionBombWarning`` is a skip too, not a warning after which the
whole image is decoded anyway. PIL's process-wide ``Image.MAX_IMAGE_PIXELS`` is left as it is.
"""
from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Truncated files must fail to decode (and be listed), not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".jfif")


class Source(Protocol):
    """What the builder needs from an image collection."""

    num_classes: int
    class_names: list[str]

    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[np.ndarray | None, int, str]:
        """(uint8 HxWx3 image or None, label, path or error message)."""
        ...


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM (guided-diffusion) center crop: BOX-halve while large, BICUBIC resize short side, crop the center."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha is composited on white, palette/CMYK/16-bit are converted."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def default_max_pixels(image_size: int) -> int:
    """The largest image (width x height) decoded for an ADM crop of ``image_size``: (32 * image_size)**2, at least
    4096**2. The crop box-halves anything over twice the crop size, so beyond 32x per side (five halvings) almost
    every decoded pixel is thrown away; 4096**2 keeps ordinary photographs at small crop sizes."""
    return max(4096 * 4096, (32 * int(image_size)) ** 2)


def load_image(path: str | Path, image_size: int, max_pixels: int | None = None) -> tuple[np.ndarray | None, str]:
    """Decode, convert to RGB and center-crop one file; (None, reason) when it cannot be decoded or declares more than
    ``max_pixels`` (default :func:`default_max_pixels`) pixels, checked from the header before decoding."""
    limit = default_max_pixels(image_size) if max_pixels is None else int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > limit:
                    return None, (f"image of {width}x{height} = {width * height} pixels exceeds the limit of {limit} "
                                  f"for a {image_size}px crop (decompression bomb?); sources.folder.max_pixels "
                                  f"raises it")
                img.load()
                rgb = to_rgb(img)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if min(rgb.size) < 1:
        return None, f"empty image {rgb.size}"
    return center_crop_arr(rgb, image_size), str(path)


class ImageFolderSource:
    """ImageNet-style tree `<root>/<class name>/<image>`; labels are the sorted class-folder positions."""

    def __init__(self, root: str | Path, image_size: int, limit: int | None = None,
                 max_pixels: int | None = None) -> None:
        self.root = Path(root)
        self.max_pixels = max_pixels
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder root {self.root} does not exist: expected <root>/<class>/<image>")
        self.class_names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.class_names:
            raise ValueError(f"no class folders under {self.root}: expected <root>/<class>/<image>")
        self.num_classes = len(self.class_names)
        self.image_size = int(image_size)
        files: list[tuple[str, int]] = []
        for label, name in enumerate(self.class_names):
            for p in sorted((self.root / name).rglob("*")):
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append((str(p), label))
        self.files = files[:limit] if limit is not None else files

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> tuple[np.ndarray | None, int, str]:
        path, label = self.files[index]
        arr, msg = load_image(path, self.image_size, self.max_pixels)
        return arr, label, (path if arr is not None else f"{path}: {msg}")


FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle boot"]


def read_idx_gz(path: str | Path) -> np.ndarray:
    """Read an idx (LeCun MNIST format) file, gzip-compressed, into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an idx uint8 file (magic {zero:#x}, type {dtype:#x})")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMNISTSource:
    """Fashion-MNIST from Debian's dataset-fashion-mnist files (`train` = 60k, `test` = 10k, 28x28 grayscale)."""

    def __init__(self, root: str | Path = "/usr/share/datasets/fashion-mnist", split: str = "train",
                 image_size: int = 28, limit: int | None = None) -> None:
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise ValueError(f"Fashion-MNIST split {split!r}: expected 'train' or 'test'")
        images = Path(root) / f"{prefix}-images-idx3-ubyte.gz"
        labels = Path(root) / f"{prefix}-labels-idx1-ubyte.gz"
        for p in (images, labels):
            if not p.exists():
                raise FileNotFoundError(f"{p} missing: install Debian's dataset-fashion-mnist "
                                        "(bash tools/system-deps.sh) or set sources.fashion_mnist.root")
        self.images = read_idx_gz(images)
        self.labels = read_idx_gz(labels).astype(np.int64)
        if limit is not None:
            self.images, self.labels = self.images[:limit], self.labels[:limit]
        self.image_size = int(image_size)
        self.class_names = list(FASHION_MNIST_CLASSES)
        self.num_classes = 10

    def __len__(self) -> int:
        return len(self.images)

    def read(self, index: int) -> tuple[np.ndarray | None, int, str]:
        img = self.images[index]
        if self.image_size != img.shape[0]:
            img = center_crop_arr(Image.fromarray(img, "L"), self.image_size)
        return np.repeat(img[:, :, None], 3, axis=2), int(self.labels[index]), f"fashion_mnist:{index}"


def build_source(name: str, *, image_size: int, limit: int | None = None, **kw) -> Source:
    """`name` is "fashion_mnist" (kw: root, split) or "folder" (kw: root, optional max_pixels)."""
    if name == "fashion_mnist":
        return FashionMNISTSource(image_size=image_size, limit=limit, **kw)
    if name == "folder":
        if not kw.get("root"):
            raise ValueError("source=folder needs sources.folder.root=<class-folder tree>")
        return ImageFolderSource(kw["root"], image_size, limit=limit, max_pixels=kw.get("max_pixels"))
    raise ValueError(f"unknown source {name!r}: expected 'fashion_mnist' or 'folder'")
