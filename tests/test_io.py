"""gd.io: atomic writes keep the old file on failure, and equal content gives equal bytes."""
import os
import stat
from pathlib import Path

import pytest
import torch

from gd.io import atomic_path, atomic_torch_save, atomic_write_text


def test_failed_write_keeps_previous_content_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "latest"
    atomic_write_text(target, "step_100\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("step_2")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "step_100\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_torch_export_is_byte_stable(tmp_path: Path) -> None:
    obj = {"format": "x", "model": {"w": torch.arange(12.0).reshape(3, 4)}}
    atomic_torch_save(obj, tmp_path / "a.pt")
    atomic_torch_save(obj, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["model"]["w"], obj["model"]["w"])


def test_files_get_the_umask_mode_not_mkstemps_0600(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "m.json", "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o666 & ~umask
