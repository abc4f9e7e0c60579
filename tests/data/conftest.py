"""Shared data-test fixtures: a class-folder tree of real Fashion-MNIST images plus planted bad/odd files, and
shards built from it (locally and on the moto S3 endpoint)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gd.data.build import BuildConfig, Builder
from gd.data.sources import read_idx_gz

NUM_FASHION = 240
# Planted files: name -> expected outcome ("skip" or "ok").
PLANTED = {"corrupt.png": "skip", "truncated.png": "skip", "truncated.jpg": "skip", "empty.png": "skip",
           "cmyk.jpg": "ok", "gray16.png": "ok", "palette.png": "ok", "palette_transparent.png": "ok",
           "rgba.png": "ok", "wide_gray.jpg": "ok"}


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_tree(root: Path, fashion_dir: Path) -> Path:
    """`root/<class>/<file>`: NUM_FASHION lossless PNGs from the Fashion-MNIST test split and the PLANTED files."""
    images = read_idx_gz(fashion_dir / "t10k-images-idx3-ubyte.gz")[:NUM_FASHION]
    labels = read_idx_gz(fashion_dir / "t10k-labels-idx1-ubyte.gz")[:NUM_FASHION]
    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / f"class{y:02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(d / f"fm{i:04d}.png")
    rng = np.random.default_rng(0)
    odd = root / "class03"
    rgb = Image.fromarray(rng.integers(0, 256, (36, 30, 3), dtype=np.uint8), "RGB")
    (odd / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(300))
    (odd / "truncated.png").write_bytes(_png_bytes(rgb)[:200])
    (odd / "truncated.jpg").write_bytes(_png_bytes(rgb, "JPEG")[:300])
    (odd / "empty.png").write_bytes(b"")
    rgb.convert("CMYK").save(odd / "cmyk.jpg", format="JPEG")
    Image.fromarray((rng.integers(0, 65536, (32, 32))).astype(np.uint16)).save(odd / "gray16.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(odd / "palette.png")
    pt = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pt.info["transparency"] = 0
    pt.save(odd / "palette_transparent.png", transparency=0)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(odd / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (28, 60), dtype=np.uint8), "L").save(odd / "wide_gray.jpg")
    (odd / "notes.txt").write_text("not an image")
    return root


BUILD_KW = dict(source="folder", image_size=28, encoder="pixels", encoder_kw={"channels": 3}, embedder="pixels",
                embedder_kw={"size": 8}, n_max=4, k=6, tau=0.9, chunk_size=64, batch_size=32, progress=False)


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory, fashion_mnist_dir) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree"), fashion_mnist_dir)


@pytest.fixture(scope="session")
def local_shards(tmp_path_factory, image_tree) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("local_shards")
    cfg = BuildConfig(out=str(base / "out"), work_dir=str(base / "work"), source_kw={"root": str(image_tree)},
                      **BUILD_KW)
    meta = Builder(cfg).run()
    return base / "out", meta


@pytest.fixture(scope="session")
def s3_shards(tmp_path_factory, image_tree, s3_endpoint) -> tuple[str, dict]:
    import boto3
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="shards")
    base = tmp_path_factory.mktemp("s3_shards")
    cfg = BuildConfig(out="s3://shards/fm/v1", work_dir=str(base / "work"), source_kw={"root": str(image_tree)},
                      **BUILD_KW)
    meta = Builder(cfg).run()
    return "s3://shards/fm/v1", meta
