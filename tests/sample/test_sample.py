"""End to end sampling on a tiny random model: outputs, kill + resume, 1 rank vs 2 ranks."""
import io
import json
import signal
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


@pytest.mark.slow
def test_kill_resume_and_two_ranks_are_byte_identical(tiny_ckpt, tmp_path):
    opts = dict(num_images=80, batch_groups=1, steps=40)  # 20 chunks
    ref_out, killed_out, ranks_out = tmp_path / "ref", tmp_path / "killed", tmp_path / "ranks"
    sample = ["-m", "gd.sample"]
    reference = run_module(sample + sample_overrides(tiny_ckpt, ref_out, **opts))
    # --standalone: torchrun binds its own free rendezvous port (no pick-then-bind race)
    two = [run_module(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       "-m", "gd.sample"] + sample_overrides(tiny_ckpt, ranks_out, **opts))]
    victim = run_module(sample + sample_overrides(tiny_ckpt, killed_out, **opts))
    while len(list((killed_out / "chunks").glob("chunk_*.npz"))) < 3:  # no wall-clock limit: pytest's timeout
        assert victim.poll() is None, "sampling ended before it could be interrupted"
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


@pytest.mark.parametrize("mode", ["l", "f"])
def test_branches_get_the_planned_group_sizes_and_shared_classes(mode, tmp_path):
    """What the model receives while gd.sample generates (recorded at its input): GroupDiff-l runs the conditional
    branch at group size 1 with the slots' classes and the unconditional one in groups of N with null labels, two
    calls per guided step; -f batches both branches in one call at group size N. Every group of N shares one class,
    and outside the CFG interval only the conditional branch runs. Catches swapped group sizes, an unconditional
    branch that is not grouped (GroupDiff-l falling back to plain CFG), or groups mixing classes."""
    import torch

    from gd.models import build_model

    torch.manual_seed(0)
    model = build_model("SiT-S/2", input_size=8, in_channels=1, num_classes=10, hidden_size=32, depth=1,
                        num_heads=2, max_group_size=4)
    calls = []
    model.register_forward_pre_hook(
        lambda m, args, kw: calls.append((float(args[1][0]), args[2].clone(), kw.get("group_size", args[3] if
                                          len(args) > 3 else 1))), with_kwargs=True)
    cfg = compose_cfg(sample_overrides(Path("unused"), tmp_path / "s", num_images=20, batch_groups=5, mode=mode,
                                       steps=6, cfg_scale=2.0, method="euler") + ["sample.cfg_interval=[0.3,1.0]",
                                                                                 "sample.png=false"])
    generate(cfg, rank=0, world_size=1, model=model)
    null, n = 10, 4
    guided = [c for c in calls if c[0] >= 0.3]
    unguided = [c for c in calls if c[0] < 0.3]
    assert unguided and all(c[2] == (1 if mode == "l" else n) and not (c[1] == null).any() for c in unguided)
    for t, y, size in calls:
        labels = y[y != null]
        assert torch.all(labels.view(-1, n) == labels.view(-1, n)[:, :1]), "a group mixes classes"
    if mode == "l":
        cond = [c for c in guided if not (c[1] == null).any()]
        uncond = [c for c in guided if (c[1] == null).all()]
        assert len(cond) == len(uncond) == len(guided) // 2 and len(guided) % 2 == 0
        assert all(c[2] == 1 for c in cond) and all(c[2] == n for c in uncond)
    else:
        assert guided and all(c[2] == n and c[1].shape[0] % 2 == 0 for c in guided)
        for _, y, _ in guided:
            half = y.shape[0] // 2
            assert not (y[:half] == null).any() and (y[half:] == null).all()
