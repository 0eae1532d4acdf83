"""Claims: a worker takes pending instances for a batch (``SKIP LOCKED`` on
PostgreSQL), renews and gives back its claims, and settles an instance it could not
predict as ``failed`` or ``rejected``.

A claim's time (``claimed_at``) is written on one host and judged expired on another,
so the callers stamp and judge claims on one clock, the database's
(:func:`database_now`): a worker whose clock runs ahead would otherwise make its own
claims look older to the others and lose them early, or one behind keep a dead
worker's claims alive past their lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import cast

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from thyrocad.db.records import ClaimedInstance
from thyrocad.db.repository._common import _UNCLAIMED, PENDING_STATES, _no_sync, _now
from thyrocad.db.schema import Instance, Study


def database_now(session: Session) -> datetime:
    """The database server's clock, aware UTC: the one clock every host shares.

    PostgreSQL's ``clock_timestamp()`` (the moment of asking, not the transaction's
    start); SQLite lives on one machine, whose clock is the database's.
    """
    if session.get_bind().dialect.name != "postgresql":
        return datetime.now(UTC)
    value = session.execute(select(func.clock_timestamp())).scalar_one()
    return cast(datetime, value).astimezone(UTC)


def claim_instances(
    session: Session,
    limit: int,
    token: str,
    now: datetime | None = None,
    lease_seconds: float = 300.0,
    only_ids: Sequence[int] | None = None,
    max_attempts: int | None = None,
    worker: str | None = None,
) -> list[ClaimedInstance]:
    """Take up to ``limit`` instances for this worker, oldest received first.

    Claimable: ``received`` and ``queued`` rows, and ``processing`` rows whose
    lease (``claimed_at`` older than ``lease_seconds``) ran out because their
    worker died. They become ``processing`` with ``claim_token=token``,
    ``claimed_at=now`` and one more attempt. ``only_ids`` restricts the claim
    to the ids a task carries. ``worker`` names the claiming worker process
    (``claimed_by``, see :func:`release_worker_claims`). With ``max_attempts``, claimable rows that
    already used that many attempts are marked ``failed`` instead (an
    instance that kills its worker every time must not loop forever).

    No row is ever claimed by two workers at once: see the module docstring.
    Commit promptly: on PostgreSQL the claimed rows stay locked until then.
    """
    if limit <= 0 or (only_ids is not None and not only_ids):
        return []
    now = _now(now)
    lease_cutoff = now - timedelta(seconds=lease_seconds)
    claimable = or_(
        Instance.state.in_(PENDING_STATES),
        and_(Instance.state == "processing", Instance.claimed_at < lease_cutoff),
    )
    scope = [claimable]
    if only_ids is not None:
        scope.append(Instance.id.in_(only_ids))

    if max_attempts is not None:
        session.execute(
            update(Instance)
            .where(*scope, Instance.attempts >= max_attempts)
            .values(
                state="failed",
                reason=f"gave up after {max_attempts} attempts without a result",
                claim_token=None,
                claimed_at=None,
                claimed_by=None,
                updated_at=now,
            )
            .execution_options(**_no_sync())
        )

    # SQLite ignores FOR UPDATE; there the whole UPDATE runs under the write lock.
    candidates = (
        select(Instance.id)
        .where(*scope)
        .order_by(Instance.received_at, Instance.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = session.execute(
        update(Instance)
        .where(Instance.id.in_(candidates.scalar_subquery()))
        .values(
            state="processing",
            claim_token=token,
            claimed_at=now,
            claimed_by=worker,
            updated_at=now,
            attempts=Instance.attempts + 1,
        )
        .returning(
            Instance.id,
            Instance.sop_instance_uid,
            Instance.study_id,
            Instance.spool_path,
            Instance.sha256,
            Instance.attempts,
            Instance.received_at,
        )
        .execution_options(**_no_sync())
    ).all()
    return [
        ClaimedInstance(
            instance_id=row.id,
            sop_instance_uid=row.sop_instance_uid,
            study_id=row.study_id,
            spool_path=row.spool_path,
            sha256=row.sha256,
            attempts=row.attempts,
        )
        # RETURNING has no order; hand them out oldest first as selected.
        for row in sorted(rows, key=lambda row: (row.received_at, row.id))
    ]


def release_claim(
    session: Session,
    instance_ids: Sequence[int],
    token: str,
    now: datetime | None = None,
    reason: str | None = None,
) -> int:
    """Give instances back after a transient error: ``processing`` → ``queued``.

    Only rows still claimed by ``token`` are touched; returns how many.
    ``reason`` (no patient data) records why, for the status output.
    """
    if not instance_ids:
        return 0
    result = session.execute(
        update(Instance)
        .where(
            Instance.id.in_(instance_ids),
            Instance.state == "processing",
            Instance.claim_token == token,
        )
        .values(state="queued", reason=reason, updated_at=_now(now), **_UNCLAIMED)
        .execution_options(**_no_sync())
    )
    return cast(int, result.rowcount)  # type: ignore[attr-defined]


def renew_claims(session: Session, tokens: Sequence[str], now: datetime | None = None) -> int:
    """Extend the lease of every instance still claimed with one of ``tokens``.

    A live worker calls this well within the lease while it decodes and predicts, so
    a short lease takes over a dead worker's claims quickly without stealing a slow
    batch. Returns how many rows were renewed.
    """
    if not tokens:
        return 0
    result = session.execute(
        update(Instance)
        .where(Instance.state == "processing", Instance.claim_token.in_(list(tokens)))
        .values(claimed_at=_now(now))
        .execution_options(**_no_sync())
    )
    return cast(int, result.rowcount)  # type: ignore[attr-defined]


def release_worker_claims(
    session: Session,
    worker: str,
    keep_tokens: Sequence[str] = (),
    now: datetime | None = None,
) -> list[int]:
    """Give back (``processing`` → ``queued``) what ``worker`` claimed and no longer works on.

    A worker process calls this when it starts, and before each drain, with the tokens
    of the batches it is working on right now as ``keep_tokens``: claims left by its
    previous life (killed) or by a drain that died with the database are released at
    once instead of waiting for their lease. Returns the released ids, oldest first.
    """
    conditions: list[ColumnElement[bool]] = [
        Instance.state == "processing",
        Instance.claimed_by == worker,
    ]
    if keep_tokens:
        conditions.append(Instance.claim_token.not_in(list(keep_tokens)))
    rows = session.execute(
        update(Instance)
        .where(*conditions)
        .values(state="queued", reason=None, updated_at=_now(now), **_UNCLAIMED)
        .returning(Instance.id, Instance.received_at)
        .execution_options(**_no_sync())
    ).all()
    return [row.id for row in sorted(rows, key=lambda row: (row.received_at, row.id))]


def _settle(
    session: Session,
    instance_id: int,
    state: str,
    reason: str,
    now: datetime | None,
    token: str | None,
) -> bool:
    conditions: list[ColumnElement[bool]] = [Instance.id == instance_id]
    if token is not None:
        conditions += [Instance.state == "processing", Instance.claim_token == token]
    # The study first (the lock order), marked so the finaliser looks at it again: a
    # study whose every image ends rejected or failed gets a result saying so.
    session.execute(
        update(Study)
        .where(Study.id == select(Instance.study_id).where(*conditions).scalar_subquery())
        .values(needs_finalise=True, prediction_epoch=Study.prediction_epoch + 1)
        .execution_options(**_no_sync())
    )
    result = session.execute(
        update(Instance)
        .where(*conditions)
        .values(state=state, reason=reason, updated_at=_now(now), **_UNCLAIMED)
        .execution_options(**_no_sync())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def mark_failed(
    session: Session,
    instance_id: int,
    reason: str,
    now: datetime | None = None,
    token: str | None = None,
) -> bool:
    """Mark an instance ``failed`` (gave up after retries) with a reason.

    With ``token``, only if this worker still holds the claim. Returns whether
    the row changed. ``reason`` must not contain patient data.
    """
    return _settle(session, instance_id, "failed", reason, now, token)


def mark_rejected(
    session: Session,
    instance_id: int,
    reason: str,
    now: datetime | None = None,
    token: str | None = None,
) -> bool:
    """Mark an instance ``rejected`` for good (e.g. undecodable pixels) with a reason.

    With ``token``, only if this worker still holds the claim. Returns whether
    the row changed. ``reason`` must not contain patient data.
    """
    return _settle(session, instance_id, "rejected", reason, now, token)
