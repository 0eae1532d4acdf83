"""Turn a received DICOM header into plain data, and refuse what cannot be processed.

Only the header is looked at here: pixel decoding never runs in the association
thread. What fails validation raises :class:`InvalidInstance` carrying the reason
that is stored and the DIMSE status the listener answers with.
"""

from __future__ import annotations

import datetime as dt
import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.valuerep import VR
from pydicom.values import convert_value

from thyrocad.db.records import RefusedStudy
from thyrocad.pacs.errors import InvalidInstance
from thyrocad.pacs.received import PartsReader

# DIMSE C-STORE failure statuses (PS3.4 B.2.3)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122

ULTRASOUND_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}


def register_storage_classes() -> list[str]:
    """Make pynetdicom's storage service handle every class of :data:`ULTRASOUND_SOP_CLASSES`.

    pynetdicom 3.0 knows no retired storage classes: it accepts a presentation context for
    Ultrasound Image Storage (Retired) when we add it, then finds no service for the first
    C-STORE in it and aborts the whole association. Registering the UIDs with
    ``StorageServiceClass`` sends those C-STOREs to our handler like any other. Call before
    accepting associations; calling again does nothing. Returns the UIDs it registered.
    """
    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import register_uid, uid_to_service_class

    registered = []
    for uid in ULTRASOUND_SOP_CLASSES:
        if uid_to_service_class(uid) is StorageServiceClass:
            continue
        keyword = UID(uid).keyword or "ThyrocadStorage" + uid.replace(".", "_")
        register_uid(uid, keyword, StorageServiceClass)
        registered.append(uid)
    unhandled = [
        u for u in ULTRASOUND_SOP_CLASSES if uid_to_service_class(u) is not StorageServiceClass
    ]
    if unhandled:  # a pynetdicom whose registry works differently: fail before listening
        raise RuntimeError(f"pynetdicom's storage service does not handle {unhandled}")
    return registered


# Values longer than this are left unread when a header is parsed.
_DEFER_BYTES = 1 << 20

# SOP Class UID, SOP Instance UID, Study Instance UID, Pixel Data
_IDENTIFYING_TAGS = (0x00080016, 0x00080018, 0x0020000D, 0x7FE00010)


@dataclass(frozen=True)
class InstanceMeta:
    """What thyrocad keeps of one instance's header; no pixels."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_key: str
    patient_name: str
    patient_birth_date: dt.date | None
    patient_sex: str | None
    study_date: dt.date | None
    accession_number: str
    study_description: str
    series_description: str
    modality: str
    number_of_frames: int
    rows: int
    columns: int


def read_dataset(data: bytes | Sequence[bytes | memoryview]) -> Dataset:
    """Parse encoded bytes (with or without file meta), or the parts of them in order (see
    :mod:`pacs.received`), into a pydicom Dataset.

    Values longer than :data:`_DEFER_BYTES` (the pixel data of any image worth holding
    once) are not read: the dataset knows their length, and reads them from ``data`` if
    asked. Raises :class:`InvalidInstance` (0xC000) when the bytes are not DICOM.
    """
    source = io.BytesIO(data) if isinstance(data, bytes) else PartsReader(data)
    try:
        ds = pydicom.dcmread(source, force=True, defer_size=_DEFER_BYTES)
        # force=True parses anything; a dataset without one identifying element is noise.
        if not any(tag in ds for tag in _IDENTIFYING_TAGS):
            raise InvalidInstance("not a DICOM dataset", STATUS_CANNOT_UNDERSTAND)
    except (InvalidDicomError, EOFError, ValueError, OSError, struct.error) as exc:
        raise InvalidInstance(f"not a DICOM dataset: {exc}", STATUS_CANNOT_UNDERSTAND) from exc
    return ds


def _date(ds: Dataset, keyword: str) -> dt.date | None:
    text = _text(ds, keyword)
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _value(ds: Dataset, keyword: str) -> object:
    """An element's value, or None. One received as VR UN (explicit VR from a peer that
    did not know its VR) is read as its dictionary VR: pydicom does that itself only for
    values shorter than 64 KB, and leaves the rest as bytes."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    elem = ds[tag]
    value = elem.value
    if elem.VR == VR.UN and isinstance(value, bytes):
        vr = dictionary_VR(tag)
        little = ds.original_encoding[1] is not False
        raw = RawDataElement(Tag(tag), vr, len(value), value, 0, False, little)
        value = convert_value(vr, raw, ds._character_set)
    return value


def _text(ds: Dataset, keyword: str) -> str:
    """An element as text: stripped, values of a multi-valued one joined by backslashes."""
    try:
        value = _value(ds, keyword)
    except Exception:  # a malformed element must not stop us: it is only metadata
        return ""
    if isinstance(value, MultiValue):
        value = "\\".join(str(v) for v in value)
    elif isinstance(value, bytes):  # not a text VR: no text to keep
        return ""
    return str(value if value is not None else "").strip(" \x00")


def _require_uid(ds: Dataset, keyword: str) -> str:
    value = _text(ds, keyword)
    if not value:
        raise InvalidInstance(f"missing {keyword}", STATUS_DATASET_MISMATCH)
    if not UID(value).is_valid:
        raise InvalidInstance(f"invalid {keyword}: {value[:64]!r}", STATUS_DATASET_MISMATCH)
    return value


def refused_study(ds: Dataset) -> RefusedStudy | None:
    """What a refused instance's header says of its study and patient, or None when it
    names no valid Study Instance UID (the study it belongs to cannot be known)."""
    try:
        study_uid = _require_uid(ds, "StudyInstanceUID")
    except InvalidInstance:
        return None
    return RefusedStudy(
        study_instance_uid=study_uid,
        patient_key=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName") or None,
        patient_birth_date=_date(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex") or None,
        study_date=_date(ds, "StudyDate"),
        accession_number=_text(ds, "AccessionNumber") or None,
        study_description=_text(ds, "StudyDescription") or None,
    )


def expected_pixel_bytes(ds: Dataset) -> int | None:
    """Bytes that native (uncompressed) pixel data must hold, or None when unknown."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1))
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "YBR_FULL_422":
        samples = 2  # Y Y Cb Cr for every two pixels
    total_bits = rows * cols * samples * bits * frames
    return (total_bits + 7) // 8


def _pixel_data_length(ds: Dataset) -> int:
    """Bytes of the Pixel Data value, without reading a value left unread."""
    elem = ds.get_item(0x7FE00010, keep_deferred=True)
    if isinstance(elem, RawDataElement) and elem.value is None and elem.length != 0xFFFFFFFF:
        return int(elem.length)
    return len(ds.PixelData)


def pixel_length_problem(expected: int, got: int) -> str | None:
    """Why native pixel data of ``got`` bytes cannot be an image of ``expected`` bytes.

    Shorter is truncated; longer is a header that does not describe the data (it would be
    read from its first bytes), except the one byte that pads an odd length to even.
    """
    if got < expected:
        return f"truncated pixel data: expected {expected} bytes, got {got}"
    if got > expected + (expected % 2):
        return (
            f"pixel data longer than Rows/Columns, samples, bits and frames say: "
            f"expected {expected} bytes, got {got}"
        )
    return None


def describe(ds: Dataset, transfer_syntax_uid: str | None = None) -> InstanceMeta:
    """Validate a dataset's header and return its :class:`InstanceMeta`.

    Checks: the UIDs thyrocad keys on, a supported SOP class, present pixel data,
    and for native encodings a pixel data length that matches the header (neither
    shorter nor longer, but for the padding byte of an odd length).
    """
    sop_class = _require_uid(ds, "SOPClassUID")
    if sop_class not in ULTRASOUND_SOP_CLASSES:
        raise InvalidInstance(
            f"SOP class {sop_class} is not an ultrasound or secondary capture image",
            STATUS_SOP_CLASS_NOT_SUPPORTED,
        )
    sop_uid = _require_uid(ds, "SOPInstanceUID")
    study_uid = _require_uid(ds, "StudyInstanceUID")
    series_uid = _require_uid(ds, "SeriesInstanceUID")
    syntax = transfer_syntax_uid or _text(ds.get("file_meta", Dataset()), "TransferSyntaxUID")
    if "PixelData" not in ds:
        raise InvalidInstance("no pixel data", STATUS_DATASET_MISMATCH)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidInstance("missing Rows/Columns", STATUS_DATASET_MISMATCH) from exc
    if syntax and not UID(syntax).is_compressed:
        expected = expected_pixel_bytes(ds)
        got = _pixel_data_length(ds)
        problem = None if expected is None else pixel_length_problem(expected, got)
        if problem:
            raise InvalidInstance(problem, STATUS_DATASET_MISMATCH)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return InstanceMeta(
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=syntax,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        patient_key=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_date(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex") or None,
        study_date=_date(ds, "StudyDate"),
        accession_number=_text(ds, "AccessionNumber"),
        study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"),
        modality=_text(ds, "Modality"),
        number_of_frames=frames,
        rows=rows,
        columns=cols,
    )
