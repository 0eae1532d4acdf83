"""Instances from arrival to prediction: registering and rejecting them,
queueing and claiming them for a worker, settling them, storing their
predictions, and counting them by state.

How concurrent writers are kept apart (lock order, ``INSERT … ON CONFLICT``,
``SKIP LOCKED`` claims) is described in the ``db.repository`` package docstring.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, Connection, and_, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from db.records import (
    ClaimedInstance,
    InstanceRecord,
    KnownInstance,
    PredictionRecord,
    RegisterOutcome,
)
from db.repository._common import PENDING_STATES, _insert, _insert_for, _no_sync, _now
from db.schema import (
    INSTANCE_STATES,
    Instance,
    Patient,
    Prediction,
    Rejection,
    Series,
    Study,
    patient_key_for,
)

# What a row holds once no worker has it.
_UNCLAIMED: dict[str, Any] = {"claim_token": None, "claimed_at": None, "claimed_by": None}


def register_instance(
    session: Session, rec: InstanceRecord, now: datetime | None = None
) -> RegisterOutcome:
    """Register one instance: :func:`register_instances` with a batch of one."""
    (outcome,) = register_instances(session, [rec], now)
    return outcome


def register_instances(
    session: Session, records: Sequence[InstanceRecord], now: datetime | None = None
) -> list[RegisterOutcome]:
    """Record spooled instances with their patients, studies and series.

    Keyed by SOP Instance UID: a new UID is stored in state ``received``
    (outcome ``new``); the same UID with the same sha256 only increments
    ``received_count`` (``duplicate``, state unchanged); the same UID with a
    different sha256 takes the new file, goes back to ``received`` with its
    reason and claim cleared (``replaced``) — its old predictions stay as
    history and are overwritten when the same model version predicts again.
    Demographics are refreshed with any non-empty new value; a study keeps
    the patient it was first registered under. Returns one outcome per
    record, in order; the result equals registering the records one by one.

    Each table gets one multi-row statement per batch (the listener registers
    up to 64 instances at a time, and four statements per image were most of
    its registration cost); a UID repeated within ``records`` starts a new batch.
    """
    now = _now(now)
    outcomes: list[RegisterOutcome] = []
    batch: list[InstanceRecord] = []
    seen: set[str] = set()
    for rec in records:
        if rec.sop_instance_uid in seen:
            outcomes += _register_batch(session, batch, now)
            batch, seen = [], set()
        batch.append(rec)
        seen.add(rec.sop_instance_uid)
    if batch:
        outcomes += _register_batch(session, batch, now)
    return outcomes


def _last_given(rows: Sequence[dict[str, object]]) -> dict[str, object]:
    """Per field, the last non-empty value: what registering one by one would leave."""
    merged: dict[str, object] = {}
    for row in rows:
        merged.update({name: value for name, value in row.items() if value is not None})
    return merged


def _group(
    keys: Sequence[str], rows: Sequence[dict[str, object]]
) -> dict[str, list[dict[str, object]]]:
    grouped: dict[str, list[dict[str, object]]] = {}
    for key, row in zip(keys, rows, strict=True):
        grouped.setdefault(key, []).append(row)
    # Sorted keys: every registrar locks rows of one table in the same order.
    return dict(sorted(grouped.items()))


def _register_batch(
    session: Session, records: Sequence[InstanceRecord], now: datetime
) -> list[RegisterOutcome]:
    """Register records with distinct SOP Instance UIDs (see register_instances)."""
    statements = _register_statements(session.get_bind().dialect.name)
    connection = session.connection()
    patient_keys = [patient_key_for(r.patient_key, r.study_instance_uid) for r in records]
    patient_ids = _upsert_patients(session, statements, records, patient_keys, now)
    study_ids = _upsert(
        connection,
        statements.study,
        "study_instance_uid",
        _group(
            [r.study_instance_uid for r in records],
            [
                {
                    "patient_id": patient_ids[key],
                    "study_date": r.study_date,
                    "accession_number": r.accession_number or None,
                    "description": r.study_description or None,
                }
                for r, key in zip(records, patient_keys, strict=True)
            ],
        ),
        # A study keeps the patient it was first registered under.
        first=("patient_id",),
        fixed={
            "first_received_at": now,
            "last_received_at": now,
            "needs_finalise": False,
            "prediction_epoch": 0,
        },
    )
    series_ids = _upsert(
        connection,
        statements.series,
        "series_instance_uid",
        _group(
            [r.series_instance_uid for r in records],
            [
                {
                    "study_id": study_ids[r.study_instance_uid],
                    "modality": r.modality or None,
                    "description": r.series_description or None,
                }
                for r in records
            ],
        ),
        first=("study_id",),
    )
    return _upsert_instances(session, statements, records, study_ids, series_ids, now)


@dataclass(frozen=True)
class _RegisterStatements:
    """The registration INSERTs of one dialect, built once so SQLAlchemy compiles them
    once; each runs with a whole batch of parameter sets (one multi-row INSERT)."""

    patient: Any
    study: Any
    series: Any
    instance: Any


@functools.cache
def _register_statements(dialect: str) -> _RegisterStatements:
    patients, studies = Patient.__table__, Study.__table__
    series, instances = Series.__table__, Instance.__table__
    study = _insert_for(dialect, studies)
    one_series = _insert_for(dialect, series)
    return _RegisterStatements(
        # DO NOTHING rather than DO UPDATE: an upsert would lock the patient row on
        # every image, and a finaliser holding it would then stall the listener.
        patient=_insert_for(dialect, patients)
        .on_conflict_do_nothing(index_elements=[patients.c.patient_key])
        .returning(patients.c.patient_key, patients.c.id),
        study=study.on_conflict_do_update(
            index_elements=[studies.c.study_instance_uid],
            set_={
                "last_received_at": study.excluded.last_received_at,
                "study_date": func.coalesce(study.excluded.study_date, studies.c.study_date),
                "accession_number": func.coalesce(
                    study.excluded.accession_number, studies.c.accession_number
                ),
                "description": func.coalesce(study.excluded.description, studies.c.description),
            },
        ).returning(studies.c.study_instance_uid, studies.c.id),
        series=one_series.on_conflict_do_update(
            index_elements=[series.c.series_instance_uid],
            set_={
                "modality": func.coalesce(one_series.excluded.modality, series.c.modality),
                "description": func.coalesce(one_series.excluded.description, series.c.description),
            },
        ).returning(series.c.series_instance_uid, series.c.id),
        instance=_insert_for(dialect, instances)
        .on_conflict_do_nothing(index_elements=[instances.c.sop_instance_uid])
        .returning(instances.c.sop_instance_uid, instances.c.id),
    )


def _upsert(
    connection: Connection,
    statement: Any,
    key_name: str,
    grouped: dict[str, list[dict[str, Any]]],
    *,
    first: tuple[str, ...],
    fixed: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Run ``statement`` with one parameter set per key (``key_name``), holding the values
    registering one by one would leave: ``first`` fields from the key's first row, the
    others its last non-empty value. Returns the row id per key."""
    params = []
    for key, rows in grouped.items():
        values = dict.fromkeys(rows[0])
        values.update(_last_given(rows))
        values.update({name: rows[0][name] for name in first})
        params.append({key_name: key, **values, **(fixed or {})})
    return dict(connection.execute(statement, params).tuples().all())


def _upsert_patients(
    session: Session,
    statements: _RegisterStatements,
    records: Sequence[InstanceRecord],
    keys: Sequence[str],
    now: datetime,
) -> dict[str, int]:
    demographics = _group(
        keys,
        [
            {
                "patient_name": r.patient_name or None,
                "birth_date": r.patient_birth_date,
                "sex": r.patient_sex or None,
            }
            for r in records
        ],
    )
    wanted = {key: _last_given(rows) for key, rows in demographics.items()}
    params = [
        {
            "patient_key": key,
            "created_at": now,
            "patient_name": None,
            "birth_date": None,
            "sex": None,
            **values,
        }
        for key, values in wanted.items()
    ]
    ids: dict[str, int] = dict(
        session.connection().execute(statements.patient, params).tuples().all()
    )
    known = [key for key in wanted if key not in ids]
    if not known:
        return ids
    rows = session.execute(
        select(
            Patient.patient_key, Patient.id, Patient.patient_name, Patient.birth_date, Patient.sex
        ).where(Patient.patient_key.in_(known))
    ).all()
    for row in rows:
        ids[row.patient_key] = row.id
        # Refresh demographics with any non-empty value that differs (rare).
        changes = {
            name: value
            for name, value in wanted[row.patient_key].items()
            if value != getattr(row, name)
        }
        if changes:
            session.execute(
                update(Patient)
                .where(Patient.id == row.id)
                .values(**changes)
                .execution_options(**_no_sync())
            )
    return ids


def _upsert_instances(
    session: Session,
    statements: _RegisterStatements,
    records: Sequence[InstanceRecord],
    study_ids: dict[str, int],
    series_ids: dict[str, int],
    now: datetime,
) -> list[RegisterOutcome]:
    file_values: dict[str, dict[str, object]] = {
        rec.sop_instance_uid: {
            "series_id": series_ids[rec.series_instance_uid],
            "study_id": study_ids[rec.study_instance_uid],
            "sop_class_uid": rec.sop_class_uid,
            "transfer_syntax_uid": rec.transfer_syntax_uid,
            "number_of_frames": rec.number_of_frames,
            "spool_path": rec.spool_path,
            "sha256": rec.sha256,
            "size_bytes": rec.size_bytes,
        }
        for rec in records
    }
    uids = sorted(file_values)
    params = [
        {
            "sop_instance_uid": uid,
            "state": "received",
            "received_count": 1,
            "received_at": now,
            "updated_at": now,
            "attempts": 0,
            **file_values[uid],
        }
        for uid in uids
    ]
    new_ids: dict[str, int] = dict(
        session.connection().execute(statements.instance, params).tuples().all()
    )
    outcomes = {
        uid: RegisterOutcome(instance_id=iid, outcome="new", state="received")
        for uid, iid in new_ids.items()
    }
    known = [uid for uid in uids if uid not in new_ids]
    if known:
        outcomes.update(_register_known(session, known, file_values, now))
    return [outcomes[rec.sop_instance_uid] for rec in records]


def _register_known(
    session: Session,
    uids: Sequence[str],
    file_values: dict[str, dict[str, object]],
    now: datetime,
) -> dict[str, RegisterOutcome]:
    """Count re-sent identical instances; replace the ones whose bytes changed."""
    # The row locks (PostgreSQL) or the write lock already held (SQLite) keep a
    # concurrent registration of the same UIDs out until commit.
    existing = session.execute(
        select(Instance.sop_instance_uid, Instance.id, Instance.sha256, Instance.state)
        .where(Instance.sop_instance_uid.in_(uids))
        .order_by(Instance.sop_instance_uid)
        .with_for_update()
    ).all()
    outcomes: dict[str, RegisterOutcome] = {}
    duplicate_ids: list[int] = []
    for row in existing:
        values = file_values[row.sop_instance_uid]
        if row.sha256 == values["sha256"]:
            duplicate_ids.append(row.id)
            outcomes[row.sop_instance_uid] = RegisterOutcome(row.id, "duplicate", row.state)
            continue
        session.execute(
            update(Instance)
            .where(Instance.id == row.id)
            .values(
                state="received",
                reason=None,
                claim_token=None,
                claimed_at=None,
                claimed_by=None,
                attempts=0,
                received_count=Instance.received_count + 1,
                received_at=now,
                updated_at=now,
                **values,
            )
            .execution_options(**_no_sync())
        )
        outcomes[row.sop_instance_uid] = RegisterOutcome(row.id, "replaced", "received")
    if duplicate_ids:
        session.execute(
            update(Instance)
            .where(Instance.id.in_(duplicate_ids))
            .values(received_count=Instance.received_count + 1)
            .execution_options(**_no_sync())
        )
    return outcomes


def record_rejection(
    session: Session,
    sop_instance_uid: str | None,
    calling_ae_title: str,
    reason: str,
    dimse_status: int,
    now: datetime | None = None,
) -> int:
    """Store an instance refused at C-STORE and return the rejection's id.

    ``reason`` must not contain patient data (it is shown in status output).
    """
    return session.execute(
        insert(Rejection)
        .values(
            sop_instance_uid=sop_instance_uid or None,
            calling_ae_title=calling_ae_title,
            reason=reason,
            dimse_status=dimse_status,
            received_at=_now(now),
        )
        .returning(Rejection.id)
    ).scalar_one()


def known_instance(session: Session, sop_instance_uid: str) -> KnownInstance | None:
    """Return (id, sha256, state) of a registered instance, or None if unknown."""
    row = session.execute(
        select(Instance.id, Instance.sha256, Instance.state).where(
            Instance.sop_instance_uid == sop_instance_uid
        )
    ).one_or_none()
    return None if row is None else KnownInstance(row.id, row.sha256, row.state)


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


def save_predictions(
    session: Session,
    predictions: Sequence[PredictionRecord],
    token: str | None,
    now: datetime | None = None,
) -> int:
    """Store predictions, mark their instances ``predicted``; return predictions stored.

    With ``token``, an instance counts only while this worker still holds its
    claim (state ``processing``, same token); predictions for any other
    instance are skipped — another worker owns it now, or its bytes were
    replaced. With ``token=None`` (a rescore) every given instance counts.

    Give all frames of an instance in one call: each (instance, model version)
    pair written here ends up with exactly the given frames (upsert on
    instance, frame and version; frames no longer given are removed), so a
    re-run writes the same rows, never new ones. The studies of the applied
    instances are marked ``needs_finalise``.
    """
    if not predictions:
        return 0
    now = _now(now)
    instance_ids = sorted({p.instance_id for p in predictions})
    conditions: list[ColumnElement[bool]] = [Instance.id.in_(instance_ids)]
    if token is not None:
        conditions += [Instance.state == "processing", Instance.claim_token == token]
    study_ids = sorted(
        session.execute(select(Instance.study_id).where(*conditions).distinct()).scalars()
    )
    if not study_ids:
        return 0
    # Studies are written before instances, the order register_instance locks
    # them in, so the two can never deadlock on PostgreSQL. The epoch tells a
    # finaliser reading this study right now that its result is already stale.
    # Marking a study whose instance turns out to be owned by someone else
    # only costs an extra (idempotent) finalisation.
    session.execute(
        update(Study)
        .where(Study.id.in_(study_ids))
        .values(
            needs_finalise=True,
            last_predicted_at=now,
            prediction_epoch=Study.prediction_epoch + 1,
        )
        .execution_options(**_no_sync())
    )
    # The claim is checked again under the instance rows' locks.
    applied = session.execute(
        update(Instance)
        .where(*conditions)
        .values(state="predicted", reason=None, updated_at=now, **_UNCLAIMED)
        .returning(Instance.id)
        .execution_options(**_no_sync())
    ).all()
    owned = {row.id for row in applied}
    # One row per key: PostgreSQL refuses an upsert that touches a row twice.
    unique = {(p.instance_id, p.frame_index, p.model_version): p for p in predictions}
    kept = [p for p in unique.values() if p.instance_id in owned]
    if not kept:
        return 0

    frames: dict[tuple[int, str], set[int]] = {}
    for p in kept:
        frames.setdefault((p.instance_id, p.model_version), set()).add(p.frame_index)
    for (instance_id, version), indexes in frames.items():
        session.execute(
            delete(Prediction)
            .where(
                Prediction.instance_id == instance_id,
                Prediction.model_version == version,
                Prediction.frame_index.not_in(indexes),
            )
            .execution_options(**_no_sync())
        )

    ins = _insert(session, Prediction)
    session.execute(
        ins.values(
            [
                {
                    "instance_id": p.instance_id,
                    "frame_index": p.frame_index,
                    "model_version": p.model_version,
                    "label": p.label,
                    "probability": float(p.probability),
                    "probabilities": {k: float(v) for k, v in p.probabilities.items()},
                    "latency_ms": p.latency_ms,
                    "created_at": now,
                }
                for p in kept
            ]
        ).on_conflict_do_update(
            index_elements=[
                Prediction.instance_id,
                Prediction.frame_index,
                Prediction.model_version,
            ],
            set_={
                "label": ins.excluded.label,
                "probability": ins.excluded.probability,
                "probabilities": ins.excluded.probabilities,
                "latency_ms": ins.excluded.latency_ms,
                "created_at": ins.excluded.created_at,
            },
        )
    )

    return len(kept)


def instance_counts(session: Session) -> dict[str, int]:
    """Number of instances in each state; every state is present, zero or not."""
    counts = dict.fromkeys(INSTANCE_STATES, 0)
    for state, count in session.execute(
        select(Instance.state, func.count()).group_by(Instance.state)
    ).all():
        counts[state] = count
    return counts


def rejection_counts(session: Session) -> dict[str, int]:
    """Number of instances refused at C-STORE, by reason."""
    query = select(Rejection.reason, func.count()).group_by(Rejection.reason)
    return {reason: int(count) for reason, count in session.execute(query).tuples()}
