"""The listener's hand-over parts that need no network peer: the spool reconciler
and the whole-PDU socket read."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from tests.db_fixtures import fresh_sqlite_url, migrated_engine
from thyrocad.db.engine import make_session_factory
from thyrocad.db.schema import Instance
from thyrocad.pacs import association_io
from thyrocad.pacs.intake import reconcile_spool
from thyrocad.pacs.meta import describe, read_dataset
from thyrocad.pacs.spool import Spool
from thyrocad.synthetic import write_synthetic_set

# ----------------------------------------------------------------- reconciler


@pytest.fixture
def sessions(tmp_path: Path):  # type: ignore[no-untyped-def]
    with migrated_engine(fresh_sqlite_url(tmp_path)) as engine:
        yield make_session_factory(engine)


def _spool_images(spool: Spool, source: Path, count: int) -> list[Path]:
    files = write_synthetic_set(source, 1, seed=71, size=48)[0].paths[:count]
    paths = []
    for path in files:
        data = path.read_bytes()
        paths.append(spool.write(describe(read_dataset(data)).sop_instance_uid, data).path)
    return paths


def _registered(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def test_reconciler_rereads_only_files_written_since_its_last_pass(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    spool = Spool(tmp_path / "spool")
    old, recent = _spool_images(spool, tmp_path / "src", 2)
    garbage = spool.path_for("1.2.3.999")
    garbage.parent.mkdir(parents=True, exist_ok=True)
    garbage.write_bytes(b"not DICOM at all")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    published: list[list[int]] = []

    # A periodic pass that started a minute ago: only the recent file is read.
    assert reconcile_spool(spool, sessions, published.append, modified_since=time.time() - 60) == 1
    assert _registered(sessions) == 1
    assert len(published) == 1 and len(published[0]) == 1

    # A full pass (start-up) finds the old file too; known bytes are not registered again.
    assert reconcile_spool(spool, sessions, published.append) == 1
    assert _registered(sessions) == 2
    assert reconcile_spool(spool, sessions, published.append) == 0
    assert len(published) == 2
    # The unreadable file is left for an operator, never deleted.
    assert garbage.exists()


# ----------------------------------------------------------------- whole-PDU reads


@pytest.fixture
def pair():  # type: ignore[no-untyped-def]
    # TCP on loopback, as an association's socket is.
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    yield SimpleNamespace(socket=ours), peer
    ours.close()
    peer.close()


def _send_in_pieces(peer: socket.socket, data: bytes, piece: int, then_close: bool) -> None:
    def run() -> None:
        for start in range(0, len(data), piece):
            peer.sendall(data[start : start + piece])
            time.sleep(0.001)
        if then_close:
            peer.shutdown(socket.SHUT_WR)

    threading.Thread(target=run, daemon=True).start()


def test_recv_waits_for_every_byte_of_a_pdu(pair) -> None:  # type: ignore[no-untyped-def]
    transport, peer = pair
    pdu = bytes(range(256)) * 600  # 153,600 bytes: a 128 KiB PDU and some
    _send_in_pieces(peer, pdu, 7000, then_close=False)
    assert bytes(association_io.recv_exactly(transport, len(pdu))) == pdu


@pytest.mark.parametrize("announced", [10_000, association_io._RECV_PREALLOCATE + 10])
def test_recv_returns_what_came_when_the_peer_closes(pair, announced: int) -> None:  # type: ignore[no-untyped-def]
    transport, peer = pair
    _send_in_pieces(peer, b"x" * 5000, 1000, then_close=True)
    assert bytes(association_io.recv_exactly(transport, announced)) == b"x" * 5000


def test_other_pynetdicom_internals_keep_its_polling(pair, caplog) -> None:  # type: ignore[no-untyped-def]
    transport, _ = pair
    # An association whose DUL lacks the 3.0 queue attributes.
    assoc = SimpleNamespace(dul=SimpleNamespace(socket=transport), dimse=SimpleNamespace())
    with caplog.at_level("WARNING", logger="thyrocad.pacs.association_io"):
        association_io.tune_association(SimpleNamespace(assoc=assoc))
    assert "poll as usual" in caplog.text
    assert not hasattr(assoc.dul, "to_provider_queue")
    # The socket tuning still applies.
    assert isinstance(transport.recv, association_io.PduReader)
