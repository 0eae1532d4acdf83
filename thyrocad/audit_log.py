"""The audit trail as RFC 5424 syslog messages, for a hospital's SIEM.

With ``THYROCAD_AUDIT_SYSLOG`` set (``udp://host:514``, ``unix:///dev/log`` or a
socket path), every audit event a process commits (``db.repository.audit``) also
goes out as one message::

    <PRI>1 TIMESTAMP HOST thyrocad PROCID KIND [audit@32473 id=".." kind=".." actor=".."
    outcome=".."][details@32473 key="value" ..] BOM kind outcome by actor

The timestamp is the event's own (UTC, microseconds); the structured data carries
the event and its details (nested values as compact JSON), which never hold patient
data. 32473 is the private enterprise number RFC 5612 reserves for examples: thyrocad
has none of its own. Facility ``authpriv``; severity ``info`` for a success and
``warning`` for a refusal or failure. The database stays the trail of record: a
syslog that cannot be reached costs a warning at most once a minute, never an action.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
import time
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

from thyrocad.db.records import AuditEventRecord
from thyrocad.db.repository.audit import AUDIT_LOGGER

logger = logging.getLogger(__name__)

APP_NAME = "thyrocad"
EVENT_SD_ID = "audit@32473"
DETAILS_SD_ID = "details@32473"
SYSLOG_PORT = 514
_NILVALUE = "-"
_BOM = "\ufeff"
_WARN_INTERVAL = 60.0


def _header_field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` characters."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or _NILVALUE


def _param_name(key: str) -> str:
    cleaned = "".join(c for c in key if 33 <= ord(c) <= 126 and c not in '= ]"')[:32]
    return cleaned or "_"


def _param_value(value: Any) -> str:
    if value is None:
        text = ""
    elif isinstance(value, str):
        text = value
    elif isinstance(value, bool | int | float):
        text = json.dumps(value)
    else:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
    # RFC 5424 6.3.3: inside PARAM-VALUE, '"', '\' and ']' are escaped.
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _sd_element(sd_id: str, params: dict[str, Any]) -> str:
    body = "".join(f' {_param_name(k)}="{_param_value(v)}"' for k, v in params.items())
    return f"[{sd_id}{body}]"


def format_rfc5424(
    event: AuditEventRecord, *, hostname: str, app_name: str = APP_NAME, procid: int | None = None
) -> str:
    """One audit event as an RFC 5424 message without its ``<PRI>`` (the handler adds it)."""
    at = event.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    structured = _sd_element(
        EVENT_SD_ID,
        {"id": event.id, "kind": event.kind, "actor": event.actor, "outcome": event.outcome},
    )
    if event.details:
        structured += _sd_element(DETAILS_SD_ID, event.details)
    header = " ".join(
        (
            "1",
            at,
            _header_field(hostname, 255),
            _header_field(app_name, 48),
            _header_field(str(procid if procid is not None else os.getpid()), 128),
            _header_field(event.kind, 32),
        )
    )
    return f"{header} {structured} {_BOM}{event.kind} {event.outcome} by {event.actor}"


class Rfc5424Formatter(logging.Formatter):
    """Formats the audit logger's records (``extra={"audit_event": record}``)."""

    def __init__(self, hostname: str | None = None, app_name: str = APP_NAME) -> None:
        super().__init__()
        self.hostname = hostname or socket.gethostname()
        self.app_name = app_name

    def format(self, record: logging.LogRecord) -> str:
        event = getattr(record, "audit_event", None)
        if not isinstance(event, AuditEventRecord):
            raise TypeError("not an audit record: the audit logger carries audit_event")
        return format_rfc5424(
            event, hostname=self.hostname, app_name=self.app_name, procid=record.process
        )


class AuditSyslogHandler(logging.handlers.SysLogHandler):
    """A SysLogHandler for the audit logger whose failures are warned about, rarely."""

    def __init__(self, address: str | tuple[str, int]) -> None:
        super().__init__(address, facility=self.LOG_AUTHPRIV, socktype=socket.SOCK_DGRAM)
        self.append_nul = False  # RFC 5424 over UDP: one datagram is one message
        self._last_warning = float("-inf")

    def handleError(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_INTERVAL:
            self._last_warning = now
            logger.warning("audit syslog unreachable; the database keeps the audit trail")


def parse_target(target: str) -> str | tuple[str, int]:
    """``udp://host[:port]`` → (host, port); ``unix:///path`` or ``/path`` → the path.

    Raises ``ValueError`` for anything else (TCP would need RFC 6587 framing).
    """
    if target.startswith("/"):
        return target
    parts = urlsplit(target)
    if parts.scheme == "unix" and parts.path:
        return parts.path
    if parts.scheme == "udp" and parts.hostname:
        return parts.hostname, parts.port or SYSLOG_PORT
    raise ValueError(
        f"audit syslog target {target!r}: use udp://host[:port], unix:///path or a socket path"
    )


def configure_audit_syslog(
    target: str | None, *, hostname: str | None = None
) -> AuditSyslogHandler | None:
    """Send every committed audit event of this process to ``target`` (None: nowhere).

    Replaces a handler installed earlier; returns the new one. A socket that cannot
    be opened is logged and leaves the trail to the database.
    """
    audit = logging.getLogger(AUDIT_LOGGER)
    for old in [h for h in audit.handlers if isinstance(h, AuditSyslogHandler)]:
        audit.removeHandler(old)
        old.close()
    if not target:
        return None
    address = parse_target(target)
    try:
        handler = AuditSyslogHandler(address)
    except OSError as exc:
        logger.error("audit syslog %s not opened (%s); auditing to the database only", target, exc)
        return None
    handler.setFormatter(Rfc5424Formatter(hostname))
    audit.addHandler(handler)
    audit.setLevel(logging.INFO)  # whatever the process's own log level
    return handler
