"""The SQL of continuous learning: labelled images, training runs, hold-out, rescoring.

Written like ``db.repository``: every function takes a ``Session``, returns plain
frozen dataclasses and never commits (the caller owns the transaction). It lives
beside the refit because only the refit and the rescore use it.

One refit at a time: ``training_runs`` has a partial unique index that allows a
single ``running`` row. On PostgreSQL two more locks make it exact and fast:

* :func:`lock_refit_decisions` — a transaction-level advisory lock, so two
  triggers decide "is one running? is there enough new data?" one after the other;
* :func:`hold_run_lock` — a session-level advisory lock held by the process that
  trains, on its own connection, for the whole run. A killed process loses its
  connection and with it the lock, so :func:`close_stale_runs` sees at once that a
  ``running`` row has no owner any more. Other backends fall back to a timeout.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, and_, exists, func, insert, or_, select, text, update
from sqlalchemy.orm import Session, aliased

from thyrocad.db.repository.audit import REFIT, default_actor, record_audit_event
from thyrocad.db.schema import (
    Holdout,
    Instance,
    Label,
    Patient,
    Prediction,
    Study,
    StudyResultRow,
    TrainingRun,
)

# First key of thyrocad's two-key advisory locks ("thcr"); the second is 0 for the
# decision lock and the run id for a run's owner lock.
LOCK_CLASS = 0x74686372
_DECISION_KEY = 0
# Instance states that still wait for (or are in) inference.
_UNSETTLED = ("received", "queued", "processing")


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


# --------------------------------------------------------------------------- training data


@dataclass(frozen=True)
class LabelledImage:
    """One stored instance of a labelled study, with the label in force for the study."""

    instance_id: int
    spool_path: str
    patient_key: str
    study_uid: str
    diagnosis: str


def label_watermark(session: Session) -> int:
    """The newest label id (0 without labels): labels up to it are in a snapshot."""
    return int(session.execute(select(func.coalesce(func.max(Label.id), 0))).scalar_one())


def labelled_images(session: Session) -> list[LabelledImage]:
    """Every non-rejected instance of every labelled study, by patient and study.

    The label in force is the one of the ``study_labels_latest`` view: the study's
    own latest label, otherwise its patient's latest label — the same rule the
    radiologists see.
    """
    rows = session.execute(
        text(
            "SELECT i.id, i.spool_path, v.patient_key, v.study_instance_uid, v.diagnosis"
            " FROM study_labels_latest v"
            " JOIN studies s ON s.study_instance_uid = v.study_instance_uid"
            " JOIN instances i ON i.study_id = s.id"
            " WHERE i.state <> 'rejected'"
            " ORDER BY v.patient_key, v.study_instance_uid, i.received_at, i.id"
        )
    ).all()
    return [LabelledImage(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in rows]


def patients_labelled_after(session: Session, watermark: int) -> set[str]:
    """Keys of the patients who got a label (on them or a study of theirs) after ``watermark``."""
    study_patient = aliased(Patient)
    own_patient = aliased(Patient)
    key = func.coalesce(study_patient.patient_key, own_patient.patient_key)
    query = (
        select(key)
        .select_from(Label)
        .outerjoin(Study, Study.id == Label.study_id)
        .outerjoin(study_patient, study_patient.id == Study.patient_id)
        .outerjoin(own_patient, own_patient.id == Label.patient_id)
        .where(Label.id > watermark)
        .distinct()
    )
    return {str(k) for k in session.execute(query).scalars() if k is not None}


def holdout_decisions(session: Session) -> dict[str, bool]:
    """Patient key → hold-out membership, for every patient decided so far."""
    query = select(Patient.patient_key, Holdout.in_holdout).join(
        Holdout, Holdout.patient_id == Patient.id
    )
    return {str(k): bool(v) for k, v in session.execute(query).tuples()}


# --------------------------------------------------------------------------- training runs


@dataclass(frozen=True)
class TrainingRunRecord:
    """One refit attempt as recorded in ``training_runs``."""

    id: int
    started_at: dt.datetime
    finished_at: dt.datetime | None
    outcome: str
    candidate_version: str | None
    parameters: dict[str, Any]
    data_fingerprint: str | None
    metrics: dict[str, Any] | None
    reason: str | None
    duration_s: float | None


def _run_record(row: TrainingRun) -> TrainingRunRecord:
    return TrainingRunRecord(
        id=row.id,
        started_at=row.started_at,
        finished_at=row.finished_at,
        outcome=row.outcome,
        candidate_version=row.candidate_version,
        parameters=dict(row.parameters or {}),
        data_fingerprint=row.data_fingerprint,
        metrics=None if row.metrics is None else dict(row.metrics),
        reason=row.reason,
        duration_s=row.duration_s,
    )


def lock_refit_decisions(session: Session) -> None:
    """Serialise refit decisions until this transaction ends.

    PostgreSQL: a transaction-level advisory lock. SQLite: a write that changes
    nothing still takes the database write lock, so the reads that follow see every
    committed run and no other decider can interleave. The one-running index is
    the backstop everywhere.
    """
    if _is_postgresql(session):
        session.execute(
            text("SELECT pg_advisory_xact_lock(:c, :k)"), {"c": LOCK_CLASS, "k": _DECISION_KEY}
        )
    else:
        session.execute(text("UPDATE training_runs SET outcome = outcome WHERE 1 = 0"))


def hold_run_lock(engine: Engine, run_id: int) -> Connection | None:
    """Take run ``run_id``'s owner lock on a connection of its own and return it.

    Keep the connection open while the run trains and close it afterwards (that
    releases the lock). None on backends without advisory locks.
    """
    if engine.dialect.name != "postgresql":
        return None
    connection = engine.connect()
    try:
        connection.execute(text("SELECT pg_advisory_lock(:c, :k)"), {"c": LOCK_CLASS, "k": run_id})
        connection.commit()  # a session-level lock outlives the transaction
    except BaseException:
        connection.close()
        raise
    return connection


def _owner_is_gone(session: Session, run_id: int) -> bool:
    """PostgreSQL: whether nobody holds run ``run_id``'s owner lock any more."""
    return bool(
        session.execute(
            text("SELECT pg_try_advisory_xact_lock(:c, :k)"), {"c": LOCK_CLASS, "k": run_id}
        ).scalar_one()
    )


def running_runs(session: Session) -> list[TrainingRunRecord]:
    """The runs recorded as ``running`` (at most one, by the partial unique index)."""
    rows = session.execute(
        select(TrainingRun)
        .where(TrainingRun.outcome == "running")
        .execution_options(populate_existing=True)
    ).scalars()
    return [_run_record(row) for row in rows]


def close_stale_runs(
    session: Session, now: dt.datetime, stale_seconds: float
) -> list[TrainingRunRecord]:
    """Close as ``failed`` every ``running`` run whose process is gone; return them.

    A run is stale when its owner lock is free (PostgreSQL: the process that
    trained it died) or when it started more than ``stale_seconds`` ago. Its
    version, if its artifact was saved at all, was never registered.
    """
    closed: list[TrainingRunRecord] = []
    for run in running_runs(session):
        age = (now - run.started_at).total_seconds()
        if _is_postgresql(session) and _owner_is_gone(session, run.id):
            reason = "abandoned: the process running it ended without finishing (killed?)"
        elif age > stale_seconds:
            reason = f"abandoned: still running after {age:.0f} s (limit {stale_seconds:.0f} s)"
        else:
            continue
        if finish_run(
            session, run.id, "failed", reason, now, duration_s=age, candidate_version=None
        ):
            closed.append(run)
    return closed


def start_run(session: Session, parameters: dict[str, Any], now: dt.datetime) -> int:
    """Record a new ``running`` run and return its id.

    Raises ``sqlalchemy.exc.IntegrityError`` when another run is already running
    (the partial unique index); the caller should roll back and skip.
    """
    return int(
        session.execute(
            insert(TrainingRun)
            .values(started_at=now, outcome="running", parameters=parameters)
            .returning(TrainingRun.id)
        ).scalar_one()
    )


def finish_run(
    session: Session,
    run_id: int,
    outcome: str,
    reason: str | None,
    now: dt.datetime,
    *,
    duration_s: float | None = None,
    candidate_version: str | None = None,
    data_fingerprint: str | None = None,
    metrics: dict[str, Any] | None = None,
    parameters: dict[str, Any] | None = None,
) -> bool:
    """Close a ``running`` run with its outcome; False if it was not running any more.

    A closed run is audited (``refit``) in the same transaction.
    """
    values: dict[str, Any] = {
        "outcome": outcome,
        "reason": reason,
        "finished_at": now,
        "duration_s": duration_s,
        "candidate_version": candidate_version,
        "data_fingerprint": data_fingerprint,
        "metrics": metrics,
    }
    if parameters is not None:
        values["parameters"] = parameters
    result = session.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id, TrainingRun.outcome == "running")
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    closed = bool(result.rowcount)  # type: ignore[attr-defined]
    if closed:
        record_audit_event(
            session,
            REFIT,
            actor=default_actor(),
            outcome="failure" if outcome == "failed" else "success",
            details={
                "training_run_id": run_id,
                "result": outcome,
                "candidate_version": candidate_version,
                "duration_s": None if duration_s is None else round(duration_s, 1),
                "reason": reason,
            },
            now=now,
        )
    return closed


def last_completed_watermark(session: Session) -> int:
    """The label watermark of the newest run that produced a model (0 if none did).

    Labels up to it were already trained on, whether that candidate won or not.
    """
    rows = session.execute(
        select(TrainingRun.parameters)
        .where(TrainingRun.outcome.in_(("promoted", "candidate")))
        .order_by(TrainingRun.id.desc())
        .limit(1)
    ).scalars()
    for parameters in rows:
        return int((parameters or {}).get("label_watermark", 0))
    return 0


def training_runs(session: Session, limit: int = 20) -> list[TrainingRunRecord]:
    """The newest runs first."""
    rows = session.execute(
        select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)
    ).scalars()
    return [_run_record(row) for row in rows]


# --------------------------------------------------------------------------- rescoring


@dataclass(frozen=True)
class RescoreProgress:
    """How far a rescore of ``studies`` under ``model_version`` got."""

    model_version: str
    instances_total: int
    instances_done: int
    studies_total: int
    studies_done: int


def studies_to_rescore(
    session: Session, since: dt.datetime | None, study_uid: str | None
) -> list[int]:
    """Ids of studies received since ``since`` (and/or the one study), with a prediction."""
    predicted = exists().where(Instance.study_id == Study.id, Instance.state == "predicted")
    query = select(Study.id).where(predicted)
    if since is not None:
        query = query.where(Study.last_received_at >= since)
    if study_uid is not None:
        query = query.where(Study.study_instance_uid == study_uid)
    return list(session.execute(query.order_by(Study.id)).scalars())


def mark_for_rescore(
    session: Session, study_ids: Sequence[int], model_version: str, now: dt.datetime
) -> list[int]:
    """Send the studies' predicted instances back to inference; return their ids.

    Instances already predicted by ``model_version`` stay as they are. Every study
    is marked for finalisation, so its next result revision is computed under the
    active version even when no instance needed predicting again. Predictions of
    other versions, and all result revisions, are kept.
    """
    if not study_ids:
        return []
    # Studies before instances: the lock order of the repository.
    session.execute(
        update(Study)
        .where(Study.id.in_(study_ids))
        .values(needs_finalise=True, prediction_epoch=Study.prediction_epoch + 1)
        .execution_options(synchronize_session=False)
    )
    current = exists().where(
        Prediction.instance_id == Instance.id, Prediction.model_version == model_version
    )
    rows = session.execute(
        update(Instance)
        .where(Instance.study_id.in_(study_ids), Instance.state == "predicted", ~current)
        .values(
            state="queued",
            reason=None,
            claim_token=None,
            claimed_at=None,
            attempts=0,
            updated_at=now,
        )
        .returning(Instance.id)
        .execution_options(synchronize_session=False)
    ).all()
    return sorted(int(row.id) for row in rows)


def rescore_progress(
    session: Session, study_ids: Sequence[int], model_version: str
) -> RescoreProgress:
    """Instances of the studies predicted by ``model_version`` (or settled otherwise),
    and studies whose latest result revision is by it and is up to date."""
    in_scope = Instance.study_id.in_(study_ids)
    current = exists().where(
        Prediction.instance_id == Instance.id, Prediction.model_version == model_version
    )
    settled = or_(
        and_(Instance.state == "predicted", current), Instance.state.in_(("rejected", "failed"))
    )
    instances_total = session.execute(select(func.count()).where(in_scope)).scalar_one()
    instances_done = session.execute(select(func.count()).where(in_scope, settled)).scalar_one()
    latest_version = (
        select(StudyResultRow.model_version)
        .where(StudyResultRow.study_id == Study.id)
        .order_by(StudyResultRow.revision.desc())
        .limit(1)
        .correlate(Study)
        .scalar_subquery()
    )
    unsettled = exists().where(Instance.study_id == Study.id, Instance.state.in_(_UNSETTLED))
    studies_done = session.execute(
        select(func.count()).where(
            Study.id.in_(study_ids),
            Study.needs_finalise.is_(False),
            ~unsettled,
            latest_version == model_version,
        )
    ).scalar_one()
    return RescoreProgress(
        model_version=model_version,
        instances_total=int(instances_total),
        instances_done=int(instances_done),
        studies_total=len(study_ids),
        studies_done=int(studies_done),
    )
