"""A C-STORE client: send DICOM files to a peer over one association.

Used by ``thyrocad send``, the demo and the tests. Every file gets its own
DIMSE status back; a failure or warning is reported, never taken for success.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from thyrocad.pacs.errors import SendError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """A remote Application Entity; ``tls`` set means associations with it use TLS."""

    host: str
    port: int
    ae_title: str = "ANY-SCP"
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, text: str, ae_title: str = "ANY-SCP", tls: ssl.SSLContext | None = None) -> Peer:
        """``HOST:PORT`` or ``AET@HOST:PORT``."""
        if "@" in text:
            ae_title, text = text.split("@", 1)
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"expected HOST:PORT or AET@HOST:PORT, got {text!r}")
        return cls(host=host or "127.0.0.1", port=int(port), ae_title=ae_title, tls=tls)

    @property
    def name(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"


@dataclass
class SendReport:
    """What happened to each file."""

    sent: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def iter_dicom_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files under ``paths`` (folders recursed, sorted), skipping hidden ones."""
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and not child.name.startswith("."):
                    yield child
        elif path.is_file():
            yield path
        else:
            raise SendError(f"no such file or folder: {path}")


def _nodelay(event: Any) -> None:
    with contextlib.suppress(AttributeError, OSError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(
    ae: AE, peer: Peer, *, ext_neg: list[Any] | None = None, handlers: Sequence[Any] = ()
) -> Association:
    """Request an association with ``peer``: TCP_NODELAY (Nagle halves DICOM throughput),
    and TLS when the peer has a context. Check ``is_established`` on what comes back."""
    return ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        ext_neg=ext_neg,
        tls_args=(peer.tls, peer.host) if peer.tls else None,
        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), *handlers],
    )


def send_files(
    files: Sequence[Path],
    peer: Peer,
    calling_aet: str = "THYROCAD-SCU",
    on_progress: Callable[[Path, int | None], None] | None = None,
    max_pdu: int = 131072,
) -> SendReport:
    """C-STORE ``files`` to ``peer`` over one association; report per file.

    Files that are not DICOM are reported as failed without being sent.
    Raises :class:`SendError` when the association cannot be established.
    """
    report = SendReport()
    datasets: list[tuple[Path, pydicom.Dataset]] = []
    for path in files:
        try:
            parsed = pydicom.dcmread(path)
            if "SOPClassUID" not in parsed or "TransferSyntaxUID" not in parsed.file_meta:
                raise ValueError("no SOP Class UID or transfer syntax")
            datasets.append((path, parsed))
        except (InvalidDicomError, OSError, ValueError, AttributeError) as exc:
            report.failed.append((path, f"not DICOM: {exc}"))
            if on_progress:
                on_progress(path, None)
    if not datasets:
        return report
    ae = AE(ae_title=calling_aet)
    ae.maximum_pdu_size = max_pdu
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets}
    for sop_class in sorted({c for c, _ in contexts}):
        syntaxes = sorted({t for c, t in contexts if c == sop_class})
        for syntax in syntaxes:
            ae.add_requested_context(sop_class, syntax)
    if len(ae.requested_contexts) > 128:
        raise SendError("too many presentation contexts for one association")
    assoc = associate(ae, peer)
    if not assoc.is_established:
        raise SendError(
            f"association with {peer.name} {'rejected' if assoc.is_rejected else 'failed'}"
        )
    try:
        for path, ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except ValueError as exc:  # no presentation context accepted for it
                report.failed.append((path, str(exc)))
                if on_progress:
                    on_progress(path, None)
                continue
            code = int(status.Status) if status and "Status" in status else None
            if code == 0x0000:
                report.sent.append(path)
            else:
                reason = (
                    "no response (association lost)" if code is None else f"status 0x{code:04X}"
                )
                comment = status.get("ErrorComment") if status else None
                report.failed.append((path, f"{reason}{f': {comment}' if comment else ''}"))
            if on_progress:
                on_progress(path, code)
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return report


def echo(peer: Peer, calling_aet: str = "THYROCAD-SCU") -> bool:
    """C-ECHO the peer; True when it answers success."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    assoc = associate(ae, peer)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()
