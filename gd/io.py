"""Atomic file writes and trusted directories.

Every artefact is written to a temp file beside its target, flushed to disk, then renamed over it, so a crash or a
kill never leaves a half-written checkpoint, shard chunk or sample file behind.

Caches and run directories hold files that later code trusts (a cached ``index.json``, reference statistics,
checkpoints): :func:`private_dir` makes or accepts a directory only this user can change, and
:func:`untrusted_reason` says why a path could have been changed by someone else.
"""
from __future__ import annotations

import os
import pwd
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np



class UntrustedPathError(PermissionError):
    """A directory or file that another user could have written (or replaced), where we need one only we control."""


def current_umask() -> int:
    """The process umask, read from ``/proc/self/status`` without changing it.

    ``os.umask`` can only be read by setting it, which for a moment changes the mode of files other threads
    create; where /proc is missing the value is read that way, with 0o077 in the gap (never a wider mask).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success fsync it and rename it over ``path``.

    On any error (or KeyboardInterrupt) the temp file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; results are shared like any file
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_save_npy(path: str | os.PathLike, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    # Through a file object the archive's inner folder is "archive", not the random temp name: identical
    # content gives identical bytes, so checkpoint hashes (recorded with samples) are stable across re-exports.
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, making the creation, rename or removal of its entries durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every regular file under ``path`` and every directory (``path`` included), deepest first."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            file_path = os.path.join(root, name)
            if os.path.isfile(file_path) and not os.path.islink(file_path):
                fd = os.open(file_path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(root)


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def untrusted_reason(path: str | os.PathLike, st: os.stat_result | None = None) -> str | None:
    """Why ``path`` could have been written by another user, or None when only this user (or root) can change it.

    Untrusted: a symbolic link, an owner other than this user or root, and write permission for the group or others
    (the mode is named in the reason)."""
    st = os.lstat(path) if st is None else st
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if st.st_uid not in (os.geteuid(), 0):
        return f"{path} is owned by {_user(st.st_uid)}, not by this user, {_user(os.geteuid())}"
    if st.st_mode & 0o022:
        return (f"{path} is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"`chmod go-w {path}` if that is intended to stop")
    return None


def _check_folder(folder: Path, path: Path, st: os.stat_result) -> None:
    """A folder above ``path`` must be owned by this user or root and not writable by others, except sticky folders
    such as /tmp (where nobody can rename an entry they do not own)."""
    if st.st_uid not in (os.geteuid(), 0):
        raise UntrustedPathError(f"{folder} (above {path}) is owned by {_user(st.st_uid)}: they could replace "
                                 f"{path}; use a folder under one owned by you or root")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UntrustedPathError(f"{folder} (above {path}) is writable by its group or by others (mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}, no sticky bit): they could replace {path}")


_MAX_LINKS = 40  # as the kernel's ELOOP limit


def _trusted_parent(path: Path) -> tuple[Path, list[str]]:
    """(the real folder above ``path`` that exists, the parts below it still to create), walking ``path.parent``
    one entry at a time without following anything unchecked: every folder passed must pass
    :func:`_check_folder`, and a symbolic link is followed only when this user or root owns it (a link someone
    else planted, such as ``/tmp/gd-$USER`` pointing elsewhere, is refused, naming it and its owner)."""
    pending = list(path.parent.parts[1:])
    real = Path(path.anchor or "/")
    _check_folder(real, path, os.stat(real))
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            real = real.parent  # ``real`` holds no link, so its parent is the one the kernel would use
            continue
        step = real / part
        try:
            st = os.lstat(step)
        except FileNotFoundError:
            if ".." in pending:  # only through a link's target; the kernel too fails on a missing folder's ..
                raise UntrustedPathError(f"{path}: {step} does not exist, so the '..' after it leads nowhere")
            return real, [p for p in (part, *pending) if p not in ("", ".")]
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (os.geteuid(), 0):
                raise UntrustedPathError(f"{step} (above {path}) is a symbolic link owned by {_user(st.st_uid)}, "
                                         f"not by this user or root: they chose where it points; remove it or "
                                         f"choose another directory")
            links += 1
            if links > _MAX_LINKS:
                raise UntrustedPathError(f"{path}: more than {_MAX_LINKS} symbolic links on the way")
            target = Path(os.readlink(step))
            if target.is_absolute():
                real = Path(target.anchor)
                _check_folder(real, path, os.stat(real))
            pending = [*target.parts[1 if target.is_absolute() else 0:], *pending]
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UntrustedPathError(f"{step} (above {path}) is not a directory")
        _check_folder(step, path, st)
        real = step
    return real, []


def private_dir(path: str | os.PathLike) -> Path:
    """Create (mode 0700) or accept a directory that only this user can change, and return its real path.

    For caches whose content is trusted when read back (downloaded shards and their index, reference statistics):
    a shared, predictable path such as ``/tmp/gd-cache`` lets any local user plant that content first. Refused
    with :class:`UntrustedPathError`: the directory or any folder it creates being a symbolic link, owned by
    someone else or writable by the group or others; a folder above it that someone else could rename (owned by
    them, or writable without the sticky bit); a symbolic link above it that someone else owns. Links above it
    that this user or root made are followed. An existing directory of ours that others may only read is
    narrowed to 0700.
    """
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    parent, missing = _trusted_parent(path)
    real = parent.joinpath(*missing, path.name)
    for part in (parent.joinpath(*missing[:i]) for i in range(1, len(missing) + 1)):
        try:
            os.mkdir(part, 0o700)
        except FileExistsError:  # made meanwhile: trusted only as a folder of ours nobody else can change
            if (reason := untrusted_reason(part)) is not None or not os.path.isdir(part):
                raise UntrustedPathError(f"{part} (above {path}) appeared while it was being created: "
                                         f"{reason or 'not a directory'}") from None
        except OSError as err:
            raise UntrustedPathError(f"cannot create the private directory {real}: {err}") from err
    try:
        os.mkdir(real, 0o700)
    except FileExistsError:
        pass
    except OSError as err:
        raise UntrustedPathError(f"cannot create the private directory {real}: {err}") from err
    st = os.lstat(real)
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UntrustedPathError(f"{real} is {kind}; expected a private directory (mode 0700) of this user")
    if st.st_uid != os.geteuid():
        raise UntrustedPathError(f"{real} is owned by {_user(st.st_uid)}, not by this user, {_user(os.geteuid())}: "
                                 f"its content cannot be trusted; choose another directory")
    if st.st_mode & 0o022:
        raise UntrustedPathError(f"{real} is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):04o})"
                                 f": its content cannot be trusted; remove it or `chmod 700 {real}` if nobody else "
                                 f"wrote to it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(real, 0o700)
    return real
