"""Decompression bombs: a tiny file declaring a huge image is skipped (and listed in meta.json) before decoding."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from gd.data.build import BuildConfig, Builder
from gd.data.sources import default_max_pixels, load_image
from tests.data.conftest import BUILD_KW

SIDE = 5_000  # 2.5e7 pixels: above our limit for small crops (4096**2), below PIL's own warning (~8.9e7)
PIL_SIDE = 10_000  # 1e8 pixels: above PIL's warning threshold, below its error threshold (~1.8e8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb(path: Path, side: int = SIDE) -> None:
    """A valid 8-bit grayscale PNG of side x side zeros: ~100 KB on disk, side**2 bytes once decoded."""
    row, comp, parts = b"\x00" * (side + 1), zlib.compressobj(9), []
    for _ in range(side):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts))
                     + _chunk(b"IEND", b""))


def test_bomb_is_refused_from_its_header(tmp_path):
    """Fails before the fix: 2.5e7 pixels were decoded without a word, and at 1e8 PIL only warned and the whole image
    was decoded (and kept) anyway."""
    bomb = tmp_path / "bomb.png"
    write_bomb(bomb)
    assert bomb.stat().st_size < 100_000
    arr, reason = load_image(bomb, 8)
    assert arr is None and f"{SIDE}x{SIDE} = {SIDE * SIDE} pixels exceeds the limit of {default_max_pixels(8)}" in reason
    assert load_image(bomb, 8, max_pixels=SIDE * SIDE)[0].shape == (8, 8, 3)  # a raised limit lets it through
    big = tmp_path / "big.png"
    write_bomb(big, PIL_SIDE)
    arr, reason = load_image(big, 8, max_pixels=10**9)  # past our limit, PIL's warning is a skip too
    assert arr is None and reason.startswith("DecompressionBombWarning")


def test_bomb_in_a_folder_is_skipped_and_listed_in_meta(tmp_path, fashion_mnist_dir):
    """Fails before the fix: the builder decoded the bomb and wrote it into the shards."""
    from gd.data.sources import read_idx_gz

    root = tmp_path / "tree"
    images = read_idx_gz(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")[:12]
    for i, img in enumerate(images):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(root / f"class{i % 2}" / f"fm{i:02d}.png")
    write_bomb(root / "class1" / "bomb.png")
    cfg = BuildConfig(out=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), source_kw={"root": str(root)},
                      **BUILD_KW)
    meta = Builder(cfg).run()
    assert meta["num_records"] == 12
    skipped = json.loads((tmp_path / "out" / "meta.json").read_text())["stats"]["skipped"]
    assert len(skipped) == 1 and "bomb.png" in skipped[0]["error"] and "exceeds the limit" in skipped[0]["error"]
    assert np.isfinite(meta["stats"]["fallback_rate"])
