"""Study and patient results: which studies are ready, the predictions a
result is aggregated from, storing results as revisions, and reading them.

The lock order (patient, study, series, instance) is described in the
``db.repository`` package docstring.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, bindparam, case, exists, func, insert, select, update
from sqlalchemy.orm import Session

from thyrocad.db.errors import RepositoryError
from thyrocad.db.records import (
    ImagePrediction,
    PatientPredictions,
    ResultRecord,
    StudyPredictions,
)
from thyrocad.db.repository._common import UNSETTLED_STATES, _no_sync, _now, _result_record
from thyrocad.db.schema import (
    Instance,
    ModelVersion,
    Patient,
    PatientResultRow,
    Prediction,
    Rejection,
    Study,
    StudyResultRow,
)


def studies_to_finalise(
    session: Session, idle_seconds: float, now: datetime | None = None
) -> list[int]:
    """Ids of studies to aggregate now, least recently active first.

    A study qualifies when a prediction arrived since its last result
    (``needs_finalise``), no image of it was received for ``idle_seconds``,
    and none of its instances is still waiting for or in inference — so a
    result is computed once over the whole study, and a late image later
    simply produces a new revision. Idle counts from the last receipt, not
    the last prediction: the study's own inference time must not be added
    to the wait a radiologist sees.
    """
    cutoff = _now(now) - timedelta(seconds=idle_seconds)
    unsettled = exists().where(Instance.study_id == Study.id, Instance.state.in_(UNSETTLED_STATES))
    return list(
        session.execute(
            select(Study.id)
            .where(
                Study.needs_finalise.is_(True),
                Study.last_received_at < cutoff,
                ~unsettled,
            )
            .order_by(Study.last_received_at, Study.id)
        ).scalars()
    )


def has_no_usable_image(session: Session, study_id: int) -> bool:
    """True when every instance of the study ended ``rejected`` or ``failed``, or it has
    none and the listener refused what was sent of it."""
    states = set(
        session.execute(select(Instance.state).where(Instance.study_id == study_id).distinct())
        .scalars()
        .all()
    )
    if states:
        return states <= {"rejected", "failed"}
    refused = select(Rejection.id).where(Rejection.study_id == study_id).limit(1)
    return session.execute(refused).first() is not None


# A finalisation's statements are built once, at import: building a statement costs
# about as much CPU as executing it. ``owner`` is the study's or the patient's id.
_STUDY_SCOPE = Instance.study_id == bindparam("owner")
_PATIENT_SCOPE = Instance.study_id.in_(
    select(Study.id).where(Study.patient_id == bindparam("owner"))
)


def _version(scope: Any) -> Any:
    """The ``version`` asked for, else the active model's, else the version of the
    newest prediction in scope (COALESCE evaluates only what it needs)."""
    active = (
        select(ModelVersion.version)
        .where(ModelVersion.status == "active")
        .correlate(None)
        .scalar_subquery()
    )
    newest = (
        select(Prediction.model_version)
        .join(Instance, Instance.id == Prediction.instance_id)
        .where(scope)
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(1)
        .correlate(None)
        .scalar_subquery()
    )
    return func.coalesce(bindparam("version", type_=String), active, newest).label("version")


def _images(scope: Any) -> Any:
    """The current image predictions in scope under ``version``, with their study."""
    return (
        select(
            Prediction.instance_id,
            Instance.sop_instance_uid,
            Instance.study_id,
            Prediction.frame_index,
            Prediction.label,
            Prediction.probability,
            Prediction.probabilities,
            Prediction.created_at,
        )
        .join(Instance, Instance.id == Prediction.instance_id)
        # Only instances whose current bytes were predicted: a replaced file
        # waiting for inference must not be aggregated from its old pixels.
        .where(
            scope, Instance.state == "predicted", Prediction.model_version == bindparam("version")
        )
        .order_by(Instance.received_at, Instance.id, Prediction.frame_index)
    )


_STUDY_HEAD = (
    select(
        Study.study_instance_uid,
        Study.prediction_epoch,
        Study.patient_id,
        Patient.patient_key,
        _version(_STUDY_SCOPE),
    )
    .join(Patient, Patient.id == Study.patient_id)
    .where(Study.id == bindparam("owner"))
)
_PATIENT_HEAD = select(Patient.patient_key, _version(_PATIENT_SCOPE)).where(
    Patient.id == bindparam("owner")
)
_STUDY_IMAGES = _images(_STUDY_SCOPE)
_PATIENT_IMAGES = _images(_PATIENT_SCOPE)


def _image_predictions(
    session: Session, statement: Any, owner: int, version: str | None
) -> tuple[tuple[ImagePrediction, ...], int]:
    """The current image predictions of ``owner`` under ``version``, and how many
    studies they come from."""
    if version is None:
        return (), 0
    rows = session.execute(statement, {"owner": owner, "version": version}).all()
    images = tuple(
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
    return images, len({row.study_id for row in rows})


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
        _STUDY_HEAD, {"owner": study_id, "version": model_version or None}
    ).one_or_none()
    if study is None:
        raise RepositoryError(f"no study with id {study_id}")
    images, _ = _image_predictions(session, _STUDY_IMAGES, study_id, study.version)
    return StudyPredictions(
        study_id=study_id,
        study_instance_uid=study.study_instance_uid,
        patient_id=study.patient_id,
        patient_key=study.patient_key,
        model_version=study.version,
        epoch=study.prediction_epoch,
        images=images,
    )


def patient_predictions(
    session: Session, patient_id: int, model_version: str | None = None
) -> PatientPredictions:
    """Every current image prediction of all studies of a patient under one version.

    Version default as in ``study_predictions``. ``study_count`` counts the
    studies that contribute at least one image. Raises ``RepositoryError``
    for an unknown patient.
    """
    patient = session.execute(
        _PATIENT_HEAD, {"owner": patient_id, "version": model_version or None}
    ).one_or_none()
    if patient is None:
        raise RepositoryError(f"no patient with id {patient_id}")
    images, study_count = _image_predictions(session, _PATIENT_IMAGES, patient_id, patient.version)
    return PatientPredictions(
        patient_id=patient_id,
        patient_key=patient.patient_key,
        model_version=patient.version,
        study_count=study_count,
        images=images,
    )


_LOCK_STUDY_OWNER = (
    select(Patient.patient_key)
    .join(Study, Study.patient_id == Patient.id)
    .where(Study.id == bindparam("study_id"))
    .with_for_update(of=Patient)
)


def _mark_study(still_needed: Any) -> Any:
    return (
        update(Study)
        .where(Study.id == bindparam("study_id"))
        .values(finalised_at=bindparam("now"), needs_finalise=still_needed)
        .returning(Study.study_instance_uid)
        .execution_options(**_no_sync())
    )


_MARK_STUDY = _mark_study(False)
_MARK_STUDY_AT_EPOCH = _mark_study(
    case((Study.prediction_epoch == bindparam("epoch"), False), else_=Study.needs_finalise)
)
_MARK_PATIENT = (
    update(Patient)
    .where(Patient.id == bindparam("patient_id"))
    .values(finalised_at=bindparam("now"))
    .returning(Patient.patient_key)
    .execution_options(**_no_sync())
)
_LATEST_STUDY_RESULT = (
    select(StudyResultRow)
    .where(StudyResultRow.study_id == bindparam("study_id"))
    .order_by(StudyResultRow.revision.desc())
    .limit(1)
)
_INSERT_STUDY_RESULT = insert(StudyResultRow).returning(StudyResultRow)
_INSERT_PATIENT_RESULT = insert(PatientResultRow).returning(PatientResultRow)
_LATEST_PATIENT_RESULT = (
    select(PatientResultRow)
    .where(PatientResultRow.patient_id == bindparam("patient_id"))
    .order_by(PatientResultRow.revision.desc())
    .limit(1)
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
    label: str | None,
    probability: float | None,
    probabilities: dict[str, float],
    image_count: int,
    now: datetime | None = None,
    epoch: int | None = None,
    reason: str | None = None,
) -> ResultRecord:
    """Store a study result as a new revision (1, 2, …) and mark the study finalised.

    Idempotent: a result identical to the latest revision (same version, rule,
    label, probability, probabilities, image count and reason) returns that
    revision instead of adding one. Old revisions are kept. A result with no
    finding has ``label`` and ``probability`` None and a ``reason`` (see
    ``ResultRecord``).

    ``needs_finalise`` is cleared only if no prediction arrived since the
    caller read ``StudyPredictions.epoch`` (pass it as ``epoch``); otherwise
    the study stays marked and is finalised again. ``epoch=None`` clears it
    unconditionally. Raises ``RepositoryError`` for an unknown study.
    """
    now = _now(now)
    # Lock order patient → study, as everywhere (see the module docstring), so
    # a finaliser that saves the patient result in the same transaction never
    # deadlocks with the listener: the owner's row only is locked here, the
    # study's by the UPDATE below. SQLite ignores FOR UPDATE; its write lock
    # is taken by that UPDATE.
    patient_key = session.execute(_LOCK_STUDY_OWNER, {"study_id": study_id}).scalar_one_or_none()
    if patient_key is None:
        raise RepositoryError(f"no study with id {study_id}")
    # Writing the study row serialises concurrent finalisers of this study.
    mark = _MARK_STUDY if epoch is None else _MARK_STUDY_AT_EPOCH
    study_uid = session.execute(
        mark, {"study_id": study_id, "now": now, "epoch": epoch}
    ).scalar_one()
    values = {
        "model_version": model_version,
        "rule": rule,
        "label": label,
        "probability": None if probability is None else float(probability),
        "probabilities": {k: float(v) for k, v in probabilities.items()},
        "image_count": image_count,
        "reason": reason,
    }
    latest = session.execute(_LATEST_STUDY_RESULT, {"study_id": study_id}).scalar_one_or_none()
    if latest is None or not _same_result(latest, values):
        revision = 1 if latest is None else latest.revision + 1
        latest = session.execute(
            _INSERT_STUDY_RESULT,
            [{"study_id": study_id, "revision": revision, "created_at": now, **values}],
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
        _MARK_PATIENT, {"patient_id": patient_id, "now": now}
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
        _LATEST_PATIENT_RESULT, {"patient_id": patient_id}
    ).scalar_one_or_none()
    if latest is None or not _same_result(latest, values):
        revision = 1 if latest is None else latest.revision + 1
        latest = session.execute(
            _INSERT_PATIENT_RESULT,
            [{"patient_id": patient_id, "revision": revision, "created_at": now, **values}],
        ).scalar_one()
    return _result_record(latest, "patient", found, found, latest.study_count)


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
