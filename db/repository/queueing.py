"""Instances on their way to a worker: marked ``queued`` once their task went to the
broker, and the ones whose task was lost (or whose worker died), to queue again.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from thyrocad.db.repository._common import PENDING_STATES, _no_sync, _now
from thyrocad.db.schema import Instance


def mark_queued(session: Session, instance_ids: Sequence[int], now: datetime | None = None) -> int:
    """Note that tasks for these instances went to the broker; return rows changed.

    Moves ``received`` rows to ``queued`` and refreshes ``updated_at`` of rows
    already ``queued`` (re-queued by the reconciler), so the reconciler does
    not queue them again before ``stale_seconds``. Other states are left alone.
    """
    if not instance_ids:
        return 0
    result = session.execute(
        update(Instance)
        .where(Instance.id.in_(instance_ids), Instance.state.in_(PENDING_STATES))
        .values(state="queued", updated_at=_now(now))
        .execution_options(**_no_sync())
    )
    return cast(int, result.rowcount)  # type: ignore[attr-defined]


def instances_to_requeue(
    session: Session,
    now: datetime | None = None,
    stale_seconds: float = 300.0,
    lease_seconds: float | None = None,
    received_seconds: float | None = None,
) -> list[int]:
    """Ids the reconciler should queue again, oldest first.

    ``received``/``queued`` rows not updated for ``stale_seconds`` (their task
    was lost, e.g. the broker was down) and ``processing`` rows whose lease
    (``lease_seconds``, default ``stale_seconds``) ran out (their worker died).
    ``received_seconds`` (default ``stale_seconds``) applies to ``received`` rows
    instead: the listener marks a row ``queued`` milliseconds after registering it,
    so one still ``received`` after a few seconds never got its task (the broker
    was down) and need not wait as long as a ``queued`` row behind a backlog.
    """
    now = _now(now)
    stale_cutoff = now - timedelta(seconds=stale_seconds)
    lease_cutoff = now - timedelta(
        seconds=stale_seconds if lease_seconds is None else lease_seconds
    )
    received_cutoff = now - timedelta(
        seconds=stale_seconds if received_seconds is None else received_seconds
    )
    return list(
        session.execute(
            select(Instance.id)
            .where(
                or_(
                    and_(Instance.state.in_(PENDING_STATES), Instance.updated_at < stale_cutoff),
                    and_(Instance.state == "received", Instance.updated_at < received_cutoff),
                    and_(Instance.state == "processing", Instance.claimed_at < lease_cutoff),
                )
            )
            .order_by(Instance.received_at, Instance.id)
        ).scalars()
    )
