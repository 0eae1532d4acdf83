"""DICOM over TLS with dcmtk's TLS clients and servers: what thyrocad serves and what it sends.

The test makes its own certificate authorities with ``openssl``: the hospital's CA signs
thyrocad's, a modality's and the PACS's certificates; a second CA, unknown to thyrocad,
signs an intruder's.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.integration.conftest import cli
from tests.procs import free_port, port_open, stop, thyrocad, wait_for
from tests.unit.test_structured_report import content
from thyrocad.pacs.sender import Peer, send_files
from thyrocad.pacs.structured_report import build_report, store_report
from thyrocad.pacs.tls import TlsConfig, TlsError, client_context
from thyrocad.synthetic import write_synthetic_set

pytestmark = pytest.mark.integration

DCMTK = Path("/usr/bin")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    key: Path
    cert: Path


def _authority(folder: Path, name: str) -> Pair:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    return Pair(folder / f"{name}.key", folder / f"{name}.crt")


def _signed(folder: Path, name: str, ca: Pair) -> Pair:
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    (folder / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
        cwd=folder,
    )  # fmt: skip
    return Pair(folder / f"{name}.key", folder / f"{name}.crt")


@dataclass(frozen=True)
class Certificates:
    ca: Pair
    thyrocad: Pair
    modality: Pair
    pacs: Pair
    intruder: Pair


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("tls")
    ca = _authority(folder, "hospital-ca")
    other = _authority(folder, "other-ca")
    return Certificates(
        ca=ca,
        thyrocad=_signed(folder, "thyrocad", ca),
        modality=_signed(folder, "modality", ca),
        pacs=_signed(folder, "pacs", ca),
        intruder=_signed(folder, "intruder", other),
    )


def _dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DCMTK / tool), *args], capture_output=True, text=True, timeout=60, check=False
    )


def _echo(port: int, *tls: str) -> subprocess.CompletedProcess[str]:
    return _dcmtk("echoscu", "-to", "10", "-aec", "THYROCAD", *tls, "127.0.0.1", str(port))


@dataclass
class TlsListener:
    port: int
    plain_port: int
    env: dict[str, str]
    log: Path


@contextmanager
def _start(tmp_path: Path, pg_url: str, certs: Certificates, **extra: str) -> Iterator[TlsListener]:
    """``thyrocad serve`` with our certificate and key, and ``extra`` settings."""
    port = free_port()
    env = {
        "THYROCAD_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": pg_url,
        # nothing is queued in this test: a broker that is never reached
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        "THYROCAD_PORT": str(port),
        "THYROCAD_TLS_CERT": str(certs.thyrocad.cert),
        "THYROCAD_TLS_KEY": str(certs.thyrocad.key),
        **extra,
    }
    cli("db", "upgrade", env=env)
    log = tmp_path / "listener.log"
    proc = thyrocad("serve", env=env, log=log)
    try:
        wait_for(lambda: port_open(port), 60, lambda: f"the TLS listener:\n{log.read_text()}")
        yield TlsListener(port, int(extra.get("THYROCAD_TLS_ALSO_PLAIN_PORT", 0)), env, log)
    finally:
        stop(proc)


@pytest.fixture
def mutual(tmp_path: Path, pg_url: str, certs: Certificates) -> Iterator[TlsListener]:
    """A listener that requires client certificates signed by the hospital's CA."""
    with _start(tmp_path, pg_url, certs, THYROCAD_TLS_CA=str(certs.ca.cert)) as listener:
        yield listener


def _client(pair: Pair, ca: Pair) -> tuple[str, ...]:
    return ("+tls", str(pair.key), str(pair.cert), "+cf", str(ca.cert))


def test_listener_takes_tls_with_a_client_certificate_only(
    mutual: TlsListener, certs: Certificates, tmp_path: Path, pg_url: str
) -> None:
    ok = _echo(mutual.port, *_client(certs.modality, certs.ca))
    assert ok.returncode == 0, ok.stdout + ok.stderr + mutual.log.read_text()[-3000:]

    # Anonymous TLS (no client certificate), a certificate of an unknown CA, and plain TCP.
    anonymous = _echo(mutual.port, "+tla", "+cf", str(certs.ca.cert))
    intruder = _echo(mutual.port, *_client(certs.intruder, certs.ca))
    plain = _echo(mutual.port)
    for refused in (anonymous, intruder, plain):
        assert refused.returncode != 0, refused.stdout + refused.stderr

    # Connections that never start their handshake do not hold up anyone else's.
    silent = [socket.create_connection(("127.0.0.1", mutual.port)) for _ in range(20)]
    try:
        started = time.monotonic()
        served = _echo(mutual.port, *_client(certs.modality, certs.ca))
        assert served.returncode == 0, served.stdout + served.stderr
        assert time.monotonic() - started < 5
    finally:
        for sock in silent:
            sock.close()

    # A client that does not trust our certificate refuses us too.
    distrust = _echo(mutual.port, "+tls", str(certs.intruder.key), str(certs.intruder.cert))
    assert distrust.returncode != 0

    # storescu over TLS: acknowledged and registered.
    study = write_synthetic_set(tmp_path / "s", 1, seed=71, size=64, id_prefix="TLS")[0]
    stored = _dcmtk(
        "storescu", "-aec", "THYROCAD", *_client(certs.modality, certs.ca),
        "127.0.0.1", str(mutual.port), *map(str, study.paths),
    )  # fmt: skip
    assert stored.returncode == 0, stored.stdout + stored.stderr
    engine = sa.create_engine(pg_url)

    def registered() -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM instances")).scalar() or 0)

    try:
        wait_for(lambda: registered() == len(study.paths), 30, "the instances registered")
    finally:
        engine.dispose()

    # The listener is still up after the refused handshakes.
    again = _echo(mutual.port, *_client(certs.modality, certs.ca))
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_plaintext_port_opens_only_on_purpose(
    tmp_path: Path, pg_url: str, certs: Certificates
) -> None:
    plain_port = free_port()
    with _start(tmp_path, pg_url, certs, THYROCAD_TLS_ALSO_PLAIN_PORT=str(plain_port)) as listener:
        wait_for(lambda: port_open(plain_port), 30, "the plaintext port")
        # No CA configured: a TLS client without a certificate is served ...
        anonymous = _echo(listener.port, "+tla", "+cf", str(certs.ca.cert))
        assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
        # ... plain TCP is refused on the TLS port and served on the plaintext one.
        assert _echo(listener.port).returncode != 0
        plain = _echo(plain_port)
        assert plain.returncode == 0, plain.stdout + plain.stderr


@pytest.fixture
def tls_storescp(tmp_path: Path, certs: Certificates) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp over TLS, requiring a client certificate of the hospital's CA."""
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        [
            str(DCMTK / "storescp"),
            "-aet",
            "PACS",
            "-od",
            str(out),
            "+tls",
            str(certs.pacs.key),
            str(certs.pacs.cert),
            "+cf",
            str(certs.ca.cert),
            str(port),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open(port), 30, "storescp +tls")
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


def test_structured_reports_and_send_go_over_tls(
    tls_storescp: tuple[int, Path], certs: Certificates, tmp_path: Path
) -> None:
    port, received = tls_storescp
    ours = TlsConfig(certs.thyrocad.cert, certs.thyrocad.key, certs.ca.cert)
    pacs = Peer("127.0.0.1", port, "PACS", tls=client_context(ours))

    report = build_report(content())
    answer = store_report(report, pacs, "THYROCAD", timeout=20)
    assert answer.sent, answer.reason
    assert any(report.SOPInstanceUID in p.name for p in received.iterdir())

    study = write_synthetic_set(tmp_path / "s", 1, seed=72, size=64, id_prefix="TLSOUT")[0]
    assert send_files(study.paths, pacs, "THYROCAD").ok
    assert len(list(received.iterdir())) == 1 + len(study.paths)

    # Without our certificate the PACS refuses us; trusting another CA, we refuse the PACS.
    anonymous = Peer("127.0.0.1", port, "PACS", tls=client_context(TlsConfig(ca=certs.ca.cert)))
    assert not store_report(report, anonymous, "THYROCAD", timeout=20).sent
    wrong_ca = TlsConfig(certs.thyrocad.cert, certs.thyrocad.key, certs.intruder.cert)
    distrusted = Peer("127.0.0.1", port, "PACS", tls=client_context(wrong_ca))
    assert not store_report(report, distrusted, "THYROCAD", timeout=20).sent


def test_thyrocad_send_tls_into_storescp_tls(
    tls_storescp: tuple[int, Path], certs: Certificates, tmp_path: Path
) -> None:
    port, received = tls_storescp
    study = write_synthetic_set(tmp_path / "s", 1, seed=73, size=64, id_prefix="TLSCLI")[0]
    env = {
        "THYROCAD_DATA_DIR": str(tmp_path / "data"),
        "THYROCAD_TLS_CERT": str(certs.thyrocad.cert),
        "THYROCAD_TLS_KEY": str(certs.thyrocad.key),
        "THYROCAD_TLS_CA": str(certs.ca.cert),
    }
    where = ("--to", f"127.0.0.1:{port}", "--aet", "PACS")
    done = cli("send", "--tls", *where, str(study.paths[0].parent), env=env)
    assert f"sent {len(study.paths)}, failed 0" in done.stdout
    assert len(list(received.iterdir())) == len(study.paths)

    # Without --tls the TLS peer cannot be reached; a broken key file is one clear line.
    plain = cli("send", *where, str(study.paths[0]), env=env, check=False)
    assert plain.returncode != 0
    broken = {**env, "THYROCAD_TLS_KEY": str(tmp_path / "missing.key")}
    failed = cli("send", "--tls", *where, str(study.paths[0]), env=broken, check=False)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines() == [
        line for line in failed.stderr.strip().splitlines() if line.startswith("error:")
    ]
    assert "cannot load the TLS certificate" in failed.stderr


def test_unreadable_certificate_files_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="cannot load the TLS certificate"):
        client_context(TlsConfig(tmp_path / "missing.crt", tmp_path / "missing.key"))
