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


def test_import_leaves_the_process_umask_alone() -> None:
    """Fails before the fix: importing gd.io set the umask to 0 for a moment (files other threads created then were
    world-writable)."""
    import subprocess
    import sys

    code = ("import os; calls = []; real = os.umask\n"
            "os.umask = lambda m: calls.append(m) or real(m)\n"
            "os.umask(0o027); calls.clear()\n"
            "import gd.io; print(calls, oct(gd.io.current_umask()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["[]", "0o27"]


def test_private_dir_creates_0700_and_refuses_what_others_could_change(tmp_path: Path) -> None:
    """Catches a cache directory accepted although another user could have filled it: symlink, group/world-writable,
    a writable non-sticky folder above it. A sticky world-writable folder above (like /tmp) is fine."""
    from gd.io import UntrustedPathError, private_dir

    made = private_dir(tmp_path / "a" / "b")
    assert made == tmp_path / "a" / "b" and stat.S_IMODE(made.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    readable = tmp_path / "readable"
    readable.mkdir(mode=0o755)
    assert stat.S_IMODE(private_dir(readable).stat().st_mode) == 0o700  # ours, only readable: narrowed
    (tmp_path / "link").symlink_to(made)
    with pytest.raises(UntrustedPathError, match="is a symbolic link"):
        private_dir(tmp_path / "link")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(UntrustedPathError, match=r"writable by its group or by others \(mode 0777\)"):
        private_dir(open_dir)
    with pytest.raises(UntrustedPathError, match=r"open \(above .*\) is writable .*no sticky bit"):
        private_dir(open_dir / "cache")
    assert not (open_dir / "cache").exists()
    os.chmod(open_dir, 0o1777)
    assert private_dir(open_dir / "cache") == open_dir / "cache"


@pytest.mark.skipif(os.geteuid() != 0, reason="a link owned by another user needs root (lchown)")
def test_private_dir_refuses_a_link_above_it_that_another_user_planted(tmp_path: Path) -> None:
    """Fails before the fix: the parent was resolved with realpath, so a sticky shared folder's ``gd-$USER`` link
    owned by someone else, pointing at a folder of ours, was followed and the cache written where it points."""
    from gd.io import UntrustedPathError, private_dir

    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    elsewhere = tmp_path / "home" / "victim"
    elsewhere.mkdir(parents=True)
    planted = shared / "gd-user"
    planted.symlink_to(elsewhere)
    os.lchown(planted, 65534, 65534)
    for target in (planted / "data", planted / "deeper" / "data"):
        with pytest.raises(UntrustedPathError, match=r"gd-user \(above .*\) is a symbolic link owned by .*uid "
                                                     r"65534.*not by this user or root"):
            private_dir(target)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="a folder owned by another user needs root (chown)")
def test_private_dir_checks_the_folders_a_trusted_link_leads_through(tmp_path: Path) -> None:
    """A link of ours (e.g. ~/.cache -> /scratch/me/cache) is followed, and where it leads is checked like any
    folder: one owned by someone else, or writable without the sticky bit, is refused."""
    from gd.io import UntrustedPathError, private_dir

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (tmp_path / "cache").symlink_to(scratch)
    assert private_dir(tmp_path / "cache" / "gd") == scratch / "gd"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    (tmp_path / "to_foreign").symlink_to("foreign")  # relative target
    with pytest.raises(UntrustedPathError, match=r"foreign \(above .*\) is owned by .*uid 65534"):
        private_dir(tmp_path / "to_foreign" / "gd")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    (tmp_path / "to_open").symlink_to(open_dir)
    with pytest.raises(UntrustedPathError, match=r"open \(above .*\) is writable .*no sticky bit"):
        private_dir(tmp_path / "to_open" / "sub" / "gd")
    assert list(open_dir.iterdir()) == [] and list(foreign.iterdir()) == []
