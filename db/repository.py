"""Repository functions: the only way the rest of thyrocad reads and writes the database.

Every function takes a ``Session`` first, accepts and returns plain records
(``db.records``), and never commits: the caller owns the transaction. Times
default to "now" in UTC and can be injected (``now=``) for tests; naive
datetimes are refused.

Concurrency, on both backends:

* upserts go through ``INSERT … ON CONFLICT`` on natural keys, so two
  processes registering the same instance cannot create two rows;
* functions that read-then-write start with a write to the row that guards
  the decision (PostgreSQL: that row's lock; SQLite: the database write lock,
  which pysqlite takes at the first write of a transaction), so the read
  that follows sees every committed change and no other writer can interleave;
* rows are locked in one order everywhere — patient, study, series, instance —
  so PostgreSQL transactions of the listener and the workers cannot deadlock;
* ``claim_instances`` is one ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP
  LOCKED) RETURNING``: concurrent PostgreSQL workers skip each other's rows,
  and SQLite serialises the statement under its write lock.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from db.errors import RepositoryError
from db.records import (
    ClaimedInstance,
    ImagePrediction,
    InstanceRecord,
    KnownInstance,
    LabelRecord,
    ModelVersionRecord,
    PatientPredictions,
    PredictionRecord,
    RegisterOutcome,
    ResultRecord,
    StudyPredictions,
)
from db.schema import (
    INSTANCE_STATES,
    MODEL_STATUSES,
    Holdout,
    Instance,
    Label,
    ModelVersion,
    Patient,
    PatientResultRow,
    Prediction,
    Rejection,
    Series,
    Study,
    StudyResultRow,
    patient_key_for,
)

__all__ = [
    "RepositoryError",
    "active_model",
    "add_label",
    "claim_instances",
    "decide_holdout",
    "instance_counts",
    "instances_to_requeue",
    "known_instance",
    "label_history",
    "latest_labels",
    "list_model_versions",
    "mark_failed",
    "mark_queued",
    "mark_rejected",
    "patient_predictions",
    "record_rejection",
    "register_instance",
    "rejection_counts",
    "release_claim",
    "results",
    "save_patient_result",
    "save_predictions",
    "save_study_result",
    "set_active_model",
    "set_model_status",
    "studies_to_finalise",
    "study_predictions",
    "upsert_model_version",
]

# Instances a worker may still pick up; 'processing' joins them when its lease ends.
PENDING_STATES: tuple[str, ...] = ("received", "queued")
# Not yet settled: a study with one of these is not finalised yet.
UNSETTLED_STATES: tuple[str, ...] = ("received", "queued", "processing")


# --------------------------------------------------------------------------- helpers


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now


def _insert(session: Session, table: Any) -> Any:
    """The dialect's own INSERT, which has ``on_conflict_do_*``."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise RepositoryError(f"unsupported database backend {dialect!r}")


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _no_sync() -> dict[str, Any]:
    # Bulk statements: no ORM objects of these rows live in the session.
    return {"synchronize_session": False}


# --------------------------------------------------------------------------- receiving


def register_instance(
    session: Session, rec: InstanceRecord, now: datetime | None = None
) -> RegisterOutcome:
    """Record a spooled instance with its patient, study and series.

    Keyed by SOP Instance UID: a new UID is stored in state ``received``
    (outcome ``new``); the same UID with the same sha256 only increments
    ``received_count`` (``duplicate``, state unchanged); the same UID with a
    different sha256 takes the new file, goes back to ``received`` with its
    reason and claim cleared (``replaced``) — its old predictions stay as
    history and are overwritten when the same model version predicts again.
    Demographics are refreshed with any non-empty new value; a study keeps
    the patient it was first registered under.
    """
    now = _now(now)
    patient_key = patient_key_for(rec.patient_key, rec.study_instance_uid)

    demographics = {
        "patient_name": rec.patient_name or None,
        "birth_date": rec.patient_birth_date,
        "sex": rec.patient_sex or None,
    }
    # DO NOTHING rather than DO UPDATE: an upsert would lock the patient row on
    # every image, and a finaliser holding it would then stall the listener.
    patient_id = session.execute(
        _insert(session, Patient)
        .values(patient_key=patient_key, created_at=now, **demographics)
        .on_conflict_do_nothing(index_elements=[Patient.patient_key])
        .returning(Patient.id)
    ).scalar_one_or_none()
    if patient_id is None:
        known = session.execute(
            select(Patient.id, Patient.patient_name, Patient.birth_date, Patient.sex).where(
                Patient.patient_key == patient_key
            )
        ).one()
        patient_id = known.id
        # Refresh demographics with any non-empty value that differs (rare).
        changes = {
            name: value
            for name, value in demographics.items()
            if value is not None and value != getattr(known, name)
        }
        if changes:
            session.execute(
                update(Patient)
                .where(Patient.id == patient_id)
                .values(**changes)
                .execution_options(**_no_sync())
            )

    ins = _insert(session, Study)
    study_id = session.execute(
        ins.values(
            study_instance_uid=rec.study_instance_uid,
            patient_id=patient_id,
            study_date=rec.study_date,
            accession_number=rec.accession_number or None,
            description=rec.study_description or None,
            first_received_at=now,
            last_received_at=now,
            needs_finalise=False,
            prediction_epoch=0,
        )
        .on_conflict_do_update(
            index_elements=[Study.study_instance_uid],
            set_={
                "last_received_at": ins.excluded.last_received_at,
                "study_date": func.coalesce(ins.excluded.study_date, Study.study_date),
                "accession_number": func.coalesce(
                    ins.excluded.accession_number, Study.accession_number
                ),
                "description": func.coalesce(ins.excluded.description, Study.description),
            },
        )
        .returning(Study.id)
    ).scalar_one()

    ins = _insert(session, Series)
    series_id = session.execute(
        ins.values(
            series_instance_uid=rec.series_instance_uid,
            study_id=study_id,
            modality=rec.modality or None,
            description=rec.series_description or None,
        )
        .on_conflict_do_update(
            index_elements=[Series.series_instance_uid],
            set_={
                "modality": func.coalesce(ins.excluded.modality, Series.modality),
                "description": func.coalesce(ins.excluded.description, Series.description),
            },
        )
        .returning(Series.id)
    ).scalar_one()

    file_values = {
        "series_id": series_id,
        "study_id": study_id,
        "sop_class_uid": rec.sop_class_uid,
        "transfer_syntax_uid": rec.transfer_syntax_uid,
        "number_of_frames": rec.number_of_frames,
        "spool_path": rec.spool_path,
        "sha256": rec.sha256,
        "size_bytes": rec.size_bytes,
    }
    new_id = session.execute(
        _insert(session, Instance)
        .values(
            sop_instance_uid=rec.sop_instance_uid,
            state="received",
            received_count=1,
            received_at=now,
            updated_at=now,
            attempts=0,
            **file_values,
        )
        .on_conflict_do_nothing(index_elements=[Instance.sop_instance_uid])
        .returning(Instance.id)
    ).scalar_one_or_none()
    if new_id is not None:
        return RegisterOutcome(instance_id=new_id, outcome="new", state="received")

    # Known UID. The row lock (PostgreSQL) or the write lock already held
    # (SQLite) keeps a concurrent registration of the same UID out until commit.
    existing = session.execute(
        select(Instance.id, Instance.sha256, Instance.state)
        .where(Instance.sop_instance_uid == rec.sop_instance_uid)
        .with_for_update()
    ).one()
    if existing.sha256 == rec.sha256:
        session.execute(
            update(Instance)
            .where(Instance.id == existing.id)
            .values(received_count=Instance.received_count + 1)
            .execution_options(**_no_sync())
        )
        return RegisterOutcome(instance_id=existing.id, outcome="duplicate", state=existing.state)

    session.execute(
        update(Instance)
        .where(Instance.id == existing.id)
        .values(
            state="received",
            reason=None,
            claim_token=None,
            claimed_at=None,
            attempts=0,
            received_count=Instance.received_count + 1,
            received_at=now,
            updated_at=now,
            **file_values,
        )
        .execution_options(**_no_sync())
    )
    return RegisterOutcome(instance_id=existing.id, outcome="replaced", state="received")


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


# --------------------------------------------------------------------------- queueing


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
) -> list[ClaimedInstance]:
    """Take up to ``limit`` instances for this worker, oldest received first.

    Claimable: ``received`` and ``queued`` rows, and ``processing`` rows whose
    lease (``claimed_at`` older than ``lease_seconds``) ran out because their
    worker died. They become ``processing`` with ``claim_token=token``,
    ``claimed_at=now`` and one more attempt. ``only_ids`` restricts the claim
    to the ids a task carries. With ``max_attempts``, claimable rows that
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
        .values(
            state="queued", claim_token=None, claimed_at=None, reason=reason, updated_at=_now(now)
        )
        .execution_options(**_no_sync())
    )
    return cast(int, result.rowcount)  # type: ignore[attr-defined]


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
    result = session.execute(
        update(Instance)
        .where(*conditions)
        .values(state=state, reason=reason, claim_token=None, claimed_at=None, updated_at=_now(now))
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
) -> list[int]:
    """Ids the reconciler should queue again, oldest first.

    ``received``/``queued`` rows not updated for ``stale_seconds`` (their task
    was lost, e.g. the broker was down) and ``processing`` rows whose lease
    (``lease_seconds``, default ``stale_seconds``) ran out (their worker died).
    """
    now = _now(now)
    stale_cutoff = now - timedelta(seconds=stale_seconds)
    lease_cutoff = now - timedelta(
        seconds=stale_seconds if lease_seconds is None else lease_seconds
    )
    return list(
        session.execute(
            select(Instance.id)
            .where(
                or_(
                    and_(Instance.state.in_(PENDING_STATES), Instance.updated_at < stale_cutoff),
                    and_(Instance.state == "processing", Instance.claimed_at < lease_cutoff),
                )
            )
            .order_by(Instance.received_at, Instance.id)
        ).scalars()
    )


# --------------------------------------------------------------------------- predictions


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
        .values(state="predicted", reason=None, claim_token=None, claimed_at=None, updated_at=now)
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


# --------------------------------------------------------------------------- finalisation


def studies_to_finalise(
    session: Session, idle_seconds: float, now: datetime | None = None
) -> list[int]:
    """Ids of studies to aggregate now, least recently active first.

    A study qualifies when a prediction arrived since its last result
    (``needs_finalise``), nothing was received or predicted for
    ``idle_seconds``, and none of its instances is still waiting for or in
    inference — so a result is computed once over the whole study, and a
    late image later simply produces a new revision.
    """
    cutoff = _now(now) - timedelta(seconds=idle_seconds)
    unsettled = exists().where(Instance.study_id == Study.id, Instance.state.in_(UNSETTLED_STATES))
    return list(
        session.execute(
            select(Study.id)
            .where(
                Study.needs_finalise.is_(True),
                Study.last_received_at < cutoff,
                or_(Study.last_predicted_at.is_(None), Study.last_predicted_at < cutoff),
                ~unsettled,
            )
            .order_by(Study.last_received_at, Study.id)
        ).scalars()
    )


def _default_version(session: Session, scope: Any) -> str | None:
    """The active model's version, else the version of the newest prediction in scope."""
    active = session.execute(
        select(ModelVersion.version).where(ModelVersion.status == "active")
    ).scalar_one_or_none()
    if active is not None:
        return active
    return session.execute(
        select(Prediction.model_version)
        .join(Instance, Instance.id == Prediction.instance_id)
        .where(scope)
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def _image_predictions(
    session: Session, scope: Any, version: str | None
) -> tuple[ImagePrediction, ...]:
    if version is None:
        return ()
    rows = session.execute(
        select(
            Prediction.instance_id,
            Instance.sop_instance_uid,
            Prediction.frame_index,
            Prediction.label,
            Prediction.probability,
            Prediction.probabilities,
            Prediction.created_at,
        )
        .join(Instance, Instance.id == Prediction.instance_id)
        # Only instances whose current bytes were predicted: a replaced file
        # waiting for inference must not be aggregated from its old pixels.
        .where(scope, Instance.state == "predicted", Prediction.model_version == version)
        .order_by(Instance.received_at, Instance.id, Prediction.frame_index)
    ).all()
    return tuple(
        ImagePrediction(
            instance_id=row.instance_id,
            sop_instance_uid=row.sop_instance_uid,
            frame_index=row.frame_index,
            label=row.label,
            probability=row.probability,
            probabilities=dict(row.probabilities),
            created_at=row.created_at,
        )
        for row in rows
    )


def study_predictions(
    session: Session, study_id: int, model_version: str | None = None
) -> StudyPredictions:
    """Every current image prediction of a study under one model version.

    The version defaults to the active model, or, with none active, to the
    version of the study's newest prediction. Raises ``RepositoryError`` for
    an unknown study.
    """
    # The epoch is read before the predictions, so a prediction landing in
    # between can only make the epoch look older, never newer (see save_study_result).
    study = session.execute(
        select(
            Study.study_instance_uid,
            Study.prediction_epoch,
            Study.patient_id,
            Patient.patient_key,
        )
        .join(Patient, Patient.id == Study.patient_id)
        .where(Study.id == study_id)
    ).one_or_none()
    if study is None:
        raise RepositoryError(f"no study with id {study_id}")
    scope = Instance.study_id == study_id
    version = model_version or _default_version(session, scope)
    return StudyPredictions(
        study_id=study_id,
        study_instance_uid=study.study_instance_uid,
        patient_id=study.patient_id,
        patient_key=study.patient_key,
        model_version=version,
        epoch=study.prediction_epoch,
        images=_image_predictions(session, scope, version),
    )


def patient_predictions(
    session: Session, patient_id: int, model_version: str | None = None
) -> PatientPredictions:
    """Every current image prediction of all studies of a patient under one version.

    Version default as in ``study_predictions``. ``study_count`` counts the
    studies that contribute at least one image. Raises ``RepositoryError``
    for an unknown patient.
    """
    patient_key = session.execute(
        select(Patient.patient_key).where(Patient.id == patient_id)
    ).scalar_one_or_none()
    if patient_key is None:
        raise RepositoryError(f"no patient with id {patient_id}")
    scope = Instance.study_id.in_(select(Study.id).where(Study.patient_id == patient_id))
    version = model_version or _default_version(session, scope)
    images = _image_predictions(session, scope, version)
    study_count = 0
    if images:
        study_count = session.execute(
            select(func.count(func.distinct(Instance.study_id))).where(
                Instance.id.in_({image.instance_id for image in images})
            )
        ).scalar_one()
    return PatientPredictions(
        patient_id=patient_id,
        patient_key=patient_key,
        model_version=version,
        study_count=study_count,
        images=images,
    )


def _same_result(row: Any, values: dict[str, Any]) -> bool:
    return bool(
        row is not None and all(getattr(row, name) == value for name, value in values.items())
    )


def save_study_result(
    session: Session,
    study_id: int,
    model_version: str,
    rule: str,
    label: str,
    probability: float,
    probabilities: dict[str, float],
    image_count: int,
    now: datetime | None = None,
    epoch: int | None = None,
) -> ResultRecord:
    """Store a study result as a new revision (1, 2, …) and mark the study finalised.

    Idempotent: a result identical to the latest revision (same version, rule,
    label, probability, probabilities and image count) returns that revision
    instead of adding one. Old revisions are kept.

    ``needs_finalise`` is cleared only if no prediction arrived since the
    caller read ``StudyPredictions.epoch`` (pass it as ``epoch``); otherwise
    the study stays marked and is finalised again. ``epoch=None`` clears it
    unconditionally. Raises ``RepositoryError`` for an unknown study.
    """
    now = _now(now)
    owner = session.execute(
        select(Study.patient_id).where(Study.id == study_id)
    ).scalar_one_or_none()
    if owner is None:
        raise RepositoryError(f"no study with id {study_id}")
    # Lock order patient → study, as everywhere (see the module docstring), so
    # a finaliser that saves the patient result in the same transaction never
    # deadlocks with the listener. SQLite ignores FOR UPDATE; its write lock
    # is taken by the UPDATE below.
    patient_key = session.execute(
        select(Patient.patient_key).where(Patient.id == owner).with_for_update()
    ).scalar_one()
    # Writing the study row serialises concurrent finalisers of this study.
    still_needed: Any = False
    if epoch is not None:
        still_needed = case((Study.prediction_epoch == epoch, False), else_=Study.needs_finalise)
    study_uid = session.execute(
        update(Study)
        .where(Study.id == study_id)
        .values(finalised_at=now, needs_finalise=still_needed)
        .returning(Study.study_instance_uid)
        .execution_options(**_no_sync())
    ).scalar_one()
    values = {
        "model_version": model_version,
        "rule": rule,
        "label": label,
        "probability": float(probability),
        "probabilities": {k: float(v) for k, v in probabilities.items()},
        "image_count": image_count,
    }
    latest = session.execute(
        select(StudyResultRow)
        .where(StudyResultRow.study_id == study_id)
        .order_by(StudyResultRow.revision.desc())
        .limit(1)
    ).scalar_one_or_none()
    if latest is None or not _same_result(latest, values):
        revision = 1 if latest is None else latest.revision + 1
        latest = session.execute(
            insert(StudyResultRow)
            .values(study_id=study_id, revision=revision, created_at=now, **values)
            .returning(StudyResultRow)
        ).scalar_one()
    return _result_record(latest, "study", study_uid, patient_key, None)


def save_patient_result(
    session: Session,
    patient_id: int,
    model_version: str,
    rule: str,
    label: str,
    probability: float,
    probabilities: dict[str, float],
    image_count: int,
    study_count: int,
    now: datetime | None = None,
) -> ResultRecord:
    """Store a patient result as a new revision, idempotently as ``save_study_result``.

    Raises ``RepositoryError`` for an unknown patient.
    """
    now = _now(now)
    found = session.execute(
        update(Patient)
        .where(Patient.id == patient_id)
        .values(finalised_at=now)
        .returning(Patient.patient_key)
        .execution_options(**_no_sync())
    ).scalar_one_or_none()
    if found is None:
        raise RepositoryError(f"no patient with id {patient_id}")
    values = {
        "model_version": model_version,
        "rule": rule,
        "label": label,
        "probability": float(probability),
        "probabilities": {k: float(v) for k, v in probabilities.items()},
        "image_count": image_count,
        "study_count": study_count,
    }
    latest = session.execute(
        select(PatientResultRow)
        .where(PatientResultRow.patient_id == patient_id)
        .order_by(PatientResultRow.revision.desc())
        .limit(1)
    ).scalar_one_or_none()
    if latest is None or not _same_result(latest, values):
        revision = 1 if latest is None else latest.revision + 1
        latest = session.execute(
            insert(PatientResultRow)
            .values(patient_id=patient_id, revision=revision, created_at=now, **values)
            .returning(PatientResultRow)
        ).scalar_one()
    return _result_record(latest, "patient", found, found, latest.study_count)


def _result_record(
    row: StudyResultRow | PatientResultRow,
    level: str,
    key: str,
    patient_key: str,
    study_count: int | None,
) -> ResultRecord:
    return ResultRecord(
        id=row.id,
        level="study" if level == "study" else "patient",
        key=key,
        patient_key=patient_key,
        model_version=row.model_version,
        rule=row.rule,
        label=row.label,
        probability=row.probability,
        probabilities=dict(row.probabilities),
        image_count=row.image_count,
        revision=row.revision,
        created_at=row.created_at,
        study_count=study_count,
    )


def results(
    session: Session, patient_key: str | None = None, study_uid: str | None = None
) -> list[ResultRecord]:
    """The latest revision of each result, patient first, then their studies by date.

    No filter: every patient and study result. ``patient_key``: that
    patient's result and the results of their studies. ``study_uid``: that
    study's result only. Both: the study's result if it belongs to the patient.
    """
    latest_study = (
        select(func.max(StudyResultRow.revision))
        .where(StudyResultRow.study_id == Study.id)
        .correlate(Study)
        .scalar_subquery()
    )
    study_query = (
        select(StudyResultRow, Study.study_instance_uid, Patient.patient_key, Study.study_date)
        .join(Study, Study.id == StudyResultRow.study_id)
        .join(Patient, Patient.id == Study.patient_id)
        .where(StudyResultRow.revision == latest_study)
    )
    if patient_key is not None:
        study_query = study_query.where(Patient.patient_key == patient_key)
    if study_uid is not None:
        study_query = study_query.where(Study.study_instance_uid == study_uid)

    found: list[tuple[tuple[Any, ...], ResultRecord]] = []
    for row, uid, key, study_date in session.execute(study_query).all():
        order = (key, 1, study_date.isoformat() if study_date else "", uid)
        found.append((order, _result_record(row, "study", uid, key, None)))

    if study_uid is None:
        latest_patient = (
            select(func.max(PatientResultRow.revision))
            .where(PatientResultRow.patient_id == Patient.id)
            .correlate(Patient)
            .scalar_subquery()
        )
        patient_query = (
            select(PatientResultRow, Patient.patient_key)
            .join(Patient, Patient.id == PatientResultRow.patient_id)
            .where(PatientResultRow.revision == latest_patient)
        )
        if patient_key is not None:
            patient_query = patient_query.where(Patient.patient_key == patient_key)
        for prow, key in session.execute(patient_query).all():
            found.append(
                ((key, 0, "", ""), _result_record(prow, "patient", key, key, prow.study_count))
            )
    found.sort(key=lambda item: item[0])
    return [record for _, record in found]


# --------------------------------------------------------------------------- status


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


# --------------------------------------------------------------------------- model versions


def _model_record(row: ModelVersion) -> ModelVersionRecord:
    return ModelVersionRecord(
        version=row.version,
        architecture=row.architecture,
        classes=tuple(row.classes),
        input_size=row.input_size,
        artifact_path=row.artifact_path,
        status=row.status,
        metrics=dict(row.metrics),
        data_fingerprint=row.data_fingerprint,
        status_reason=row.status_reason,
        created_at=row.created_at,
        promoted_at=row.promoted_at,
    )


def _model_row(session: Session, version: str) -> ModelVersion:
    # populate_existing: the bulk UPDATEs here bypass the identity map.
    row = session.execute(
        select(ModelVersion)
        .where(ModelVersion.version == version)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if row is None:
        raise RepositoryError(f"unknown model version {version!r}; register it first")
    return row


def upsert_model_version(
    session: Session, rec: ModelVersionRecord, now: datetime | None = None
) -> ModelVersionRecord:
    """Register a model version, or refresh the metadata of a known one.

    The status of a known version is left alone (it changes only through
    ``set_active_model`` and ``set_model_status``); a new version gets
    ``rec.status``, which may not be ``active`` — promote with
    ``set_active_model`` so that the previous active version is retired.
    """
    if rec.status not in MODEL_STATUSES:
        raise RepositoryError(f"unknown model status {rec.status!r}")
    if rec.status == "active":
        raise RepositoryError("register the version first, then promote it with set_active_model")
    now = _now(now)
    ins = _insert(session, ModelVersion)
    metadata = {
        "architecture": rec.architecture,
        "classes": list(rec.classes),
        "input_size": rec.input_size,
        "artifact_path": rec.artifact_path,
        "metrics": dict(rec.metrics),
        "data_fingerprint": rec.data_fingerprint,
    }
    session.execute(
        ins.values(
            version=rec.version,
            status=rec.status,
            status_reason=rec.status_reason,
            created_at=rec.created_at or now,
            promoted_at=None,
            **metadata,
        ).on_conflict_do_update(
            index_elements=[ModelVersion.version],
            set_={name: getattr(ins.excluded, name) for name in metadata},
        )
    )
    session.flush()
    return _model_record(_model_row(session, rec.version))


def set_active_model(
    session: Session, version: str, now: datetime | None = None
) -> ModelVersionRecord:
    """Make ``version`` the one active model; the previous active one becomes ``retired``.

    Raises ``RepositoryError`` for an unknown version. A no-op if already active.
    """
    now = _now(now)
    if _is_postgresql(session):
        # Promotions are rare; a table lock makes two concurrent ones queue up
        # instead of one failing on the one-active index.
        session.execute(text("LOCK TABLE model_versions IN SHARE ROW EXCLUSIVE MODE"))
    target = _model_row(session, version)
    if target.status != "active":
        # Retire first: the partial unique index allows one active row at any moment.
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.status == "active")
            .values(status="retired", status_reason=f"replaced by {version}")
            .execution_options(**_no_sync())
        )
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.version == version)
            .values(status="active", status_reason=None, promoted_at=now)
            .execution_options(**_no_sync())
        )
    return _model_record(_model_row(session, version))


def set_model_status(
    session: Session, version: str, status: str, reason: str | None = None
) -> ModelVersionRecord:
    """Set a version to ``candidate``, ``retired`` or ``rejected`` with a reason.

    Use ``set_active_model`` to activate. Raises ``RepositoryError`` for an
    unknown version or status.
    """
    if status not in MODEL_STATUSES or status == "active":
        raise RepositoryError(f"status must be one of candidate, retired, rejected; got {status!r}")
    _model_row(session, version)
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.version == version)
        .values(status=status, status_reason=reason)
        .execution_options(**_no_sync())
    )
    return _model_record(_model_row(session, version))


def active_model(session: Session) -> ModelVersionRecord | None:
    """The active model version, or None if none is active."""
    row = session.execute(
        select(ModelVersion).where(ModelVersion.status == "active")
    ).scalar_one_or_none()
    return None if row is None else _model_record(row)


def list_model_versions(session: Session) -> list[ModelVersionRecord]:
    """Every registered model version, oldest first."""
    rows = session.execute(
        select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.id)
    ).scalars()
    return [_model_record(row) for row in rows]


# --------------------------------------------------------------------------- labels


def add_label(
    session: Session,
    *,
    study_uid: str | None = None,
    patient_key: str | None = None,
    diagnosis: str,
    labelled_by: str,
    source: str,
    note: str | None = None,
    now: datetime | None = None,
    allowed_diagnoses: Collection[str] | None = None,
) -> int:
    """Add a ground-truth label to a study or a patient; return the label's id.

    Exactly one of ``study_uid`` and ``patient_key`` must be given. A changed
    label is a new row: the latest wins, history is kept. With
    ``allowed_diagnoses`` (e.g. the active model's classes) any other name is
    refused. Raises ``RepositoryError`` for all of these and for an unknown
    study or patient.
    """
    if (study_uid is None) == (patient_key is None):
        raise RepositoryError("give exactly one of a study UID and a patient key")
    if not diagnosis:
        raise RepositoryError("a label needs a diagnosis")
    if allowed_diagnoses is not None and diagnosis not in allowed_diagnoses:
        known = ", ".join(sorted(allowed_diagnoses))
        raise RepositoryError(f"unknown diagnosis {diagnosis!r}; known: {known}")
    study_id: int | None = None
    patient_id: int | None = None
    if study_uid is not None:
        study_id = session.execute(
            select(Study.id).where(Study.study_instance_uid == study_uid)
        ).scalar_one_or_none()
        if study_id is None:
            raise RepositoryError(f"unknown study {study_uid!r}")
    else:
        patient_id = session.execute(
            select(Patient.id).where(Patient.patient_key == patient_key)
        ).scalar_one_or_none()
        if patient_id is None:
            # The key is a patient identifier: keep it out of a message that may be logged.
            raise RepositoryError("unknown patient: no patient is registered under that key")
    return session.execute(
        insert(Label)
        .values(
            study_id=study_id,
            patient_id=patient_id,
            diagnosis=diagnosis,
            labelled_by=labelled_by,
            source=source,
            note=note,
            created_at=_now(now),
        )
        .returning(Label.id)
    ).scalar_one()


def _label_query() -> tuple[Any, Any]:
    """Labels with their study UID and owning patient key; returns (query, key column)."""
    study_patient = aliased(Patient)
    own_patient = aliased(Patient)
    key = func.coalesce(study_patient.patient_key, own_patient.patient_key)
    query = (
        select(Label, Study.study_instance_uid, key)
        .outerjoin(Study, Study.id == Label.study_id)
        .outerjoin(study_patient, study_patient.id == Study.patient_id)
        .outerjoin(own_patient, own_patient.id == Label.patient_id)
    )
    return query, key


def _label_record(row: Label, study_uid: str | None, patient_key: str) -> LabelRecord:
    return LabelRecord(
        id=row.id,
        level="study" if row.study_id is not None else "patient",
        key=study_uid if study_uid is not None else patient_key,
        patient_key=patient_key,
        diagnosis=row.diagnosis,
        labelled_by=row.labelled_by,
        source=row.source,
        note=row.note,
        created_at=row.created_at,
    )


def latest_labels(session: Session) -> list[LabelRecord]:
    """The label in force for every labelled study and every labelled patient.

    One record per target (the newest by ``created_at``, then id), ordered by
    patient key, patients before studies. Whether a study label overrides its
    patient's is the caller's rule (the ``study_labels_latest`` view lets the
    study's own label win).
    """
    ranked = (
        select(
            Label.id,
            func.row_number()
            .over(
                partition_by=(Label.study_id, Label.patient_id),
                order_by=(Label.created_at.desc(), Label.id.desc()),
            )
            .label("rn"),
        )
    ).subquery()
    query, _ = _label_query()
    query = query.join(ranked, and_(ranked.c.id == Label.id, ranked.c.rn == 1))
    records = [_label_record(row, uid, key) for row, uid, key in session.execute(query).all()]
    records.sort(key=lambda r: (r.patient_key, r.level != "patient", r.key))
    return records


def label_history(
    session: Session, *, study_uid: str | None = None, patient_key: str | None = None
) -> list[LabelRecord]:
    """Every label of a study or patient (or all labels with no filter), oldest first.

    ``patient_key`` gives the patient's own labels and those of their studies.
    """
    query, key = _label_query()
    if study_uid is not None:
        query = query.where(Study.study_instance_uid == study_uid)
    if patient_key is not None:
        query = query.where(key == patient_key)
    query = query.order_by(Label.created_at, Label.id)
    return [_label_record(row, uid, key) for row, uid, key in session.execute(query).all()]


# --------------------------------------------------------------------------- hold-out


def decide_holdout(
    session: Session, patient_key: str, in_holdout: bool, now: datetime | None = None
) -> bool:
    """Record a patient's hold-out membership once, and return the stored decision.

    The first decision for a patient is final: later calls return it whatever
    ``in_holdout`` they pass, so candidates are always compared on the same
    patients. Raises ``RepositoryError`` for an unknown patient.
    """
    patient_id = session.execute(
        select(Patient.id).where(Patient.patient_key == patient_key)
    ).scalar_one_or_none()
    if patient_id is None:
        raise RepositoryError("unknown patient: no patient is registered under that key")
    session.execute(
        _insert(session, Holdout)
        .values(patient_id=patient_id, in_holdout=in_holdout, decided_at=_now(now))
        .on_conflict_do_nothing(index_elements=[Holdout.patient_id])
    )
    return bool(
        session.execute(
            select(Holdout.in_holdout).where(Holdout.patient_id == patient_id)
        ).scalar_one()
    )


# --------------------------------------------------------------------------- the archive
# Backfill bookkeeping and Structured Report dispatches. The records live here, beside
# the only functions that make them.

# Imported here to keep this section in one place; hoist them with the next tidy-up.
from dataclasses import dataclass as _dataclass  # noqa: E402
from datetime import date  # noqa: E402

from db.schema import SR_DISPATCH_STATUSES, BackfillItem, SrDispatch  # noqa: E402

#: found → requested → received → classified; partial and failed carry a reason and
#: are asked for again by the next run, as are requested/received ones left behind.
BACKFILL_STATES: tuple[str, ...] = (
    "found",
    "requested",
    "received",
    "classified",
    "partial",
    "failed",
)


@_dataclass(frozen=True)
class BackfillItemRecord:
    """One study a backfill listed from an archive, and how far it got."""

    source_aet: str
    study_instance_uid: str
    state: str
    reason: str | None
    requested_at: datetime | None
    received_count: int
    expected_count: int | None
    updated_at: datetime


@_dataclass(frozen=True)
class StudyProgress:
    """What thyrocad holds of one study: registered instances, their states, its result."""

    study_instance_uid: str
    registered: int
    unsettled: int
    predicted: int
    needs_finalise: bool
    result_revision: int | None
    reason: str | None = None

    @property
    def classified(self) -> bool:
        """Every instance settled and the latest predictions are in a study result."""
        return (
            self.registered > 0
            and self.unsettled == 0
            and not self.needs_finalise
            and self.result_revision is not None
        )

    @property
    def unclassifiable(self) -> bool:
        """Every instance settled, none predicted (all rejected or failed)."""
        return self.registered > 0 and self.unsettled == 0 and self.predicted == 0


@_dataclass(frozen=True)
class SrDispatchRecord:
    """A Structured Report of one study result revision, to one destination.

    ``sent_at`` is the time of the last attempt; ``status`` says how it went.
    """

    id: int
    study_result_id: int
    destination: str
    sop_instance_uid: str
    status: str
    dimse_status: int | None
    reason: str | None
    sent_at: datetime | None


@_dataclass(frozen=True)
class ReportImage:
    """One predicted image of a study result, with what an SR needs to reference it."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    number_of_frames: int
    frame_index: int
    label: str
    probability: float
    spool_path: str


@_dataclass(frozen=True)
class ReportSource:
    """Everything a Structured Report of one study result is made from.

    ``images`` are the study's current predictions under the result's model
    version; ``previous_reports`` the SOP Instance UIDs of reports already sent
    (to any destination) for earlier revisions of the same study, oldest first.
    """

    result: ResultRecord
    latest_revision: int
    study_date: date | None
    accession_number: str | None
    study_description: str | None
    patient_name: str | None
    patient_birth_date: date | None
    patient_sex: str | None
    model_architecture: str | None
    images: tuple[ReportImage, ...]
    previous_reports: tuple[str, ...] = ()


def _backfill_record(row: BackfillItem) -> BackfillItemRecord:
    return BackfillItemRecord(
        source_aet=row.source_aet,
        study_instance_uid=row.study_instance_uid,
        state=row.state,
        reason=row.reason,
        requested_at=row.requested_at,
        received_count=row.received_count,
        expected_count=row.expected_count,
        updated_at=row.updated_at,
    )


def upsert_backfill_item(
    session: Session,
    source_aet: str,
    study_instance_uid: str,
    expected_count: int | None,
    now: datetime | None = None,
) -> BackfillItemRecord:
    """Note a study listed by an archive (state ``found`` when new) and return its item.

    A known item keeps its state; ``expected_count`` is refreshed when given.
    """
    now = _now(now)
    ins = _insert(session, BackfillItem)
    row = session.execute(
        ins.values(
            source_aet=source_aet,
            study_instance_uid=study_instance_uid,
            state="found",
            received_count=0,
            expected_count=expected_count,
            updated_at=now,
        )
        .on_conflict_do_update(
            index_elements=[BackfillItem.source_aet, BackfillItem.study_instance_uid],
            set_={
                "expected_count": func.coalesce(
                    ins.excluded.expected_count, BackfillItem.expected_count
                ),
                "updated_at": ins.excluded.updated_at,
            },
        )
        .returning(BackfillItem)
    ).scalar_one()
    return _backfill_record(row)


def set_backfill_state(
    session: Session,
    source_aet: str,
    study_instance_uid: str,
    state: str,
    *,
    reason: str | None = None,
    requested_at: datetime | None = None,
    received_count: int | None = None,
    expected_count: int | None = None,
    now: datetime | None = None,
) -> bool:
    """Move a backfill item to ``state`` with its ``reason`` (None clears it).

    ``requested_at``, ``received_count`` and ``expected_count`` change only
    when given. Returns whether the item exists. Raises ``RepositoryError``
    for an unknown state.
    """
    if state not in BACKFILL_STATES:
        raise RepositoryError(f"unknown backfill state {state!r}")
    values: dict[str, Any] = {"state": state, "reason": reason, "updated_at": _now(now)}
    if requested_at is not None:
        values["requested_at"] = requested_at
    if received_count is not None:
        values["received_count"] = received_count
    if expected_count is not None:
        values["expected_count"] = expected_count
    result = session.execute(
        update(BackfillItem)
        .where(
            BackfillItem.source_aet == source_aet,
            BackfillItem.study_instance_uid == study_instance_uid,
        )
        .values(**values)
        .execution_options(**_no_sync())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def backfill_items(
    session: Session, source_aet: str, study_uids: Collection[str] | None = None
) -> list[BackfillItemRecord]:
    """The backfill items of one archive (optionally only these studies), by study UID."""
    query = select(BackfillItem).where(BackfillItem.source_aet == source_aet)
    if study_uids is not None:
        if not study_uids:
            return []
        query = query.where(BackfillItem.study_instance_uid.in_(list(study_uids)))
    rows = session.execute(query.order_by(BackfillItem.study_instance_uid)).scalars()
    return [_backfill_record(row) for row in rows]


def study_progress(session: Session, study_uids: Collection[str]) -> dict[str, StudyProgress]:
    """Progress of each given study that thyrocad knows, keyed by Study Instance UID."""
    latest = (
        select(func.max(StudyResultRow.revision))
        .where(StudyResultRow.study_id == Study.id)
        .correlate(Study)
        .scalar_subquery()
    )
    unsettled = func.sum(case((Instance.state.in_(UNSETTLED_STATES), 1), else_=0))
    predicted = func.sum(case((Instance.state == "predicted", 1), else_=0))
    found: dict[str, StudyProgress] = {}
    uids = sorted(set(study_uids))
    for start in range(0, len(uids), 500):
        rows = session.execute(
            select(
                Study.study_instance_uid,
                Study.needs_finalise,
                latest.label("revision"),
                func.count(Instance.id).label("registered"),
                unsettled.label("unsettled"),
                predicted.label("predicted"),
                func.max(Instance.reason).label("reason"),
            )
            .outerjoin(Instance, Instance.study_id == Study.id)
            .where(Study.study_instance_uid.in_(uids[start : start + 500]))
            .group_by(Study.id, Study.study_instance_uid, Study.needs_finalise)
        ).all()
        for row in rows:
            found[row.study_instance_uid] = StudyProgress(
                study_instance_uid=row.study_instance_uid,
                registered=int(row.registered or 0),
                unsettled=int(row.unsettled or 0),
                predicted=int(row.predicted or 0),
                needs_finalise=bool(row.needs_finalise),
                result_revision=row.revision,
                reason=row.reason,
            )
    return found


def _dispatch_record(row: SrDispatch) -> SrDispatchRecord:
    return SrDispatchRecord(
        id=row.id,
        study_result_id=row.study_result_id,
        destination=row.destination,
        sop_instance_uid=row.sop_instance_uid,
        status=row.status,
        dimse_status=row.dimse_status,
        reason=row.reason,
        sent_at=row.sent_at,
    )


def sr_dispatch(
    session: Session, study_result_id: int, destination: str
) -> SrDispatchRecord | None:
    """The dispatch of one study result revision to one destination, if any."""
    row = session.execute(
        select(SrDispatch)
        .where(SrDispatch.study_result_id == study_result_id, SrDispatch.destination == destination)
        .order_by(SrDispatch.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    return None if row is None else _dispatch_record(row)


def save_sr_dispatch(
    session: Session,
    study_result_id: int,
    destination: str,
    sop_instance_uid: str,
    status: str,
    *,
    dimse_status: int | None = None,
    reason: str | None = None,
    sent_at: datetime | None = None,
) -> SrDispatchRecord:
    """Create or update the dispatch of a study result revision to a destination.

    One row per (study result, destination): concurrent callers serialise on
    the study result's row. Raises ``RepositoryError`` for an unknown status
    or study result.
    """
    if status not in SR_DISPATCH_STATUSES:
        raise RepositoryError(f"unknown dispatch status {status!r}")
    locked = session.execute(
        select(StudyResultRow.id).where(StudyResultRow.id == study_result_id).with_for_update()
    ).scalar_one_or_none()
    if locked is None:
        raise RepositoryError(f"no study result with id {study_result_id}")
    values = {
        "sop_instance_uid": sop_instance_uid,
        "status": status,
        "dimse_status": dimse_status,
        "reason": reason,
        "sent_at": sent_at,
    }
    existing = sr_dispatch(session, study_result_id, destination)
    if existing is None:
        row_id = session.execute(
            insert(SrDispatch)
            .values(study_result_id=study_result_id, destination=destination, **values)
            .returning(SrDispatch.id)
        ).scalar_one()
    else:
        row_id = existing.id
        session.execute(
            update(SrDispatch)
            .where(SrDispatch.id == row_id)
            .values(**values)
            .execution_options(**_no_sync())
        )
    row = session.execute(
        select(SrDispatch).where(SrDispatch.id == row_id).execution_options(populate_existing=True)
    ).scalar_one()
    return _dispatch_record(row)


def sr_dispatches(
    session: Session, study_result_ids: Collection[int]
) -> dict[int, list[SrDispatchRecord]]:
    """Dispatches of these study results, keyed by study result id, oldest first."""
    if not study_result_ids:
        return {}
    found: dict[int, list[SrDispatchRecord]] = {}
    rows = session.execute(
        select(SrDispatch)
        .where(SrDispatch.study_result_id.in_(list(study_result_ids)))
        .order_by(SrDispatch.id)
    ).scalars()
    for row in rows:
        found.setdefault(row.study_result_id, []).append(_dispatch_record(row))
    return found


def report_source(session: Session, study_result_id: int) -> ReportSource | None:
    """What a Structured Report of this study result needs, or None if there is no such result."""
    found = session.execute(
        select(StudyResultRow, Study, Patient)
        .join(Study, Study.id == StudyResultRow.study_id)
        .join(Patient, Patient.id == Study.patient_id)
        .where(StudyResultRow.id == study_result_id)
    ).one_or_none()
    if found is None:
        return None
    row, study, patient = found
    latest_revision = session.execute(
        select(func.max(StudyResultRow.revision)).where(StudyResultRow.study_id == study.id)
    ).scalar_one()
    architecture = session.execute(
        select(ModelVersion.architecture).where(ModelVersion.version == row.model_version)
    ).scalar_one_or_none()
    images = session.execute(
        select(
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Series.series_instance_uid,
            Instance.number_of_frames,
            Instance.spool_path,
            Prediction.frame_index,
            Prediction.label,
            Prediction.probability,
        )
        .join(Instance, Instance.id == Prediction.instance_id)
        .join(Series, Series.id == Instance.series_id)
        .where(
            Instance.study_id == study.id,
            Instance.state == "predicted",
            Prediction.model_version == row.model_version,
        )
        .order_by(Instance.received_at, Instance.id, Prediction.frame_index)
    ).all()
    previous = session.execute(
        select(SrDispatch.sop_instance_uid)
        .join(StudyResultRow, StudyResultRow.id == SrDispatch.study_result_id)
        .where(
            StudyResultRow.study_id == study.id,
            StudyResultRow.revision < row.revision,
            SrDispatch.status == "sent",
        )
        .order_by(StudyResultRow.revision, SrDispatch.id)
    ).scalars()
    return ReportSource(
        result=_result_record(row, "study", study.study_instance_uid, patient.patient_key, None),
        latest_revision=int(latest_revision),
        study_date=study.study_date,
        accession_number=study.accession_number,
        study_description=study.description,
        patient_name=patient.patient_name,
        patient_birth_date=patient.birth_date,
        patient_sex=patient.sex,
        model_architecture=architecture,
        images=tuple(
            ReportImage(
                sop_instance_uid=i.sop_instance_uid,
                sop_class_uid=i.sop_class_uid,
                series_instance_uid=i.series_instance_uid,
                number_of_frames=int(i.number_of_frames or 1),
                frame_index=int(i.frame_index),
                label=i.label,
                probability=float(i.probability),
                spool_path=i.spool_path,
            )
            for i in images
        ),
        previous_reports=tuple(dict.fromkeys(previous)),
    )
