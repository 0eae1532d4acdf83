"""The C-STORE listener: a pynetdicom SCP whose handlers stay short.

parse header → validate → spool (fsync) → hand over to the intake → status.
Registration and queueing happen after the answer, on the intake's thread, so a
slow database or broker never holds an association; pixel decoding and model
work never run here.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from thyrocad.db.records import AuditEvent, RefusedStudy
from thyrocad.pacs.admission import Admission
from thyrocad.pacs.association_audit import AssociationAudit
from thyrocad.pacs.association_io import TransportLimits, tune_association
from thyrocad.pacs.errors import InvalidInstance, SpoolError
from thyrocad.pacs.meta import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    ULTRASOUND_SOP_CLASSES,
    InstanceMeta,
    describe,
    read_dataset,
    refused_study,
    register_storage_classes,
)
from thyrocad.pacs.received import received_parts
from thyrocad.pacs.spool import Spool, SpoolEntry

logger = logging.getLogger(__name__)

# Every syntax pydicom can decode with Pillow/pylibjpeg installed.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
]


@dataclass(frozen=True)
class ListenerConfig:
    """Network identity and limits of the listener."""

    ae_title: str = "THYROCAD"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_aets: Sequence[str] = field(default_factory=tuple)
    max_associations: int = 16
    max_pdu_size: int = 131072
    # Seconds a new connection has to send its whole A-ASSOCIATE-RQ (ARTIM).
    acse_timeout: float = 5.0
    # Seconds an association may stay silent, and may take over one PDU.
    network_timeout: float = 60.0
    # Refuse an association addressed to another AE title than ours.
    require_called_aet: bool = True
    # Several listener processes share the port (SO_REUSEPORT): the kernel spreads new
    # connections over them, so decoding runs on more than one core.
    share_port: bool = False
    # With a context, every connection is TLS (pacs.tls.server_context); plain TCP fails.
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)


class _ListenerServer(ThreadedAssociationServer):
    """An association server that closes connections beyond what ``admission`` allows
    and, with ``share_port``, whose port other processes may bind too."""

    def __init__(self, *args: Any, admission: Admission, share_port: bool, **kwargs: Any) -> None:
        # server_bind runs inside the base constructor.
        self._admission = admission
        self._share_port = share_port
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self._share_port:
            assert self.socket is not None  # made by TCPServer before it binds
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        # pynetdicom runs the TLS handshake here, on the one thread that accepts every
        # connection: a client that never finishes it would stop all intake. The handshake
        # runs on the connection's own thread instead, within ARTIM (pacs.association_io).
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context is not None:
            try:
                client = self.ssl_context.wrap_socket(
                    client, server_side=True, do_handshake_on_connect=False
                )
            except (OSError, ValueError):
                client.close()
                raise
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self._admission.connection_allowed(len(self.active_associations), client_address)


class Intake(Protocol):
    """Receives what the handlers decided; must return immediately."""

    def accepted(self, meta: InstanceMeta, entry: SpoolEntry, calling_aet: str) -> None: ...

    def rejected(
        self,
        sop_instance_uid: str | None,
        calling_aet: str,
        reason: str,
        status: int,
        study: RefusedStudy | None = None,
    ) -> None: ...

    def association(self, outcome: str) -> None: ...

    def audit(self, event: AuditEvent) -> None: ...


def _calling_aet(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except AttributeError:
        return ""


def handle_store(
    event: Any, spool: Spool, intake: Intake, audit: AssociationAudit | None = None
) -> int:
    """EVT_C_STORE: validate the header, spool the bytes, return the DIMSE status
    (counted for the association's audit event)."""
    status = _store(event, spool, intake)
    if audit is not None:
        audit.stored(event.assoc, status)
    return status


def _store(event: Any, spool: Spool, intake: Intake) -> int:
    calling = _calling_aet(event)
    # The C-STORE request names the instance even when its data set does not (or is not
    # DICOM at all): a rejection then still says which instance it was.
    requested = str(getattr(event.request, "AffectedSOPInstanceUID", None) or "").strip()
    sop_uid: str | None = requested or None
    study: RefusedStudy | None = None
    try:
        # File meta and a view of pynetdicom's buffer: the instance is held once, not four
        # times (see pacs.received).
        with received_parts(event) as data:
            ds = read_dataset(data)
            sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip() or sop_uid
            try:
                meta = describe(ds, str(event.context.transfer_syntax))
            except InvalidInstance:
                # Its study still gets a result if none of its images is usable.
                study = refused_study(ds)
                raise
            finally:
                del ds  # it reads unread values from the view, which ends with the block
            entry = spool.write(meta.sop_instance_uid, data)
    except InvalidInstance as exc:
        logger.warning("instance refused: %s", exc.reason, extra={"sop_instance_uid": sop_uid})
        intake.rejected(sop_uid, calling, exc.reason, exc.status, study)
        return exc.status
    except SpoolError as exc:
        logger.error("spool write failed: %s", exc, extra={"sop_instance_uid": sop_uid})
        intake.rejected(sop_uid, calling, str(exc), STATUS_OUT_OF_RESOURCES)
        return STATUS_OUT_OF_RESOURCES
    except Exception as exc:  # a data set no check foresaw: refused, with its reason
        # The exception's text may quote header values (patient data): only where it was.
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else "?"
        reason = f"cannot process the data set: {type(exc).__name__} in {where}"
        logger.error("instance refused: %s", reason, extra={"sop_instance_uid": sop_uid})
        intake.rejected(sop_uid, calling, reason, STATUS_CANNOT_UNDERSTAND)
        return STATUS_CANNOT_UNDERSTAND
    intake.accepted(meta, entry, calling)
    return STATUS_SUCCESS


def handle_echo(event: Any) -> int:
    """EVT_C_ECHO: always success while the process is alive."""
    return STATUS_SUCCESS


def make_ae(config: ListenerConfig) -> AE:
    """An Application Entity that accepts ultrasound storage and verification."""
    # pynetdicom's "standard" handlers format a summary of every PDU and DIMSE message
    # (copying a C-STORE's whole data set to see whether it is empty) for log records
    # its logger, set to WARNING, then drops.
    _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title=config.ae_title)
    # Admission holds the real limit (associations from their request on); pynetdicom's
    # own count includes connections that have not asked for an association yet.
    ae.maximum_associations = 2**31 - 1
    ae.maximum_pdu_size = config.max_pdu_size
    # The A-ASSOCIATE-RQ wait, and the ARTIM timer, on the association's own threads.
    ae.acse_timeout = config.acse_timeout
    ae.network_timeout = config.network_timeout
    if config.allowed_aets:
        ae.require_calling_aet = list(config.allowed_aets)
    ae.require_called_aet = config.require_called_aet
    register_storage_classes()  # the retired classes too, or their C-STOREs abort
    ae.add_supported_context(Verification)
    for sop_class in ULTRASOUND_SOP_CLASSES:
        ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


def start_listener(
    config: ListenerConfig, spool: Spool, intake: Intake
) -> ThreadedAssociationServer:
    """Start the SCP in background threads and return the server (call ``shutdown()``)."""
    ae = make_ae(config)
    admission = Admission(config.max_associations)
    audit = AssociationAudit(intake.audit)
    limits = TransportLimits(config.max_pdu_size, config.acse_timeout, config.network_timeout)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [spool, intake, audit]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_CONN_OPEN, tune_association, [limits]),
        *admission.handlers(),
        *audit.handlers(),
        (evt.EVT_ACCEPTED, lambda event: intake.association("accepted")),
        (evt.EVT_REJECTED, lambda event: intake.association("refused")),
    ]
    server = ae.make_server(
        (config.host, config.port),
        evt_handlers=handlers,
        ssl_context=config.tls,
        server_class=_ListenerServer,
        admission=admission,
        share_port=config.share_port,
    )
    # As AE.start_server does for its own servers: server.shutdown() removes it again.
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, name="thyrocad-acceptor", daemon=True).start()
    logger.info(
        "listening%s",
        " (TLS)" if config.tls else "",
        extra={
            "ae_title": config.ae_title,
            "host": config.host,
            "port": config.port,
            "tls": config.tls is not None,
        },
    )
    return server
