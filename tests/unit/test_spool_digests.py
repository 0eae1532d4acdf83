"""The spool remembers the digests of what it wrote, so the reconciler reads only files it
cannot vouch for; what it registers is the same as when it read every file."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.db_fixtures import fresh_sqlite_url, migrated_engine
from thyrocad.db import repository
from thyrocad.db.engine import make_session_factory
from thyrocad.db.repository.receiving import known_instances
from thyrocad.pacs.intake import reconcile_spool
from thyrocad.pacs.meta import describe, read_dataset
from thyrocad.pacs.spool import Spool
from thyrocad.synthetic import write_synthetic_set


@pytest.fixture
def sessions(tmp_path: Path):  # type: ignore[no-untyped-def]
    with migrated_engine(fresh_sqlite_url(tmp_path)) as engine:
        yield make_session_factory(engine)


def _sources(tmp_path: Path, count: int) -> list[bytes]:
    return [
        p.read_bytes()
        for p in write_synthetic_set(tmp_path / "src", 1, seed=5, size=48)[0].paths[:count]
    ]


def _uid(data: bytes) -> str:
    return describe(read_dataset(data)).sop_instance_uid


class CountingSpool(Spool):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[Path] = []

    def read(self, path: Path | str) -> bytes:
        self.reads.append(Path(path))
        return super().read(path)


def test_written_digest_holds_while_the_file_is_unchanged(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    entry = spool.write("1.2.3.4", b"first bytes")
    assert spool.written_digest(entry.path) == entry.sha256
    assert spool.written_digest(spool.path_for("1.2.3.5")) is None
    # Replaced behind the spool's back (another process, an operator): not vouched for.
    other = tmp_path / "other.dcm"
    other.write_bytes(b"other bytes")
    os.replace(other, entry.path)
    assert spool.written_digest(entry.path) is None
    again = spool.write("1.2.3.4", b"second bytes")
    assert spool.written_digest(again.path) == again.sha256
    os.utime(again.path, (time.time() - 100, time.time() - 100))  # touched: mtime differs
    assert spool.written_digest(again.path) is None
    entry.path.unlink()
    assert spool.written_digest(entry.path) is None


def test_digests_are_forgotten_by_age_and_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool")
    old = spool.write("1.2.1", b"old")
    os.utime(old.path, (time.time() - 3600, time.time() - 3600))
    spool.write("1.2.1", b"old again")  # remembered with its fresh mtime
    entry = spool.write("1.2.2", b"new")
    spool.forget_written_before(time.time() - 60)
    assert spool.written_digest(entry.path) == entry.sha256
    spool.forget_written_before(time.time() + 60)
    assert spool.written_digest(entry.path) is None
    monkeypatch.setattr(Spool, "RECENT_MAX", 2)
    small = Spool(tmp_path / "small")
    first, *rest = [small.write(f"1.3.{i}", b"x" * i) for i in range(1, 4)]
    assert small.written_digest(first.path) is None
    assert [small.written_digest(e.path) for e in rest] == [e.sha256 for e in rest]


def test_known_instances_is_known_instance_of_each(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    spool = Spool(tmp_path / "spool")
    blobs = _sources(tmp_path, 3)
    reconcile_spool(spool, sessions, lambda ids: None)  # nothing yet
    for data in blobs[:2]:
        spool.write(_uid(data), data)
    assert reconcile_spool(Spool(tmp_path / "spool"), sessions, lambda ids: None) == 2
    uids = [_uid(d) for d in blobs]
    with sessions() as session:
        many = known_instances(session, [*uids, uids[0]])
        one = {u: repository.known_instance(session, u) for u in uids}
        assert known_instances(session, []) == {}
    assert many == {u: k for u, k in one.items() if k is not None}
    assert len(many) == 2


def test_reconciler_reads_only_what_its_spool_cannot_vouch_for(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    blobs = _sources(tmp_path, 4)
    spool = CountingSpool(tmp_path / "spool")
    entries = [spool.write(_uid(d), d) for d in blobs[:3]]
    published: list[list[int]] = []
    since = time.time() - 60

    # Nothing registered yet: every file is read and registered, as before.
    assert reconcile_spool(spool, sessions, published.append, modified_since=since) == 3
    assert len(spool.reads) == 3
    # Registered with the digests this spool wrote: no file is read again.
    spool.reads.clear()
    assert reconcile_spool(spool, sessions, published.append, modified_since=since) == 0
    assert spool.reads == []
    # A file another process wrote (the spool never saw it) is read, and is known.
    foreign = spool.path_for(_uid(blobs[3]))
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_bytes(blobs[3])
    assert reconcile_spool(spool, sessions, published.append, modified_since=since) == 1
    assert spool.reads == [foreign]
    # The same UID re-sent with other bytes through another listener: read, replaced.
    spool.reads.clear()
    changed = tmp_path / "changed.dcm"
    shutil.copyfile(entries[0].path, changed)
    with changed.open("ab") as handle:
        handle.write(b"\0\0")  # other bytes, same instance
    os.replace(changed, entries[0].path)
    assert reconcile_spool(spool, sessions, published.append, modified_since=since) == 1
    assert set(spool.reads) == {entries[0].path, foreign}  # foreign: read on every pass
    with sessions() as session:
        known = repository.known_instance(session, entries[0].sop_instance_uid)
    assert known is not None and known.sha256 != entries[0].sha256
    # A fresh spool object (a restarted listener) remembers nothing: it reads every file.
    fresh = CountingSpool(tmp_path / "spool")
    assert reconcile_spool(fresh, sessions, published.append) == 0
    assert len(fresh.reads) == 4
