"""A bounded, seeded fuzz test of the listener (issue 11, with issue 17's slot and PDU
length cases): a few hundred hostile or broken peers, then a real sender still gets in.

Every case opens its own connection to ``thyrocad serve`` and sends one of: random
bytes, a truncated A-ASSOCIATE-RQ (closed, or left open), a mutated one, a PDU header
announcing a huge length, garbage after a valid request, a C-STORE whose data set is
random or a mutated real instance, or nothing at all. After them the listener answers
C-ECHO, stores a good instance, and its RSS grew less than 10 %.
"""

from __future__ import annotations

import contextlib
import functools
import random
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.test_listener_availability import (
    associate_rq,
    c_store_pdus,
    dcmtk,
    good_instances,
    listener,
    read_pdu,
)

pytestmark = pytest.mark.integration

SEED = 11
CASES = 300
# How long one case waits for the listener's answer before it lets go.
ANSWER_WAIT = 2.0


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WAIT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return sock


def _drain(sock: socket.socket) -> None:
    """Read whatever the listener answers until it closes or goes quiet."""
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def _associated(port: int) -> socket.socket | None:
    sock = _connect(port)
    sock.sendall(associate_rq())
    answer = read_pdu(sock)
    if answer is None or answer[0] != 0x02:
        sock.close()
        return None
    return sock


def _mutate(rng: random.Random, data: bytes, flips: int) -> bytes:
    mutated = bytearray(data)
    for _ in range(flips):
        mutated[rng.randrange(len(mutated))] = rng.randrange(256)
    return bytes(mutated)


def _dataset_body(path: Path) -> bytes:
    """A real instance's data set (no file meta), as a C-STORE carries it."""
    import pydicom
    from pydicom.filebase import DicomBytesIO

    ds = pydicom.dcmread(path)
    out = DicomBytesIO()
    pydicom.dcmwrite(out, ds, write_like_original=False)
    raw = out.getvalue()
    # Skip the 128-byte preamble, "DICM" and the group 0002 elements.
    offset = 132
    while raw[offset : offset + 2] == b"\x02\x00":
        vr_length = struct.unpack("<H", raw[offset + 6 : offset + 8])[0]
        if raw[offset + 4 : offset + 6] in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            vr_length = struct.unpack("<L", raw[offset + 8 : offset + 12])[0] + 4
        offset += 8 + vr_length
    return raw[offset:]


def make_cases(seed: int, port: int, real: bytes) -> list[Callable[[], None]]:
    """``CASES`` peers, each on its own connection with its own seeded generator (they
    run in threads: one shared generator would be drawn from in any order)."""
    rq = associate_rq()

    def random_bytes(rng: random.Random) -> None:
        with _connect(port) as sock:
            sock.sendall(rng.randbytes(rng.randint(1, 4000)))
            _drain(sock)

    def truncated_request(rng: random.Random) -> None:
        with _connect(port) as sock:
            sock.sendall(rq[: rng.randrange(1, len(rq))])
            if rng.random() < 0.5:
                _drain(sock)  # left open: the listener ends it at ARTIM

    def mutated_request(rng: random.Random) -> None:
        with _connect(port) as sock:
            sock.sendall(_mutate(rng, rq, rng.randint(1, 8)))
            _drain(sock)

    def huge_length(rng: random.Random) -> None:
        pdu_type = rng.choice([0x01, 0x04, 0x05, 0x07, rng.randrange(256)])
        header = struct.pack(">BBL", pdu_type, 0, rng.randint(2**20, 2**32 - 1))
        sock = _associated(port) if pdu_type == 0x04 and rng.random() < 0.7 else _connect(port)
        if sock is None:
            return
        with sock:
            with contextlib.suppress(OSError):
                sock.sendall(header + bytes(rng.randint(0, 256 * 1024)))
            _drain(sock)

    def garbage_after_request(rng: random.Random) -> None:
        with _connect(port) as sock:
            sock.sendall(rq + rng.randbytes(rng.randint(1, 2000)))
            _drain(sock)

    def random_dataset(rng: random.Random) -> None:
        sock = _associated(port)
        if sock is None:
            return
        if rng.random() < 0.5:
            body = rng.randbytes(rng.randint(0, 20000))
        else:
            body = _mutate(rng, real, rng.randint(1, 40))
            body = body[: rng.randint(len(body) // 2, len(body))]
        with sock:
            try:
                for pdu in c_store_pdus(body):
                    sock.sendall(pdu)
                read_pdu(sock)  # a C-STORE-RSP, or an A-ABORT
            except OSError:
                pass

    def connect_and_close(rng: random.Random) -> None:
        _connect(port).close()

    kinds = [
        random_bytes,
        truncated_request,
        mutated_request,
        huge_length,
        garbage_after_request,
        random_dataset,
        connect_and_close,
    ]
    chooser = random.Random(seed)
    return [
        functools.partial(chooser.choice(kinds), random.Random(chooser.randrange(2**32)))
        for _ in range(CASES)
    ]


def test_fuzzed_peers_leave_the_listener_answering(tmp_path: Path, pg_url: str) -> None:
    good = good_instances(tmp_path, 3, seed=111)
    real = _dataset_body(good[0])
    env = {"THYROCAD_ACSE_TIMEOUT_SECONDS": "1", "THYROCAD_NETWORK_TIMEOUT_SECONDS": "2"}
    with listener(tmp_path, pg_url, **env) as served:
        assert dcmtk("storescu", served.port, str(good[0]))
        time.sleep(1.0)
        before = served.rss_kib()

        cases = make_cases(SEED, served.port, real)
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            for future in [pool.submit(case) for case in cases]:
                future.result()
        fuzz_seconds = time.monotonic() - started

        assert served.proc.poll() is None, served.text()[-3000:]
        assert dcmtk("echoscu", served.port)
        assert dcmtk("storescu", served.port, str(good[1]))
        time.sleep(1.0)
        after = served.rss_kib()
        log = served.text()
    # The slot and length cases met the limits that are there for them.
    assert "A-ABORT: PDU longer than we accept" in log
    assert "connection closed: association request timed out" in log
    assert fuzz_seconds < 60, f"{CASES} cases took {fuzz_seconds:.0f} s"
    assert after <= before * 1.10, f"RSS {before} -> {after} KiB after {CASES} cases"
