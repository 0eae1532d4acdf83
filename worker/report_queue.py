"""Structured Reports queued for the PACS: a ``pending`` dispatch per study result, then
the ``thyrocad.send_report`` task (``worker.archive_tasks``) by name.

:func:`queue_reports` runs after the finaliser made study results, with
``THYROCAD_SR_DESTINATION`` set; the ``archive send-reports`` command uses
:func:`mark_and_queue` with a publisher of its own. A report that never left stays
visible as ``pending``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy.orm import Session, sessionmaker

from thyrocad.db import repository
from thyrocad.db.records import ResultRecord
from thyrocad.pacs.structured_report import report_uids
from thyrocad.worker import task_policy
from thyrocad.worker.context import WorkerContext


def queue_reports(ctx: WorkerContext, results: Sequence[ResultRecord]) -> int:
    """Queue a report for each study result not sent yet; return how many were queued."""
    destination = ctx.settings.sr_destination
    if not destination:
        return 0
    return mark_and_queue(
        ctx.sessions,
        destination,
        results,
        lambda result_id, dest: task_policy.publish("thyrocad.send_report", result_id, dest),
    )


def mark_and_queue(
    sessions: sessionmaker[Session],
    destination: str,
    results: Sequence[ResultRecord],
    publish: Callable[[int, str], object],
) -> int:
    """Record a ``pending`` dispatch for each study result not sent to ``destination``
    yet (a failed one is tried again), then ``publish(result_id, destination)`` each."""
    studies = [r for r in results if r.level == "study"]
    queued = []
    with sessions.begin() as session:
        for result in studies:
            known = repository.sr_dispatch(session, result.id, destination)
            if known is not None and known.status == "sent":
                continue
            _, sop_uid = report_uids(result.key, result.revision, result.created_at)
            repository.save_sr_dispatch(
                session, result.id, destination, sop_uid, "pending", reason="queued"
            )
            queued.append(result.id)
    for result_id in queued:
        publish(result_id, destination)
    return len(queued)
