"""The listener's PDU reads: deadlines before and after association, and no PDU longer
than advertised (real loopback sockets, no pynetdicom association)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from thyrocad.pacs.admission import Admission
from thyrocad.pacs.association_io import PduReader, TransportLimits

LIMITS = TransportLimits(max_pdu_size=16384, artim_timeout=0.5, network_timeout=0.5)
A_ABORT = bytes.fromhex("07000000000400000206")  # provider, invalid PDU parameter value


@pytest.fixture
def pair() -> Iterator[tuple[SimpleNamespace, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    yield SimpleNamespace(socket=ours), peer
    ours.close()
    peer.close()


def _reader(transport: SimpleNamespace, established: bool = False) -> PduReader:
    assoc = SimpleNamespace(is_established=established)
    return PduReader(transport, assoc, LIMITS)


def _header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def test_a_pdu_within_the_limit_is_read_header_then_body(pair) -> None:  # type: ignore[no-untyped-def]
    transport, peer = pair
    reader = _reader(transport, established=True)
    body = b"\x01" * LIMITS.max_pdu_size
    peer.sendall(_header(0x04, len(body)) + body + _header(0x05, 4) + b"\0" * 4)
    assert bytes(reader(6)) == _header(0x04, len(body))
    assert bytes(reader(len(body))) == body
    # A body of 6 bytes would look like a header: the reader knows which read is which.
    assert bytes(reader(6)) == _header(0x05, 4)
    assert bytes(reader(4)) == b"\0" * 4
    assert not reader.closed


@pytest.mark.parametrize(
    ("pdu_type", "length"),
    [(0x04, LIMITS.max_pdu_size + 1), (0x04, 0xFFFFFFF0), (0x01, 10 * 1024 * 1024)],
)
def test_a_pdu_longer_than_advertised_is_aborted_before_its_body(  # type: ignore[no-untyped-def]
    pair, pdu_type: int, length: int
) -> None:
    transport, peer = pair
    reader = _reader(transport, established=pdu_type == 0x04)
    peer.sendall(_header(pdu_type, length) + b"\0" * 65536)
    started = time.monotonic()
    # Short: pynetdicom takes the connection as closed.
    assert bytes(reader(6)) == b""
    assert time.monotonic() - started < 0.2
    assert reader.closed
    peer.settimeout(2)
    assert peer.recv(10) == A_ABORT
    assert peer.recv(10) == b""  # and the connection is shut down


def test_half_an_association_request_ends_at_the_artim_deadline(pair) -> None:  # type: ignore[no-untyped-def]
    transport, peer = pair
    reader = _reader(transport)
    peer.sendall(_header(0x01, 200) + b"\0" * 50)
    assert len(reader(6)) == 6
    started = time.monotonic()
    assert len(reader(200)) < 200
    assert reader.closed
    assert time.monotonic() - started < LIMITS.artim_timeout + 0.3


def test_a_trickling_peer_does_not_outlast_the_deadline(pair) -> None:  # type: ignore[no-untyped-def]
    transport, peer = pair
    reader = _reader(transport)
    stop = threading.Event()

    def trickle() -> None:
        peer.sendall(_header(0x01, 10_000))
        while not stop.wait(0.05):
            peer.sendall(b"\0")

    threading.Thread(target=trickle, daemon=True).start()
    started = time.monotonic()
    try:
        assert len(reader(6)) == 6
        assert len(reader(10_000)) < 10_000
    finally:
        stop.set()
    assert time.monotonic() - started < LIMITS.artim_timeout + 0.3


def test_an_established_association_gets_network_timeout_per_pdu(pair) -> None:  # type: ignore[no-untyped-def]
    transport, peer = pair
    reader = _reader(transport, established=True)
    time.sleep(LIMITS.artim_timeout + 0.1)  # the ARTIM deadline no longer applies
    peer.sendall(_header(0x04, 100) + b"\0" * 100)
    assert len(reader(6)) == 6
    assert len(reader(100)) == 100
    peer.sendall(_header(0x04, 100))
    assert len(reader(6)) == 6
    started = time.monotonic()
    assert reader(100) == b""
    assert LIMITS.network_timeout - 0.1 < time.monotonic() - started < LIMITS.network_timeout + 0.3


def test_a_peer_that_closes_ends_the_reader(pair) -> None:  # type: ignore[no-untyped-def]
    transport, peer = pair
    reader = _reader(transport)
    peer.close()
    assert reader(6) == b""
    assert reader.closed


def test_connections_beyond_the_waiting_limit_are_refused_and_logged_once(caplog) -> None:  # type: ignore[no-untyped-def]
    admission = Admission(max_associations=2, max_waiting=3)
    assert admission.connection_allowed(4, ("127.0.0.1", 1))
    with caplog.at_level("WARNING", logger="thyrocad.pacs.admission"):
        assert not admission.connection_allowed(5, ("127.0.0.1", 2))
        assert not admission.connection_allowed(6, ("127.0.0.1", 3))
    assert caplog.text.count("connections refused") == 1
    assert admission.in_use() == 0
