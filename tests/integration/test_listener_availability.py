"""The listener stays available to real senders whatever other peers do (issue 17):
idle and half-open connections, a PDU longer than advertised, refusals that say why.

Each test runs ``thyrocad serve`` as a process and talks to it with raw sockets and
dcmtk, so its memory is read from /proc as an operator would see it.
"""

from __future__ import annotations

import io
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import cli
from tests.integration.site import US_IMAGE_STORAGE
from tests.procs import free_port, port_open, stop, thyrocad, wait_for
from thyrocad.synthetic import write_synthetic_set

pytestmark = pytest.mark.integration

VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
A_ABORT_TYPE = 0x07


@dataclass
class Listener:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def listener(tmp_path: Path, pg_url: str, **env: str) -> Iterator[Listener]:
    """``thyrocad serve`` on a free port against ``pg_url``, with ``env`` added."""
    port = free_port()
    full = {
        "THYROCAD_DATA_DIR": str(tmp_path / "data"),
        "THYROCAD_PORT": str(port),
        "DATABASE_URL": pg_url,
        # Nothing is inferred here: a broker that is never reached.
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        **env,
    }
    cli("db", "upgrade", env=full)
    log = tmp_path / "serve.log"
    proc = thyrocad("serve", env=full, log=log)
    try:
        wait_for(lambda: port_open(port), 60, lambda: log.read_text()[-3000:])
        yield Listener(proc, port, log)
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        stop(proc)


def dcmtk(tool: str, port: int, *args: str, calling: str = "", called: str = "THYROCAD") -> bool:
    """Run dcmtk's ``tool`` (echoscu, storescu) against the listener; True on success."""
    exe = shutil.which(tool, path="/usr/bin")
    assert exe, "dcmtk is required (deploy/setup.sh installs it)"
    aet = ["-aet", calling] if calling else []
    result = subprocess.run(
        [exe, *aet, "-aec", called, "-to", "10", "127.0.0.1", str(port), *args],
        capture_output=True,
        timeout=60,
    )
    return result.returncode == 0


def good_instances(tmp_path: Path, n: int, seed: int) -> list[Path]:
    studies = write_synthetic_set(tmp_path / f"good-{seed}", 1, seed=seed, size=64, id_prefix="AV")
    return list(studies[0].paths[:n])


def seconds_until_stored(port: int, path: Path, limit: float = 30.0) -> float:
    """Retry dcmtk storescu until it stores ``path``; the seconds that took."""
    started = time.monotonic()
    while not dcmtk("storescu", port, str(path)):
        assert time.monotonic() - started < limit, "storescu never succeeded"
        time.sleep(0.2)
    return time.monotonic() - started


# ------------------------------------------------------------------ raw PDUs


def associate_rq(calling: str = "FUZZ", called: str = "THYROCAD", max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ proposing US Image Storage (context 1) and Verification (3)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        ImplementationClassUIDNotification,
        MaximumLengthNotification,
    )
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    contexts = [build_context(US_IMAGE_STORAGE, [EXPLICIT_LE, IMPLICIT_LE])]
    contexts.append(build_context(VERIFICATION))
    for context_id, context in zip((1, 3), contexts, strict=True):
        context.context_id = context_id
    primitive.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1.1"
    primitive.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def c_store_pdus(dataset: bytes, context_id: int = 1, max_pdu: int = 16384) -> list[bytes]:
    """P-DATA-TF PDUs of a C-STORE-RQ whose data set is ``dataset`` (any bytes)."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = US_IMAGE_STORAGE
    primitive.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.9.7433.99.1"
    primitive.Priority = 2
    primitive.DataSet = io.BytesIO(dataset)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    pdus = []
    for p_data in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        pdus.append(bytes(pdu.encode()))
    return pdus


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU's type and body, or None if the connection ended first."""
    header = _read(sock, 6)
    if len(header) < 6:
        return None
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = _read(sock, length)
    return (pdu_type, body) if len(body) == length else None


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        try:
            part = sock.recv(n - len(data))
        except OSError:
            break
        if not part:
            break
        data += part
    return data


def raw_association(port: int, calling: str = "FUZZ") -> socket.socket:
    """A raw socket with an established association (A-ASSOCIATE-AC received)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq(calling))
    answer = read_pdu(sock)
    assert answer is not None and answer[0] == 0x02, answer
    return sock


def ended_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the listener closes ``sock`` (after any PDU it sends) within ``seconds``."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except OSError:
        return True  # reset
    return False


def stream_oversized_pdu(port: int, total: int) -> tuple[bool, int]:
    """After A-ASSOCIATE-AC, ``04 00 FF FF FF F0`` and zeros, up to ``total`` bytes;
    returns (an A-ABORT came back, bytes the listener let us send)."""
    sock = raw_association(port)
    sent = 0
    try:
        sock.sendall(bytes.fromhex("0400FFFFFFF0"))
        chunk = bytes(1024 * 1024)
        sock.settimeout(5)
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    answer = read_pdu(sock)
    sock.close()
    return answer is not None and answer[0] == A_ABORT_TYPE, sent


# ------------------------------------------------------------------ tests


def test_a_flood_and_an_oversized_pdu_leave_storescu_storing(tmp_path: Path, pg_url: str) -> None:
    files = good_instances(tmp_path, 4, seed=171)
    with listener(tmp_path, pg_url) as served:
        # Idle, with one instance received: what the listener needs to stay at.
        assert dcmtk("storescu", served.port, str(files[0]))
        time.sleep(1.0)
        idle_rss = served.rss_kib()

        # Sixteen connect-and-close sockets (a port scan), then forty that send half an
        # A-ASSOCIATE-RQ and stay: more than all 16 association slots.
        for _ in range(16):
            socket.create_connection(("127.0.0.1", served.port)).close()
        half = associate_rq()[:40]
        held = []
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", served.port))
            sock.sendall(half)
            held.append(sock)
        took = seconds_until_stored(served.port, files[1])
        sys.stderr.write(f"\nstorescu stored {took:.2f} s into a flood of 56 sockets\n")
        assert took < 5.0, f"storescu needed {took:.1f} s during the flood"
        assert dcmtk("echoscu", served.port)
        # The listener lets the half-open ones go at the ARTIM deadline (5 s).
        assert all(ended_within(sock, 10.0) for sock in held)
        for sock in held:
            sock.close()

        # 300 MiB announced and streamed: aborted at its header, never buffered.
        aborted, sent = stream_oversized_pdu(served.port, 300 * 1024 * 1024)
        assert aborted
        assert sent < 32 * 1024 * 1024, f"{sent} bytes were taken before the A-ABORT"
        took = seconds_until_stored(served.port, files[2])
        assert took < 5.0
        time.sleep(1.0)
        after_rss = served.rss_kib()
        sys.stderr.write(
            f"oversized PDU: aborted after {sent / 2**20:.1f} MiB; storescu then {took:.2f} s; "
            f"RSS {idle_rss / 1024:.1f} -> {after_rss / 1024:.1f} MiB "
            f"({after_rss / idle_rss:.3f} x)\n"
        )
        assert after_rss <= idle_rss * 1.10, f"RSS {idle_rss} -> {after_rss} KiB"
        log = served.text()
    assert "A-ABORT: PDU longer than we accept" in log
    assert "connection closed: association request timed out" in log


def test_established_associations_hold_the_slots_and_idle_ones_time_out(
    tmp_path: Path, pg_url: str
) -> None:
    env = {"THYROCAD_MAX_ASSOCIATIONS": "2", "THYROCAD_NETWORK_TIMEOUT_SECONDS": "2"}
    with listener(tmp_path, pg_url, **env) as served:
        held = [raw_association(served.port) for _ in range(2)]
        # Both slots taken by established associations: the third gets A-ASSOCIATE-RJ.
        assert not dcmtk("echoscu", served.port)
        # Silent for network_timeout: each gets an A-ABORT and its slot comes free.
        started = time.monotonic()
        for sock in held:
            answer = read_pdu(sock)
            assert answer is not None and answer[0] == A_ABORT_TYPE, answer
            sock.close()
        assert time.monotonic() - started < 6.0
        assert dcmtk("echoscu", served.port)
        log = served.text()
    assert "association refused: too many associations" in log


def test_refusals_say_who_and_why(tmp_path: Path, pg_url: str) -> None:
    env = {"THYROCAD_ALLOWED_AETS": "MODALITY1"}
    with listener(tmp_path, pg_url, **env) as served:
        assert not dcmtk("echoscu", served.port, calling="INTRUDER")
        assert not dcmtk("echoscu", served.port, calling="MODALITY1", called="ANY-SCP")
        assert dcmtk("echoscu", served.port, calling="MODALITY1")
        # A context the listener does not take (CT Image Storage) beside Verification.
        ct = "1.2.840.10008.5.1.4.1.1.2"
        from pynetdicom import AE

        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(ct)
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate("127.0.0.1", served.port, ae_title="THYROCAD")
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
        wait_for(lambda: "presentation contexts rejected" in served.text(), 10, "the log line")
        log = served.text()
    lines = log.splitlines()
    refused_calling = [ln for ln in lines if "calling AE title not allowed" in ln]
    assert len(refused_calling) == 1 and "calling_aet=INTRUDER" in refused_calling[0]
    refused_called = [ln for ln in lines if "called AE title is not ours" in ln]
    assert len(refused_called) == 1 and "called_aet=ANY-SCP" in refused_called[0]
    contexts = [ln for ln in lines if "presentation contexts rejected" in ln]
    assert len(contexts) == 1 and ct in contexts[0] and "address=127.0.0.1:" in contexts[0]


def test_another_called_aet_is_accepted_when_configured(tmp_path: Path, pg_url: str) -> None:
    with listener(tmp_path, pg_url, THYROCAD_REQUIRE_CALLED_AET="false") as served:
        assert dcmtk("echoscu", served.port, called="ANY-SCP")
