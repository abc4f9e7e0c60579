"""End to end sampling on a tiny random model: outputs, kill + resume, 1 rank vs 2 ranks."""
import io
import json
import signal
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gd.sample import generate
from tests.sample.conftest import compose_cfg, run_module, sample_overrides


def tree_bytes(out: Path) -> dict[str, bytes]:
    """Every output file (temp files excluded) by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def test_outputs_layout_and_skip_on_rerun(tiny_ckpt, tmp_path):
    out = tmp_path / "s"
    cfg = compose_cfg(sample_overrides(tiny_ckpt, out, num_images=60, batch_groups=3))
    res = generate(cfg, rank=0, world_size=1)
    assert res["generated"] == 7 and res["skipped"] == 0  # 10 classes x 2 groups of 4 = 20 groups in chunks of 3
    with np.load(res["npz"]) as d:
        images, labels = d["arr_0"], d["arr_1"]
    assert images.shape == (60, 8, 8, 3) and images.dtype == np.uint8
    assert (images[..., 0] == images[..., 2]).all()  # grayscale model expanded to 3 channels
    assert np.bincount(labels).tolist() == [6] * 10
    pngs = {}
    for tar_path in sorted((out / "png").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                pngs[m.name] = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())))
    assert len(pngs) == 60
    for name, img in pngs.items():
        index, label = (int(v) for v in name[:-4].split("_"))
        np.testing.assert_array_equal(img, images[index])
        assert labels[index] == label
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (10 * 10 + 2, 8 * 10 + 2, 3)
    assert json.loads((out / "settings.json").read_text())["settings"]["method"] == "sde"
    before = tree_bytes(out)
    again = generate(cfg, rank=0, world_size=1)
    assert again["generated"] == 0 and again["skipped"] == 7
    assert tree_bytes(out) == before
    other = compose_cfg(sample_overrides(tiny_ckpt, out, num_images=60, batch_groups=3, seed=1))
    with pytest.raises(ValueError, match="other settings"):
        generate(other, rank=0, world_size=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_kill_resume_and_two_ranks_are_byte_identical(tiny_ckpt, tmp_path):
    opts = dict(num_images=80, batch_groups=1, steps=40)  # 20 chunks
    ref_out, killed_out, ranks_out = tmp_path / "ref", tmp_path / "killed", tmp_path / "ranks"
    sample = ["-m", "gd.sample"]
    reference = run_module(sample + sample_overrides(tiny_ckpt, ref_out, **opts))
    two = [run_module(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                       "-m", "gd.sample"] + sample_overrides(tiny_ckpt, ranks_out, **opts))]
    victim = run_module(sample + sample_overrides(tiny_ckpt, killed_out, **opts))
    deadline = time.time() + 90
    while len(list((killed_out / "chunks").glob("chunk_*.npz"))) < 3:
        assert victim.poll() is None, "sampling ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = len(list((killed_out / "chunks").glob("chunk_*.npz")))
    assert 3 <= done < 20 and not (killed_out / "samples.npz").exists()
    assert reference.wait(timeout=120) == 0
    assert two[0].wait(timeout=120) == 0
    resumed = run_module(sample + sample_overrides(tiny_ckpt, killed_out, **opts))
    assert resumed.wait(timeout=120) == 0
    expected = tree_bytes(ref_out)
    assert "samples.npz" in expected and len([k for k in expected if k.startswith("png/")]) == 20
    assert tree_bytes(killed_out) == expected
    assert tree_bytes(ranks_out) == expected
