"""Structured Reports back to the PACS: the task that sends them.

``worker.report_queue.queue_reports`` runs after the finaliser made study results;
with ``THYROCAD_SR_DESTINATION`` set it records a ``pending`` dispatch per result
(so a report that never left is visible) and queues ``thyrocad.send_report`` on
the maintenance queue. The task builds the report from stored data, sends it
with C-STORE and stores the outcome: only DIMSE status 0x0000 is ``sent``;
a warning or a refusal is ``failed`` with its reason; no association, no
answer or an out-of-resources peer is retried with backoff and becomes
``failed`` when the retries run out. Sending a revision twice sends the same
SOP Instance UID, so a re-delivered task is harmless.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from typing import Any

from celery import shared_task

from thyrocad.db import repository
from thyrocad.db.repository import ReportSource
from thyrocad.pacs.sender import Peer
from thyrocad.pacs.structured_report import (
    ReportContent,
    StudyHeader,
    build_report,
    image_findings,
    report_uids,
    store_report,
    study_date_text,
)
from thyrocad.pacs.tls import TlsConfig, TlsError, client_context
from thyrocad.settings import Settings
from thyrocad.worker.context import WorkerContext, get_context
from thyrocad.worker.task_policy import TRANSIENT

logger = logging.getLogger(__name__)

#: Attempts after the first before a transient failure is final (about 40 minutes in all).
SR_MAX_RETRIES = 8
SR_STORE_TIMEOUT_SECONDS = 60.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def report_content(source: ReportSource, settings: Settings) -> ReportContent:
    """The plain content of the report of one study result."""
    result = source.result
    patient_id = result.patient_key
    if patient_id.startswith("UNKNOWN:"):  # db.schema.UNKNOWN_PATIENT_PREFIX: no PatientID
        patient_id = ""
    header = StudyHeader(
        study_instance_uid=result.key,
        patient_id=patient_id,
        patient_name=source.patient_name or "",
        patient_birth_date=study_date_text(source.patient_birth_date),
        patient_sex=source.patient_sex or "",
        study_date=study_date_text(source.study_date),
        accession_number=source.accession_number or "",
        study_description=source.study_description or "",
    )
    name = f"thyrocad {source.model_architecture}" if source.model_architecture else "thyrocad"
    return ReportContent(
        study=header,
        label=result.label,
        probability=result.probability,
        positive_class=settings.positive_class,
        images=image_findings(source.images),
        model_name=name,
        model_version=result.model_version,
        rule=result.rule,
        revision=result.revision,
        result_created_at=result.created_at,
        header_path=source.images[0].spool_path if source.images else None,
        previous_reports=source.previous_reports,
    )


def sr_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for the SR destination, or None when it is reached in plain TCP."""
    if not settings.sr_tls:
        return None
    return client_context(TlsConfig(*settings.tls_files))


def dispatch_report(
    ctx: WorkerContext, study_result_id: int, destination: str, final_attempt: bool = True
) -> str:
    """Build and send the report of one study result; return what happened.

    ``sent``, ``already sent``, ``failed`` (stored with its reason), ``retry``
    (a transient failure, stored as ``pending``, when not ``final_attempt``) or
    ``no result`` (the result was deleted).
    """
    with ctx.sessions() as session:
        source = repository.report_source(session, study_result_id)
        known = repository.sr_dispatch(session, study_result_id, destination)
    if source is None:
        return "no result"
    if known is not None and known.status == "sent":
        return "already sent"
    result = source.result
    _, sop_uid = report_uids(result.key, result.revision, result.created_at)

    def save(status: str, reason: str | None, dimse: int | None = None) -> None:
        with ctx.sessions.begin() as session:
            repository.save_sr_dispatch(
                session,
                study_result_id,
                destination,
                sop_uid,
                status,
                dimse_status=dimse,
                reason=reason,
                sent_at=_now(),
            )

    if result.revision < source.latest_revision:
        save("failed", f"not sent: superseded by revision {source.latest_revision}")
        return "failed"
    try:
        report = build_report(report_content(source, ctx.settings))
    except (ValueError, TypeError, AttributeError) as exc:
        # A report that cannot be built will not build on a retry either.
        logger.exception("report not built", extra={"study_result_id": study_result_id})
        save("failed", f"report could not be built: {exc}")
        return "failed"
    try:
        peer = Peer.parse(destination, tls=sr_tls_context(ctx.settings))
    except TlsError as exc:
        # Unreadable certificate files stay unreadable on a retry.
        save("failed", f"not sent: {exc}")
        return "failed"
    save("pending", "sending")
    answer = store_report(report, peer, ctx.settings.ae_title, SR_STORE_TIMEOUT_SECONDS)
    if answer.sent:
        save("sent", None, answer.status)
        logger.info("report sent", extra={"study_result_id": study_result_id})
        return "sent"
    if answer.transient and not final_attempt:
        save("pending", f"will retry: {answer.reason}", answer.status)
        return "retry"
    save("failed", answer.reason, answer.status)
    logger.warning("report not sent: %s", answer.reason, extra={"study_result_id": study_result_id})
    return "failed"


class ReportNotSent(Exception):
    """A transient failure to send a report; the task retries."""


@shared_task(
    name="thyrocad.send_report",
    bind=True,
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=600,
    max_retries=SR_MAX_RETRIES,
)
def send_report(self: Any, study_result_id: int, destination: str) -> str:
    """Send the Structured Report of one study result revision to ``destination``."""
    final = self.request.retries >= SR_MAX_RETRIES
    outcome = dispatch_report(get_context(), study_result_id, destination, final_attempt=final)
    if outcome == "retry":
        countdown = min(600, 10 * 2**self.request.retries)
        raise self.retry(countdown=countdown, exc=ReportNotSent(f"result {study_result_id}"))
    return outcome


# A pending report whose result is older than this lost its task (its own retries
# with backoff give up well before): queue it again.
PENDING_REPORT_GRACE = dt.timedelta(hours=1)


@shared_task(name="thyrocad.requeue_reports", autoretry_for=TRANSIENT, retry_backoff=True)
def requeue_reports() -> int:
    """Publish again the reports left ``pending`` by a lost task (e.g. a broker outage)."""
    ctx = get_context()
    with ctx.sessions() as session:
        pending = repository.pending_sr_dispatches(session, _now() - PENDING_REPORT_GRACE)
    for dispatch in pending:
        send_report.apply_async(args=[dispatch.study_result_id, dispatch.destination])
    if pending:
        logger.info("requeued %d pending structured reports", len(pending))
    return len(pending)
