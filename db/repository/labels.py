"""Ground truth: labels of studies and patients (the latest wins, history is
kept) and each patient's once-decided hold-out membership.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, insert, select
from sqlalchemy.orm import Session, aliased

from thyrocad.db.errors import RepositoryError
from thyrocad.db.records import LabelRecord
from thyrocad.db.repository._common import _insert, _now
from thyrocad.db.repository.audit import LABEL_WRITTEN, record_audit_event
from thyrocad.db.schema import Holdout, Label, Patient, Study


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
    study or patient. The label is audited (``label_written``, by ``labelled_by``).
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
    now = _now(now)
    label_id: int = session.execute(
        insert(Label)
        .values(
            study_id=study_id,
            patient_id=patient_id,
            diagnosis=diagnosis,
            labelled_by=labelled_by,
            source=source,
            note=note,
            created_at=now,
        )
        .returning(Label.id)
    ).scalar_one()
    # The label's id, not its study or patient: the audit trail names no patient.
    record_audit_event(
        session,
        LABEL_WRITTEN,
        actor=labelled_by,
        details={
            "label_id": label_id,
            "level": "study" if study_id is not None else "patient",
            "diagnosis": diagnosis,
            "source": source,
        },
        now=now,
    )
    return label_id


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
