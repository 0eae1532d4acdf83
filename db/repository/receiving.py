"""Instances as they arrive: registering them (with their patient, study and series)
and the C-STORE refusals, and looking one up by SOP Instance UID.

How concurrent writers are kept apart (lock order, ``INSERT … ON CONFLICT``) is
described in the ``db.repository`` package docstring.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.orm import Session

from thyrocad.db.records import InstanceRecord, KnownInstance, RefusedStudy, RegisterOutcome
from thyrocad.db.repository._common import _insert_for, _no_sync, _now
from thyrocad.db.schema import Instance, Patient, Rejection, Series, Study, patient_key_for


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
    records: Sequence[InstanceRecord | RefusedStudy],
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
    study: RefusedStudy | None = None,
) -> int:
    """Store an instance refused at C-STORE and return the rejection's id.

    With ``study`` (what the refused header said of its study and patient) the study
    is registered as a received one would register it, and marked for finalisation:
    a study none of whose images is usable gets a result saying so.
    ``reason`` must not contain patient data (it is shown in status output).
    """
    now = _now(now)
    study_id = _register_refused_study(session, study, now) if study else None
    return session.execute(
        insert(Rejection)
        .values(
            sop_instance_uid=sop_instance_uid or None,
            study_id=study_id,
            calling_ae_title=calling_ae_title,
            reason=reason,
            dimse_status=dimse_status,
            received_at=now,
        )
        .returning(Rejection.id)
    ).scalar_one()


def _register_refused_study(session: Session, study: RefusedStudy, now: datetime) -> int:
    statements = _register_statements(session.get_bind().dialect.name)
    key = patient_key_for(study.patient_key, study.study_instance_uid)
    patient_id = _upsert_patients(session, statements, [study], [key], now)[key]
    study_id = _upsert(
        session.connection(),
        statements.study,
        "study_instance_uid",
        {
            study.study_instance_uid: [
                {
                    "patient_id": patient_id,
                    "study_date": study.study_date,
                    "accession_number": study.accession_number or None,
                    "description": study.study_description or None,
                }
            ]
        },
        first=("patient_id",),
        fixed={
            "first_received_at": now,
            "last_received_at": now,
            "needs_finalise": False,
            "prediction_epoch": 0,
        },
    )[study.study_instance_uid]
    # As a settled instance does: the next finalisation sees the change.
    session.execute(
        update(Study)
        .where(Study.id == study_id)
        .values(needs_finalise=True, prediction_epoch=Study.prediction_epoch + 1)
        .execution_options(**_no_sync())
    )
    return study_id


def known_instance(session: Session, sop_instance_uid: str) -> KnownInstance | None:
    """Return (id, sha256, state) of a registered instance, or None if unknown."""
    row = session.execute(
        select(Instance.id, Instance.sha256, Instance.state).where(
            Instance.sop_instance_uid == sop_instance_uid
        )
    ).one_or_none()
    return None if row is None else KnownInstance(row.id, row.sha256, row.state)


def known_instances(session: Session, sop_instance_uids: Sequence[str]) -> dict[str, KnownInstance]:
    """:func:`known_instance` of many UIDs in one query: (id, sha256, state) by SOP Instance
    UID, for the registered ones only."""
    if not sop_instance_uids:
        return {}
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.id, Instance.sha256, Instance.state).where(
            Instance.sop_instance_uid.in_(sorted(set(sop_instance_uids)))
        )
    )
    return {row[0]: KnownInstance(row[1], row[2], row[3]) for row in rows}
