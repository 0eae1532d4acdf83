"""The archive: backfill bookkeeping (studies listed by an archive and how far
each got) and Structured Report dispatches of study results.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.orm import Session

from thyrocad.db.errors import RepositoryError
from thyrocad.db.records import (
    BackfillItemRecord,
    ReportImage,
    ReportSource,
    SrDispatchRecord,
    StudyProgress,
)
from thyrocad.db.repository._common import UNSETTLED_STATES, _insert, _no_sync, _now, _result_record
from thyrocad.db.repository.audit import (
    BACKFILL_RETRIEVE,
    SR_SENT,
    default_actor,
    record_audit_event,
)
from thyrocad.db.schema import (
    SR_DISPATCH_STATUSES,
    BackfillItem,
    Instance,
    ModelVersion,
    Patient,
    Prediction,
    Series,
    SrDispatch,
    Study,
    StudyResultRow,
)

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
    actor: str | None = None,
) -> bool:
    """Move a backfill item to ``state`` with its ``reason`` (None clears it).

    ``requested_at``, ``received_count`` and ``expected_count`` change only
    when given. Returns whether the item exists. Raises ``RepositoryError``
    for an unknown state. A ``requested_at`` (the study is asked for) is audited
    (``backfill_retrieve``) as done by ``actor`` (default: this process's OS user).
    """
    if state not in BACKFILL_STATES:
        raise RepositoryError(f"unknown backfill state {state!r}")
    now = _now(now)
    values: dict[str, Any] = {"state": state, "reason": reason, "updated_at": now}
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
    found = bool(result.rowcount)  # type: ignore[attr-defined]
    if found and requested_at is not None:
        item_id = session.execute(
            select(BackfillItem.id).where(
                BackfillItem.source_aet == source_aet,
                BackfillItem.study_instance_uid == study_instance_uid,
            )
        ).scalar_one()
        # The item's id, not the study's UID: the audit trail leads to no patient.
        record_audit_event(
            session,
            BACKFILL_RETRIEVE,
            actor=actor or default_actor(),
            details={"source_aet": source_aet, "backfill_item_id": item_id, "state": state},
            now=now,
        )
    return found


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
    actor: str | None = None,
) -> SrDispatchRecord:
    """Create or update the dispatch of a study result revision to a destination.

    One row per (study result, destination): concurrent callers serialise on
    the study result's row. Raises ``RepositoryError`` for an unknown status
    or study result. A dispatch saved as ``sent`` or ``failed`` is audited
    (``sr_sent``) as done by ``actor`` (default: this process's OS user).
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
    if status != "pending":
        record_audit_event(
            session,
            SR_SENT,
            actor=actor or default_actor(),
            outcome="success" if status == "sent" else "failure",
            details={
                "sr_dispatch_id": row_id,
                "study_result_id": study_result_id,
                "destination": destination,
                "dimse_status": dimse_status,
                "reason": reason,
            },
        )
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


def pending_sr_dispatches(session: Session, results_before: datetime) -> list[SrDispatchRecord]:
    """Dispatches still ``pending`` for study results created before ``results_before``:
    their task was lost (broker outage) or is still retrying."""
    rows = session.execute(
        select(SrDispatch)
        .join(StudyResultRow, StudyResultRow.id == SrDispatch.study_result_id)
        .where(SrDispatch.status == "pending", StudyResultRow.created_at < results_before)
        .order_by(SrDispatch.id)
    ).scalars()
    return [_dispatch_record(row) for row in rows]


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
