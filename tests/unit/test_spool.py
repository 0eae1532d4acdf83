"""The spool stores acknowledged bytes atomically, or refuses with SpoolError."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from thyrocad.pacs.errors import SpoolError
from thyrocad.pacs.spool import Spool


def test_write_is_complete_and_hashed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data = os.urandom(10_000)
    entry = spool.write("1.2.3.4", data)
    assert entry.path.read_bytes() == data
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.size_bytes == len(data)
    assert list(spool.entries()) == [entry.path]
    # No temporary file is left next to it.
    assert [p.name for p in entry.path.parent.iterdir()] == ["1.2.3.4.dcm"]


def test_rewrite_replaces_atomically(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.write("1.2.3", b"old")
    entry = spool.write("1.2.3", b"new bytes")
    assert entry.path.read_bytes() == b"new bytes"
    assert len(list(spool.entries())) == 1


def test_refuses_when_disk_nearly_full(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=spool_free(tmp_path) + 2**40)
    with pytest.raises(SpoolError, match="free"):
        spool.write("1.2.3", b"x")
    assert list(spool.entries()) == []


def spool_free(path: Path) -> int:
    return Spool(path).free_bytes()


def test_unwritable_spool_is_a_spool_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    bucket = spool.path_for("9.9.9").parent
    bucket.parent.mkdir(parents=True, exist_ok=True)
    bucket.write_text("a file where the folder should be")
    with pytest.raises(SpoolError, match="cannot write"):
        spool.write("9.9.9", b"data")


@pytest.mark.parametrize("uid", ["", "../etc/passwd", ".hidden", "a/b"])
def test_unsafe_uids_are_refused(tmp_path: Path, uid: str) -> None:
    with pytest.raises(SpoolError):
        Spool(tmp_path).path_for(uid)
