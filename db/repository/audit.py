"""The audit trail: who did what, when, in the append-only ``audit_events`` table.

Events are written in the caller's transaction, so an audited change and its event
commit or vanish together. Once that transaction commits, each event also goes to
the ``thyrocad.audit`` logger, where an optional sink (thyrocad's RFC 5424 syslog)
picks it up; without a sink nothing is kept for it. Details never hold patient
names or ids: keys naming a patient are refused.
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import event, insert, select
from sqlalchemy.orm import Session

from thyrocad.db.errors import RepositoryError
from thyrocad.db.records import AuditEvent, AuditEventRecord, AuditOutcome
from thyrocad.db.repository._common import _now
from thyrocad.db.schema import AUDIT_OUTCOMES, AuditEventRow

#: The logger every committed event goes to (after its transaction commits).
AUDIT_LOGGER = "thyrocad.audit"

# Kinds recorded by thyrocad (``kind`` is free text: these are the ones it writes).
ASSOCIATION = "association"
INSTANCES_RECEIVED = "instances_received"
LABEL_WRITTEN = "label_written"
MODEL_PROMOTED = "model_promoted"
MODEL_ROLLED_BACK = "model_rolled_back"
MODEL_STATUS = "model_status"
REFIT = "refit"
BACKFILL_STARTED = "backfill_started"
BACKFILL_RETRIEVE = "backfill_retrieve"
BACKFILL_FINISHED = "backfill_finished"
SR_SENT = "sr_sent"
RESULTS_READ = "results_read"

AUDIT_KINDS: tuple[str, ...] = (
    ASSOCIATION,
    INSTANCES_RECEIVED,
    LABEL_WRITTEN,
    MODEL_PROMOTED,
    MODEL_ROLLED_BACK,
    MODEL_STATUS,
    REFIT,
    BACKFILL_STARTED,
    BACKFILL_RETRIEVE,
    BACKFILL_FINISHED,
    SR_SENT,
    RESULTS_READ,
)

_logger = logging.getLogger(AUDIT_LOGGER)
# The trail lives in the database; this logger only feeds a configured sink, so its
# records neither reach the process's ordinary log nor trigger "no handler" output.
_logger.addHandler(logging.NullHandler())
_logger.propagate = False

_PENDING = "thyrocad_audit_pending"


def default_actor() -> str:
    """The operating-system user of this process (who runs a command or a service)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"


def _checked(ev: AuditEvent) -> AuditEvent:
    if ev.outcome not in AUDIT_OUTCOMES:
        raise RepositoryError(f"unknown audit outcome {ev.outcome!r}")
    if not ev.kind or not ev.actor:
        raise RepositoryError("an audit event needs a kind and an actor")
    named = [key for key in ev.details if "patient" in key.lower()]
    if named:
        raise RepositoryError(f"audit details may not name a patient: {', '.join(named)}")
    return ev


def record_audit_events(
    session: Session, events: Sequence[AuditEvent], now: datetime | None = None
) -> list[AuditEventRecord]:
    """Append ``events`` (each at its own ``at``, else ``now``) and return them as recorded.

    Raises ``RepositoryError`` for an unknown outcome, an empty kind or actor, or a
    details key naming a patient.
    """
    if not events:
        return []
    when = _now(now)
    checked = [_checked(ev) for ev in events]
    rows = session.execute(
        insert(AuditEventRow).returning(AuditEventRow, sort_by_parameter_order=True),
        [
            {
                "at": _now(ev.at) if ev.at is not None else when,
                "kind": ev.kind,
                "actor": ev.actor,
                "outcome": ev.outcome,
                "details": dict(ev.details),
            }
            for ev in checked
        ],
    ).scalars()
    records = [_record(row) for row in rows]
    _emit_after_commit(session, records)
    return records


def record_audit_event(
    session: Session,
    kind: str,
    *,
    actor: str,
    outcome: AuditOutcome = "success",
    details: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> AuditEventRecord:
    """Append one audit event (see :func:`record_audit_events`) and return it."""
    (recorded,) = record_audit_events(
        session, [AuditEvent(kind, actor, outcome, dict(details or {}))], now
    )
    return recorded


def audit_events(
    session: Session,
    *,
    since: datetime | None = None,
    kind: str | None = None,
    limit: int = 100,
) -> list[AuditEventRecord]:
    """The newest ``limit`` events at or after ``since`` (of ``kind``), oldest first."""
    if limit < 1:
        raise RepositoryError("limit must be at least 1")
    query = select(AuditEventRow)
    if since is not None:
        query = query.where(AuditEventRow.at >= _now(since))
    if kind is not None:
        query = query.where(AuditEventRow.kind == kind)
    rows = session.execute(
        query.order_by(AuditEventRow.at.desc(), AuditEventRow.id.desc()).limit(limit)
    ).scalars()
    return [_record(row) for row in rows][::-1]


def _record(row: AuditEventRow) -> AuditEventRecord:
    return AuditEventRecord(
        id=row.id,
        at=row.at,
        kind=row.kind,
        actor=row.actor,
        outcome=row.outcome,
        details=dict(row.details),
    )


# --------------------------------------------------------------------------- the sink


def _sink_configured() -> bool:
    return any(not isinstance(h, logging.NullHandler) for h in _logger.handlers)


def _emit_after_commit(session: Session, records: list[AuditEventRecord]) -> None:
    """Hand ``records`` to the audit logger once the session's transaction commits."""
    if not _sink_configured():
        return
    pending = session.info.get(_PENDING)
    if pending is None:
        pending = session.info[_PENDING] = []
        event.listen(session, "after_commit", _emit_pending)
        event.listen(session, "after_rollback", _drop_pending)
    pending.extend(records)


def _emit_pending(session: Session) -> None:
    pending: list[AuditEventRecord] = session.info.get(_PENDING, [])
    records, pending[:] = list(pending), []
    for rec in records:
        level = logging.INFO if rec.outcome == "success" else logging.WARNING
        _logger.log(level, "%s %s", rec.kind, rec.outcome, extra={"audit_event": rec})


def _drop_pending(session: Session) -> None:
    pending: list[AuditEventRecord] | None = session.info.get(_PENDING)
    if pending is not None:
        pending.clear()
