"""What the radiologists' web page reads: the worklist and the page of one study.

The worklist is the latest result revision of each study, newest result first, with
filters (study date range, finding, model version, labelled or not) and keyset
pagination on the result's id: a page is "the next N older than this result", so the
hundredth page costs what the first does. Rows, pages and the study page are frozen
dataclasses; the page links by the opaque row ids they carry, never by a UID.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal

from sqlalchemy import exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from thyrocad.db.schema import (
    EvidenceMap,
    Instance,
    Label,
    ModelVersion,
    Patient,
    PatientResultRow,
    Prediction,
    Series,
    SrDispatch,
    Study,
    StudyResultRow,
)

#: The ``finding`` filter value meaning "a result without a finding" (no usable image).
NO_FINDING = "none"
#: The most rows one worklist page holds.
MAX_PAGE_SIZE = 200
#: Past this many studies the worklist says "more than" instead of counting on.
COUNT_CAP = 1000


@dataclass(frozen=True)
class WorklistFilters:
    """What the worklist is narrowed to; None (or empty) means "any"."""

    date_from: date | None = None
    date_to: date | None = None
    finding: str | None = None  # a class name, or NO_FINDING
    model_version: str | None = None
    labelled: bool | None = None


@dataclass(frozen=True)
class LabelInForce:
    """The label that holds for a study: its own latest, else its patient's latest."""

    diagnosis: str
    level: Literal["study", "patient"]
    labelled_by: str
    created_at: datetime


@dataclass(frozen=True)
class WorklistRow:
    """One study on the worklist with its latest result revision."""

    study_id: int
    result_id: int
    patient_key: str
    patient_name: str | None
    study_date: date | None
    accession_number: str | None
    finding: str | None  # None: no finding (see ``reason``)
    probability: float | None
    reason: str | None
    model_version: str
    revision: int
    created_at: datetime
    sr_sent: bool = False
    label: LabelInForce | None = None


@dataclass(frozen=True)
class WorklistPage:
    """One page of the worklist. ``older_than``/``newer_than``: the result id to ask
    for the next (older) or previous (newer) page with, None at either end."""

    rows: tuple[WorklistRow, ...]
    older_than: int | None
    newer_than: int | None


@dataclass(frozen=True)
class StudyHeader:
    study_id: int
    patient_key: str
    patient_name: str | None
    patient_birth_date: date | None
    patient_sex: str | None
    study_date: date | None
    accession_number: str | None
    description: str | None
    first_received_at: datetime
    last_received_at: datetime


@dataclass(frozen=True)
class ResultRevision:
    """One revision of the study's result; ``sr_status`` is the best status of its
    Structured Reports (``sent`` beats ``pending`` beats ``failed``), None if none."""

    result_id: int
    revision: int
    created_at: datetime
    model_version: str
    rule: str
    finding: str | None
    probability: float | None
    probabilities: dict[str, float]
    image_count: int
    reason: str | None
    sr_status: str | None


@dataclass(frozen=True)
class PatientAggregate:
    """The latest result of the study's patient over all their studies."""

    revision: int
    created_at: datetime
    model_version: str
    rule: str
    finding: str
    probability: float
    image_count: int
    study_count: int


@dataclass(frozen=True)
class StudyImage:
    """One predicted image (a frame of an instance) under the shown model version."""

    prediction_id: int
    instance_id: int
    frame_index: int
    number_of_frames: int
    series_description: str | None
    label: str
    probability: float
    probabilities: dict[str, float]
    has_evidence: bool


@dataclass(frozen=True)
class UnusedImage:
    """An instance of the study that has no prediction to show, and why."""

    instance_id: int
    state: str
    reason: str | None


@dataclass(frozen=True)
class StudyLabel:
    label_id: int
    level: Literal["study", "patient"]
    diagnosis: str
    labelled_by: str
    source: str
    note: str | None
    created_at: datetime
    in_force: bool


@dataclass(frozen=True)
class StudyPage:
    """Everything the page of one study shows. ``model_version``: the version whose
    predictions ``images`` are (the latest result's, else the newest prediction's)."""

    header: StudyHeader
    study_uid: str  # for label writes and the DICOM side; never shown in a URL
    revisions: tuple[ResultRevision, ...]  # newest first
    patient: PatientAggregate | None
    model_version: str | None
    images: tuple[StudyImage, ...]
    unused: tuple[UnusedImage, ...]
    labels: tuple[StudyLabel, ...] = field(default=())  # oldest first

    @property
    def latest(self) -> ResultRevision | None:
        return self.revisions[0] if self.revisions else None


@dataclass(frozen=True)
class ImageSource:
    """Where the pixels of one prediction come from: the spooled file, the frame, and the
    side of the square model input they were resized to."""

    prediction_id: int
    instance_id: int
    frame_index: int
    spool_path: str
    sha256: str
    input_size: int | None  # None: the prediction's model version is not registered


# --------------------------------------------------------------------------- worklist


def _worklist_query(filters: WorklistFilters, columns: Sequence[Any]) -> Any:
    """``SELECT columns`` over the latest result of every study, filtered."""
    newer = aliased(StudyResultRow)
    query = (
        select(*columns)
        .select_from(StudyResultRow)
        .join(Study, Study.id == StudyResultRow.study_id)
        .join(Patient, Patient.id == Study.patient_id)
        .where(
            ~exists().where(
                newer.study_id == StudyResultRow.study_id,
                newer.revision > StudyResultRow.revision,
            )
        )
    )
    if filters.date_from is not None:
        query = query.where(Study.study_date >= filters.date_from)
    if filters.date_to is not None:
        query = query.where(Study.study_date <= filters.date_to)
    if filters.finding == NO_FINDING:
        query = query.where(StudyResultRow.label.is_(None))
    elif filters.finding:
        query = query.where(StudyResultRow.label == filters.finding)
    if filters.model_version:
        query = query.where(StudyResultRow.model_version == filters.model_version)
    if filters.labelled is not None:
        labelled = or_(
            exists().where(Label.study_id == Study.id),
            exists().where(Label.patient_id == Study.patient_id),
        )
        query = query.where(labelled if filters.labelled else ~labelled)
    return query


_ROW_COLUMNS = (
    StudyResultRow.id,
    StudyResultRow.study_id,
    Study.patient_id,
    Patient.patient_key,
    Patient.patient_name,
    Study.study_date,
    Study.accession_number,
    StudyResultRow.label,
    StudyResultRow.probability,
    StudyResultRow.reason,
    StudyResultRow.model_version,
    StudyResultRow.revision,
    StudyResultRow.created_at,
)


def worklist_page(
    session: Session,
    filters: WorklistFilters = WorklistFilters(),
    *,
    limit: int = 50,
    older_than: int | None = None,
    newer_than: int | None = None,
) -> WorklistPage:
    """One page of the worklist, newest result first.

    ``older_than`` (a result id): the page after it; ``newer_than``: the page before
    it; neither: the first page. ``limit`` is clamped to 1 … ``MAX_PAGE_SIZE``.
    """
    limit = max(1, min(int(limit), MAX_PAGE_SIZE))
    query = _worklist_query(filters, _ROW_COLUMNS)
    backwards = newer_than is not None and older_than is None
    if backwards:
        query = query.where(StudyResultRow.id > newer_than).order_by(StudyResultRow.id.asc())
    else:
        if older_than is not None:
            query = query.where(StudyResultRow.id < older_than)
        query = query.order_by(StudyResultRow.id.desc())
    found = list(session.execute(query.limit(limit + 1)).all())
    more = len(found) > limit
    found = found[:limit]
    if backwards:
        found.reverse()
    if not found:
        return WorklistPage((), None, None)
    newest, oldest = found[0].id, found[-1].id
    if backwards:
        has_newer, has_older = more, _any(session, filters, StudyResultRow.id < oldest)
    else:
        has_older = more
        has_newer = older_than is not None and _any(session, filters, StudyResultRow.id > newest)
    rows = _decorate(session, found)
    return WorklistPage(tuple(rows), oldest if has_older else None, newest if has_newer else None)


def _any(session: Session, filters: WorklistFilters, condition: Any) -> bool:
    query = _worklist_query(filters, (StudyResultRow.id,)).where(condition).limit(1)
    return session.execute(query).first() is not None


def worklist_count(
    session: Session, filters: WorklistFilters = WorklistFilters(), *, cap: int | None = None
) -> int:
    """How many studies the worklist holds under ``filters``.

    With ``cap``, counting stops past it: the answer is ``cap + 1`` when there are
    more than ``cap``. The page counts so: an exact count reads every result of every
    study (over 100 ms at 100,000 studies on a small server), a capped one stops once
    it has seen enough, walking the results in the page's own order.
    """
    if cap is None:
        return int(session.execute(_worklist_query(filters, (func.count(),))).scalar_one())
    found = (
        _worklist_query(filters, (StudyResultRow.id,))
        .order_by(StudyResultRow.id.desc())
        .limit(cap + 1)
        .subquery()
    )
    return int(session.execute(select(func.count()).select_from(found)).scalar_one())


def _decorate(session: Session, found: Sequence[Any]) -> list[WorklistRow]:
    """Rows with whether an SR was sent and the label in force, for one page."""
    result_ids = [r.id for r in found]
    sent = set(
        session.execute(
            select(SrDispatch.study_result_id)
            .where(SrDispatch.study_result_id.in_(result_ids), SrDispatch.status == "sent")
            .distinct()
        ).scalars()
    )
    labels = labels_in_force(session, [(r.study_id, r.patient_id) for r in found])
    return [
        WorklistRow(
            study_id=r.study_id,
            result_id=r.id,
            patient_key=r.patient_key,
            patient_name=r.patient_name,
            study_date=r.study_date,
            accession_number=r.accession_number,
            finding=r.label,
            probability=r.probability,
            reason=r.reason,
            model_version=r.model_version,
            revision=r.revision,
            created_at=r.created_at,
            sr_sent=r.id in sent,
            label=labels.get(r.study_id),
        )
        for r in found
    ]


def labels_in_force(
    session: Session, studies: Iterable[tuple[int, int]]
) -> dict[int, LabelInForce]:
    """The label in force for each (study id, patient id): the study's own latest
    label, otherwise its patient's latest (as the ``study_labels_latest`` view)."""
    pairs = list(studies)
    if not pairs:
        return {}
    study_ids = {s for s, _ in pairs}
    patient_ids = {p for _, p in pairs}
    rows = session.execute(
        select(
            Label.study_id, Label.patient_id, Label.diagnosis, Label.labelled_by, Label.created_at
        )
        .where(or_(Label.study_id.in_(study_ids), Label.patient_id.in_(patient_ids)))
        .order_by(Label.created_at, Label.id)
    ).all()
    own: dict[int, LabelInForce] = {}
    of_patient: dict[int, LabelInForce] = {}
    for row in rows:  # oldest first: the last one written for a target wins
        if row.study_id is not None:
            own[row.study_id] = LabelInForce(
                row.diagnosis, "study", row.labelled_by, row.created_at
            )
        else:
            of_patient[row.patient_id] = LabelInForce(
                row.diagnosis, "patient", row.labelled_by, row.created_at
            )
    found: dict[int, LabelInForce] = {}
    for study_id, patient_id in pairs:
        label = own.get(study_id) or of_patient.get(patient_id)
        if label is not None:
            found[study_id] = label
    return found


def result_model_versions(session: Session) -> list[str]:
    """The model versions the worklist can be filtered by: every registered version,
    newest first."""
    return list(
        session.execute(
            select(ModelVersion.version).order_by(
                ModelVersion.created_at.desc(), ModelVersion.id.desc()
            )
        ).scalars()
    )


# --------------------------------------------------------------------------- one study


_SR_RANK = {"sent": 3, "pending": 2, "failed": 1}


def study_page(session: Session, study_id: int) -> StudyPage | None:
    """Everything the page of one study shows, or None for an unknown study id."""
    found = session.execute(
        select(Study, Patient)
        .join(Patient, Patient.id == Study.patient_id)
        .where(Study.id == study_id)
    ).one_or_none()
    if found is None:
        return None
    study, patient = found
    header = StudyHeader(
        study_id=study.id,
        patient_key=patient.patient_key,
        patient_name=patient.patient_name,
        patient_birth_date=patient.birth_date,
        patient_sex=patient.sex,
        study_date=study.study_date,
        accession_number=study.accession_number,
        description=study.description,
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
    )
    revisions = _revisions(session, study_id)
    version = revisions[0].model_version if revisions else _newest_version(session, study_id)
    images = _images(session, study_id, version) if version else ()
    shown = {image.instance_id for image in images}
    unused = tuple(
        UnusedImage(row.id, row.state, row.reason)
        for row in session.execute(
            select(Instance.id, Instance.state, Instance.reason)
            .where(Instance.study_id == study_id)
            .order_by(Instance.received_at, Instance.id)
        ).all()
        if row.id not in shown
    )
    return StudyPage(
        header=header,
        study_uid=study.study_instance_uid,
        revisions=revisions,
        patient=_patient_aggregate(session, patient.id),
        model_version=version,
        images=images,
        unused=unused,
        labels=_labels(session, study_id, patient.id),
    )


def _revisions(session: Session, study_id: int) -> tuple[ResultRevision, ...]:
    rows = (
        session.execute(
            select(StudyResultRow)
            .where(StudyResultRow.study_id == study_id)
            .order_by(StudyResultRow.revision.desc())
        )
        .scalars()
        .all()
    )
    statuses: dict[int, str] = {}
    for result_id, status in session.execute(
        select(SrDispatch.study_result_id, SrDispatch.status).where(
            SrDispatch.study_result_id.in_([r.id for r in rows])
        )
    ).all():
        if _SR_RANK.get(status, 0) > _SR_RANK.get(statuses.get(result_id, ""), 0):
            statuses[result_id] = status
    return tuple(
        ResultRevision(
            result_id=r.id,
            revision=r.revision,
            created_at=r.created_at,
            model_version=r.model_version,
            rule=r.rule,
            finding=r.label,
            probability=r.probability,
            probabilities=dict(r.probabilities or {}),
            image_count=r.image_count,
            reason=r.reason,
            sr_status=statuses.get(r.id),
        )
        for r in rows
    )


def _newest_version(session: Session, study_id: int) -> str | None:
    return session.execute(
        select(Prediction.model_version)
        .join(Instance, Instance.id == Prediction.instance_id)
        .where(Instance.study_id == study_id)
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def _images(session: Session, study_id: int, version: str) -> tuple[StudyImage, ...]:
    rows = session.execute(
        select(
            Prediction.id,
            Prediction.instance_id,
            Prediction.frame_index,
            Prediction.label,
            Prediction.probability,
            Prediction.probabilities,
            Instance.number_of_frames,
            Series.description,
            EvidenceMap.id.label("evidence_id"),
        )
        .join(Instance, Instance.id == Prediction.instance_id)
        .join(Series, Series.id == Instance.series_id)
        .outerjoin(EvidenceMap, EvidenceMap.prediction_id == Prediction.id)
        .where(
            Instance.study_id == study_id,
            Instance.state == "predicted",
            Prediction.model_version == version,
        )
        .order_by(Instance.received_at, Instance.id, Prediction.frame_index)
    ).all()
    return tuple(
        StudyImage(
            prediction_id=r.id,
            instance_id=r.instance_id,
            frame_index=r.frame_index,
            number_of_frames=int(r.number_of_frames or 1),
            series_description=r.description,
            label=r.label,
            probability=float(r.probability),
            probabilities=dict(r.probabilities or {}),
            has_evidence=r.evidence_id is not None,
        )
        for r in rows
    )


def _patient_aggregate(session: Session, patient_id: int) -> PatientAggregate | None:
    row = session.execute(
        select(PatientResultRow)
        .where(PatientResultRow.patient_id == patient_id)
        .order_by(PatientResultRow.revision.desc())
        .limit(1)
    ).scalar_one_or_none()
    if row is None:
        return None
    return PatientAggregate(
        revision=row.revision,
        created_at=row.created_at,
        model_version=row.model_version,
        rule=row.rule,
        finding=row.label,
        probability=row.probability,
        image_count=row.image_count,
        study_count=row.study_count,
    )


def _labels(session: Session, study_id: int, patient_id: int) -> tuple[StudyLabel, ...]:
    """The study's own labels and its patient's, oldest first; the one in force marked."""
    rows = (
        session.execute(
            select(Label)
            .where(or_(Label.study_id == study_id, Label.patient_id == patient_id))
            .order_by(Label.created_at, Label.id)
        )
        .scalars()
        .all()
    )
    own = [r for r in rows if r.study_id is not None]
    in_force = own[-1].id if own else (rows[-1].id if rows else None)
    return tuple(
        StudyLabel(
            label_id=r.id,
            level="study" if r.study_id is not None else "patient",
            diagnosis=r.diagnosis,
            labelled_by=r.labelled_by,
            source=r.source,
            note=r.note,
            created_at=r.created_at,
            in_force=r.id == in_force,
        )
        for r in rows
    )


def study_uid(session: Session, study_id: int) -> str | None:
    """The Study Instance UID of a study id (what ``add_label`` takes), or None."""
    return session.execute(
        select(Study.study_instance_uid).where(Study.id == study_id)
    ).scalar_one_or_none()


def image_source(session: Session, prediction_id: int) -> ImageSource | None:
    """Where to read the pixels of a prediction, or None for an unknown prediction id."""
    row = session.execute(
        select(
            Prediction.id,
            Prediction.instance_id,
            Prediction.frame_index,
            Instance.spool_path,
            Instance.sha256,
            ModelVersion.input_size,
        )
        .join(Instance, Instance.id == Prediction.instance_id)
        .outerjoin(ModelVersion, ModelVersion.version == Prediction.model_version)
        .where(Prediction.id == prediction_id)
    ).one_or_none()
    if row is None:
        return None
    return ImageSource(
        prediction_id=row.id,
        instance_id=row.instance_id,
        frame_index=row.frame_index,
        spool_path=row.spool_path,
        sha256=row.sha256,
        input_size=row.input_size,
    )


def evidence_png(session: Session, prediction_id: int) -> bytes | None:
    """The stored evidence map (8-bit grey PNG) of a prediction, or None without one."""
    found = session.execute(
        select(EvidenceMap.png).where(EvidenceMap.prediction_id == prediction_id)
    ).scalar_one_or_none()
    return None if found is None else bytes(found)


__all__ = [
    "COUNT_CAP",
    "NO_FINDING",
    "ImageSource",
    "LabelInForce",
    "PatientAggregate",
    "ResultRevision",
    "StudyHeader",
    "StudyImage",
    "StudyLabel",
    "StudyPage",
    "UnusedImage",
    "WorklistFilters",
    "WorklistPage",
    "WorklistRow",
    "evidence_png",
    "image_source",
    "labels_in_force",
    "result_model_versions",
    "study_page",
    "study_uid",
    "worklist_count",
    "worklist_page",
]
