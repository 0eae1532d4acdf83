"""Plain frozen dataclasses that cross the boundary of ``db``.

Callers hand these to the repository functions and get these back; ORM
objects never leave ``db``. They hold only built-in types so that they can be
logged (without the patient fields), pickled or turned into JSON freely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal, NamedTuple

RegisterKind = Literal["new", "duplicate", "replaced"]
ResultLevel = Literal["study", "patient"]
LabelLevel = Literal["study", "patient"]


@dataclass(frozen=True)
class RefusedStudy:
    """What the header of a refused instance says of its study and patient: enough to
    give the study a result ("no usable images") when none of its images was usable.
    The field names are those of :class:`InstanceRecord`."""

    study_instance_uid: str
    patient_key: str = ""
    patient_name: str | None = None
    patient_birth_date: date | None = None
    patient_sex: str | None = None
    study_date: date | None = None
    accession_number: str | None = None
    study_description: str | None = None


@dataclass(frozen=True)
class InstanceRecord:
    """What the listener knows about one spooled instance, ready to register.

    ``patient_key`` is the DICOM PatientID as received; an empty one is stored
    as ``"UNKNOWN:<study_instance_uid>"`` (see ``db.schema.patient_key_for``).
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    spool_path: str
    sha256: str
    size_bytes: int
    transfer_syntax_uid: str | None = None
    patient_key: str = ""
    patient_name: str | None = None
    patient_birth_date: date | None = None
    patient_sex: str | None = None
    study_date: date | None = None
    accession_number: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    modality: str | None = None
    number_of_frames: int = 1


@dataclass(frozen=True)
class RegisterOutcome:
    """The result of registering an instance.

    ``outcome``: ``new`` (first time seen), ``duplicate`` (same SOP Instance UID
    and same bytes: counted, nothing else changes) or ``replaced`` (same UID,
    different bytes: back to ``received`` to be predicted again).
    ``state`` is the instance's state after the call.
    """

    instance_id: int
    outcome: RegisterKind
    state: str


class KnownInstance(NamedTuple):
    """What the reconciler needs to know about an already registered instance."""

    instance_id: int
    sha256: str
    state: str


@dataclass(frozen=True)
class ClaimedInstance:
    """An instance a worker now owns (state ``processing``) until its lease ends."""

    instance_id: int
    sop_instance_uid: str
    study_id: int
    spool_path: str
    sha256: str
    attempts: int


@dataclass(frozen=True)
class PredictionRecord:
    """One model output for one frame of one instance.

    ``probability`` is the probability of the positive class;
    ``probabilities`` maps every class name to its probability.
    """

    instance_id: int
    model_version: str
    label: str
    probability: float
    probabilities: dict[str, float]
    frame_index: int = 0
    latency_ms: float | None = None


@dataclass(frozen=True)
class ImagePrediction:
    """A stored prediction of one image (one frame of one instance), for aggregation."""

    instance_id: int
    sop_instance_uid: str
    frame_index: int
    label: str
    probability: float
    probabilities: dict[str, float]
    created_at: datetime


@dataclass(frozen=True)
class StudyPredictions:
    """Every current prediction of one study under one model version.

    ``epoch`` is the study's prediction counter read *before* the predictions;
    pass it back to ``save_study_result`` so that a prediction that lands while
    the result is being computed keeps the study marked for finalisation.
    ``model_version`` is None when the study has no prediction at all.
    """

    study_id: int
    study_instance_uid: str
    patient_id: int
    patient_key: str
    model_version: str | None
    epoch: int
    images: tuple[ImagePrediction, ...] = ()


@dataclass(frozen=True)
class PatientPredictions:
    """Every current prediction of all studies of one patient under one model version."""

    patient_id: int
    patient_key: str
    model_version: str | None
    study_count: int
    images: tuple[ImagePrediction, ...] = ()


#: The reason stored with the result of a study whose every image was rejected or failed.
NO_USABLE_IMAGES = "no usable images"


@dataclass(frozen=True)
class ResultRecord:
    """One revision of a study or patient result.

    ``key`` is the Study Instance UID (level ``study``) or the patient key
    (level ``patient``); ``patient_key`` is the owning patient in both cases.
    ``study_count`` is None for study-level results.

    A study none of whose images could be used has a result with no finding:
    ``reason`` says why (:data:`NO_USABLE_IMAGES`), ``label`` repeats it so that
    a listing shows it where a diagnosis would be, ``probability`` is NaN (never a
    number that could pass for a score) and ``image_count`` is 0. ``reason`` is
    None on every result with a finding (``has_finding``).
    """

    id: int
    level: ResultLevel
    key: str
    patient_key: str
    model_version: str
    rule: str
    label: str
    probability: float
    probabilities: dict[str, float]
    image_count: int
    revision: int
    created_at: datetime
    study_count: int | None = None
    reason: str | None = None

    @property
    def has_finding(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class ModelVersionRecord:
    """The pipeline's view of one model registry entry.

    ``input_size`` is the side in pixels of the square model input (224 for
    VGG-19 as trained here, 299 for Inception v3).
    """

    version: str
    architecture: str
    classes: tuple[str, ...]
    input_size: int
    artifact_path: str
    status: str = "candidate"
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str | None = None
    status_reason: str | None = None
    created_at: datetime | None = None
    promoted_at: datetime | None = None


@dataclass(frozen=True)
class LabelRecord:
    """A ground-truth label of a study (``key`` = Study Instance UID) or of a
    patient (``key`` = patient key)."""

    id: int
    level: LabelLevel
    key: str
    patient_key: str
    diagnosis: str
    labelled_by: str
    source: str
    note: str | None
    created_at: datetime


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


#: What became of an audited action: done, refused by policy, or failed.
AuditOutcome = Literal["success", "refused", "failure"]


@dataclass(frozen=True)
class AuditEvent:
    """An audited action, to be recorded: who (``actor``: an AE title, an OS user, a
    worker) did what (``kind``), when (``at``, UTC), how it ended, and plain details.

    ``details`` must hold no patient name or id, nor a DICOM UID that leads to one:
    counts, AE titles, addresses, versions and row ids only.
    """

    kind: str
    actor: str
    outcome: AuditOutcome = "success"
    details: dict[str, Any] = field(default_factory=dict)
    at: datetime | None = None


@dataclass(frozen=True)
class AuditEventRecord:
    """A recorded audit event (see :class:`AuditEvent`)."""

    id: int
    at: datetime
    kind: str
    actor: str
    outcome: str
    details: dict[str, Any]


@dataclass(frozen=True)
class EvidenceRecord:
    """The evidence map of one prediction: an 8-bit grey PNG at the grid of ``layer``,
    255 at the map's peak, made by ``method`` (``grad-cam``)."""

    prediction_id: int
    method: str
    layer: str
    png: bytes
