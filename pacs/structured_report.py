"""A study result as a DICOM Comprehensive SR in the same study, and sending it to a PACS.

The document follows TID 1500 (Measurement Report), what PACS viewers show for
AI results: one measurement group for the study (finding and probability of
the positive class) and one per image, each referencing its source instance by
SOP Class and SOP Instance UID (and frame for cine loops), each naming the
algorithm (model name and version). A "Qualitative Evaluations" container holds
the statement that the result is computer-generated and not reviewed; the
header says the same (VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY).

Every study result revision gets its own SOP Instance UID (derived from the
study, the revision and its creation time, so sending the same revision twice
sends the same instance) in one thyrocad series per study; a report of a later
revision lists the earlier ones as predecessor documents. Nothing is ever
overwritten.

Inputs and outputs are plain data, except :func:`build_report`'s pydicom
``Dataset``, which only :func:`store_report` and the tests consume.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from thyrocad.pacs.dicom_files import uid_from
from thyrocad.pacs.sender import Peer, associate

logger = logging.getLogger(__name__)

#: Private coding scheme for concepts no standard terminology has.
SCHEME = "99THYROCAD"
MANUFACTURER = "thyrocad"
SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "thyrocad AI result - computer-generated, not reviewed"
STATEMENT = (
    "Computer-generated result: automated classification of thyroid ultrasound images by "
    "thyrocad. Not reviewed by a physician and not a diagnosis; to be interpreted by a "
    "radiologist together with the images."
)

_FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
_COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_PROCEDURE = hd.sr.CodedConcept("THYROID-US-AI", SCHEME, "AI classification of thyroid ultrasound")
_NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
#: Class names with a standard code; any other class gets a code of SCHEME.
FINDING_CODES = {
    "autoimmune": hd.sr.CodedConcept("21983002", "SCT", "Autoimmune thyroiditis"),
    "normal": hd.sr.CodedConcept("17621005", "SCT", "Normal"),
}


def finding_code(label: str) -> hd.sr.CodedConcept:
    """The coded finding of a class name."""
    return FINDING_CODES.get(label) or hd.sr.CodedConcept(label.upper()[:16], SCHEME, label)


def probability_code(positive_class: str) -> hd.sr.CodedConcept:
    """The measurement name "Probability of <the positive class's finding>"."""
    meaning = finding_code(positive_class).meaning
    return hd.sr.CodedConcept(
        f"P-{positive_class.upper()}"[:16], SCHEME, f"Probability of {meaning.lower()}"
    )


@dataclass(frozen=True)
class StudyHeader:
    """Patient and study attributes the report carries when no source header can be read.

    Dates as YYYYMMDD strings; an empty ``patient_id`` stays empty.
    """

    study_instance_uid: str
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""


@dataclass(frozen=True)
class ImageFinding:
    """One classified image; ``frame_number`` (1-based) only for multi-frame instances."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    label: str
    probability: float
    frame_number: int | None = None


@dataclass(frozen=True)
class ReportContent:
    """What one report says: the study result, its images and where it came from."""

    study: StudyHeader
    label: str
    probability: float
    positive_class: str
    images: tuple[ImageFinding, ...]
    model_name: str
    model_version: str
    rule: str
    revision: int
    result_created_at: dt.datetime
    #: A spooled source instance whose header gives the patient and study modules.
    header_path: str | None = None
    #: SOP Instance UIDs of reports of earlier revisions (same series, same study).
    previous_reports: tuple[str, ...] = ()


def report_uids(study_uid: str, revision: int, created_at: dt.datetime) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the report of one result revision."""
    series = uid_from(f"thyrocad-sr/{study_uid}/series")
    stamp = created_at.astimezone(dt.UTC).isoformat()
    return series, uid_from(f"thyrocad-sr/{study_uid}/{revision}/{stamp}")


# --------------------------------------------------------------------------- building


def _read_header(path: str | None, study_uid: str) -> Dataset | None:
    if not path:
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError, ValueError) as exc:
        logger.warning("source header unreadable, using stored attributes: %s", exc)
        return None
    if str(ds.get("StudyInstanceUID", "")) != study_uid:
        return None
    return ds


def _minimal_header(study: StudyHeader, image: ImageFinding) -> Dataset:
    ds = _reference(image, study.study_instance_uid)
    ds.PatientID = study.patient_id
    ds.PatientName = study.patient_name
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.StudyID = study.study_id
    ds.ReferringPhysicianName = ""
    if study.study_description:
        ds.StudyDescription = study.study_description
    return ds


def _reference(image: ImageFinding, study_uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = image.sop_class_uid
    ds.SOPInstanceUID = image.sop_instance_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = image.series_instance_uid
    return ds


def _evidence(content: ReportContent) -> list[Dataset]:
    """The source header first (patient and study modules come from it), then the rest."""
    study_uid = content.study.study_instance_uid
    header = _read_header(content.header_path, study_uid)
    if header is None:
        header = _minimal_header(content.study, content.images[0])
    # Type 2 attributes highdicom reads from the first evidence item.
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
    ):
        if keyword not in header:
            setattr(header, keyword, "")
    evidence = [header]
    seen = {str(header.SOPInstanceUID)}
    for image in content.images:
        if image.sop_instance_uid not in seen:
            seen.add(image.sop_instance_uid)
            evidence.append(_reference(image, study_uid))
    return evidence


def _group(
    content: ReportContent,
    algorithm: hd.sr.AlgorithmIdentification,
    identifier: str,
    label: str,
    probability: float,
    source: hd.sr.SourceImageForMeasurementGroup | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid_from(f"thyrocad-sr/{content.study.study_instance_uid}/track/{identifier}"),
            identifier=identifier,
        ),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Thyroid)],
        source_images=[source] if source is not None else None,
        measurements=[
            hd.sr.Measurement(
                name=probability_code(content.positive_class),
                value=float(probability),
                unit=_NO_UNITS,
                algorithm_id=algorithm,
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=_FINDING, value=finding_code(label))
        ],
    )


def build_report(content: ReportContent) -> Dataset:
    """The Comprehensive SR of ``content`` (raises ``ValueError`` without images)."""
    if not content.images:
        raise ValueError("a report needs at least one classified image")
    study_uid = content.study.study_instance_uid
    series_uid, sop_uid = report_uids(study_uid, content.revision, content.result_created_at)
    parameters = [f"study aggregation rule: {content.rule}", f"result revision: {content.revision}"]
    algorithm = hd.sr.AlgorithmIdentification(
        name=content.model_name, version=content.model_version, parameters=parameters
    )
    groups = [
        _group(content, algorithm, "study", content.label, content.probability, None),
    ]
    for number, image in enumerate(content.images, start=1):
        source = hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=image.sop_class_uid,
            referenced_sop_instance_uid=image.sop_instance_uid,
            referenced_frame_numbers=[image.frame_number] if image.frame_number else None,
        )
        groups.append(
            _group(content, algorithm, f"image {number}", image.label, image.probability, source)
        )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid_from(f"thyrocad-device/{content.model_name}/{content.model_version}"),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=f"{content.model_name} {content.model_version}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_PROCEDURE,
        imaging_measurements=groups,
    )
    statement = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    statement.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=_COMMENT,
                value=STATEMENT,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    report[0].ContentSequence.append(statement)
    previous = []
    for uid in content.previous_reports:
        ds = Dataset()
        ds.SOPClassUID = ComprehensiveSRStorage
        ds.SOPInstanceUID = uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        previous.append(ds)
    sr = hd.sr.ComprehensiveSR(
        evidence=_evidence(content),
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=content.revision,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=previous or None,
        series_description=SERIES_DESCRIPTION,
    )
    return sr


# --------------------------------------------------------------------------- reading back


@dataclass(frozen=True)
class ParsedImage:
    sop_class_uid: str
    sop_instance_uid: str
    frame_numbers: tuple[int, ...]
    finding: str
    probability: float


@dataclass(frozen=True)
class ParsedReport:
    """What a thyrocad report says, read back from its content tree (code meanings)."""

    study_instance_uid: str
    sop_instance_uid: str
    finding: str
    probability: float
    images: tuple[ParsedImage, ...]
    algorithm_name: str
    algorithm_version: str
    statements: tuple[str, ...]
    verification_flag: str
    predecessors: tuple[str, ...]


def _items(parent: Dataset) -> Iterator[Dataset]:
    yield from parent.get("ContentSequence", [])


def _name(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def _walk(parent: Dataset) -> Iterator[Dataset]:
    for item in _items(parent):
        yield item
        yield from _walk(item)


def read_report(ds: Dataset) -> ParsedReport:
    """Read a thyrocad report (as written by :func:`build_report`) back into plain data."""
    study: tuple[str, float] | None = None
    images: list[ParsedImage] = []
    algorithm = ("", "")
    for group in _walk(ds):
        if group.get("ValueType") != "CONTAINER" or _name(group) != "Measurement Group":
            continue
        finding, probability = "", float("nan")
        source: tuple[str, str] | None = None
        frames: tuple[int, ...] = ()
        for item in _walk(group):
            name = _name(item)
            if item.ValueType == "CODE" and name == "Finding":
                finding = str(item.ConceptCodeSequence[0].CodeMeaning)
            elif item.ValueType == "NUM" and name.startswith("Probability of"):
                probability = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "IMAGE":
                ref = item.ReferencedSOPSequence[0]
                source = (str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID))
                frames = tuple(int(f) for f in _as_list(ref.get("ReferencedFrameNumber")))
            elif item.ValueType == "TEXT" and name == "Algorithm Name":
                algorithm = (str(item.TextValue), algorithm[1])
            elif item.ValueType == "TEXT" and name == "Algorithm Version":
                algorithm = (algorithm[0], str(item.TextValue))
        if source is None:
            study = (finding, probability)
        else:
            images.append(ParsedImage(source[0], source[1], frames, finding, probability))
    if study is None:
        raise ValueError("not a thyrocad report: no study measurement group")
    statements = tuple(
        str(item.TextValue)
        for item in _walk(ds)
        if item.get("ValueType") == "TEXT" and _name(item) == "Comment"
    )
    predecessors = tuple(
        str(instance.ReferencedSOPInstanceUID)
        for study_item in ds.get("PredecessorDocumentsSequence", [])
        for series in study_item.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedSOPSequence", [])
    )
    return ParsedReport(
        study_instance_uid=str(ds.StudyInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        finding=study[0],
        probability=study[1],
        images=tuple(images),
        algorithm_name=algorithm[0],
        algorithm_version=algorithm[1],
        statements=statements,
        verification_flag=str(ds.get("VerificationFlag", "")),
        predecessors=predecessors,
    )


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | int):
        return [value]
    return list(value)


# --------------------------------------------------------------------------- sending


@dataclass(frozen=True)
class StoreResult:
    """The answer to a C-STORE of a report: ``status`` None when none came."""

    status: int | None
    reason: str | None

    @property
    def sent(self) -> bool:
        """Only 0x0000 is "sent": a warning (0xB000, 0xB006, 0xB007) is not."""
        return self.status == 0x0000

    @property
    def transient(self) -> bool:
        """Worth trying again: no association or answer, or the peer out of resources."""
        return self.status is None or 0xA700 <= self.status <= 0xA7FF


def store_report(ds: Dataset, peer: Peer, calling_aet: str, timeout: float = 60.0) -> StoreResult:
    """C-STORE one report to ``peer`` and say what its DIMSE status means."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 30.0)
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    where = peer.name
    assoc = associate(ae, peer)
    if not assoc.is_established:
        state = "rejected" if assoc.is_rejected else "failed"
        return StoreResult(None, f"association with {where} {state}")
    try:
        try:
            answer = assoc.send_c_store(ds)
        except ValueError as exc:  # the peer accepted no presentation context for SR
            return StoreResult(0x0122, f"{where} does not accept Comprehensive SR: {exc}")
    finally:
        if assoc.is_established:
            assoc.release()
    if not answer or "Status" not in answer:
        return StoreResult(None, f"no answer from {where} within {timeout:.0f} s")
    code = int(answer.Status)
    comment = answer.get("ErrorComment")
    detail = f": {comment}" if comment else ""
    if code == 0x0000:
        return StoreResult(code, None)
    if code in (0xB000, 0xB006, 0xB007):
        return StoreResult(
            code, f"{where} stored it with warning 0x{code:04X}{detail}; not counted as sent"
        )
    return StoreResult(code, f"{where} refused it with status 0x{code:04X}{detail}")


def study_date_text(value: dt.date | None) -> str:
    """A date as DICOM DA, or empty."""
    return value.strftime("%Y%m%d") if value else ""


def image_findings(
    images: Sequence[Any],
) -> tuple[ImageFinding, ...]:
    """Plain :class:`ImageFinding` from records with the same field names
    (``sop_class_uid``, ``sop_instance_uid``, ``series_instance_uid``, ``label``,
    ``probability``, ``frame_index``, ``number_of_frames``)."""
    return tuple(
        ImageFinding(
            sop_class_uid=i.sop_class_uid,
            sop_instance_uid=i.sop_instance_uid,
            series_instance_uid=i.series_instance_uid,
            label=i.label,
            probability=float(i.probability),
            frame_number=i.frame_index + 1 if i.number_of_frames > 1 else None,
        )
        for i in images
    )
