"""Writing ultrasound DICOM: synthetic scanner screens for ``thyrocad synth``, the demo and
the tests, and plain images (such as real PNG crops) wrapped for the listener.

Every dataset is Ultrasound Image Storage in Explicit VR Little Endian, 8-bit MONOCHROME2
(or RGB), with a Sequence of Ultrasound Regions whose one 2D tissue region is exactly the
tissue, so :mod:`pacs.pixels` crops it back without guessing. The caller gives every UID;
:func:`uid_from` makes them reproducible from a seed text.
"""

from __future__ import annotations

import logging
import os
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    UltrasoundImageStorage,
)

from thyrocad.pacs.pixels import content_box

logger = logging.getLogger(__name__)

SYNTHETIC_MANUFACTURER = "thyrocad synthetic"
SYNTHETIC_COMMENT = "SYNTHETIC IMAGE \N{EM DASH} not clinical data"

# The scanner screen around the tissue: a header band for patient and study text, a side
# band for settings, a right margin with the depth scale, a bottom margin.
_HEADER = 64
_SIDE = 112
_RIGHT = 32
_BOTTOM = 24
_LINE = 13
# Fixed namespace for uid_from: changing it changes every synthetic UID ever written.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "thyrocad.invalid")
_LATERALITIES = ("R", "L", "B", "U")


@dataclass(frozen=True)
class PatientInfo:
    """Patient attributes; ``patient_name`` in DICOM PN form (``Family^Given``),
    ``birth_date`` YYYYMMDD, ``sex`` M, F or O."""

    patient_id: str
    patient_name: str
    birth_date: str | None = None
    sex: str | None = None


@dataclass(frozen=True)
class StudyInfo:
    """Study attributes; ``study_date`` YYYYMMDD, ``study_time`` HHMMSS."""

    study_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    description: str = "US THYROID"
    referring: str = ""


def uid_from(seed_text: str) -> str:
    """A DICOM UID that depends only on ``seed_text``: ``2.25.`` and the integer of a
    name-based (SHA-1) UUID, as PS3.5 B.2 allows, so no organisation root is needed and a
    synthetic study written twice from the same seed has the same UIDs.

    (``pydicom.uid.generate_uid(prefix=None, ...)`` ignores its entropy sources and is
    random, hence not used.)
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, seed_text).int}"


def ultrasound_dataset(
    tissue: np.ndarray,
    *,
    patient: PatientInfo,
    study: StudyInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    annotations: Sequence[str] = (),
    synthetic: bool = True,
    view: str | None = None,
    laterality: str | None = None,
    series_number: int = 1,
    pixel_spacing_cm: float = 0.005,
) -> Dataset:
    """A scanner-screen Ultrasound Image Storage dataset around a tissue image.

    ``tissue`` is uint8, grey (rows, columns) or RGB (rows, columns, 3). It is placed in a
    larger black frame, with burned-in text outside it: patient name and id, study date,
    "THYROID", ``view`` (e.g. "RIGHT LOBE TRANS"), "SYNTHETIC" when ``synthetic``, and
    ``annotations`` in the side band; a depth scale in the right margin. The Sequence of
    Ultrasound Regions holds one 2D tissue region whose box is exactly the tissue, with
    ``pixel_spacing_cm`` as its physical delta. ``laterality`` (R, L, B or U) becomes Image
    Laterality. With ``synthetic`` the header says so (Manufacturer, Image Comments).
    Returns a dataset with file meta, ready for :func:`write_dataset` or a C-STORE.
    """
    tissue = _checked_pixels(tissue, "tissue")
    if laterality is not None and laterality not in _LATERALITIES:
        raise ValueError(f"laterality must be one of {_LATERALITIES}, not {laterality!r}")
    rows, columns = tissue.shape[:2]
    left, top = _SIDE, _HEADER
    height, width = top + rows + _BOTTOM, left + columns + _RIGHT
    colour = tissue.ndim == 3
    screen = Image.new("RGB" if colour else "L", (width, height), 0)
    draw = ImageDraw.Draw(screen)
    font = ImageFont.load_default()
    ink = (255, 255, 255) if colour else 255
    header_left = [
        _display_name(patient.patient_name),
        f"ID {patient.patient_id}",
        f"{_display_date(study.study_date)} {_display_time(study.study_time)}",
    ]
    header_right = ["THYROID", view or "", "SYNTHETIC" if synthetic else ""]
    for i, text in enumerate(header_left):
        draw.text((8, 6 + i * _LINE), _ascii(text), fill=ink, font=font)
    for i, text in enumerate(header_right):
        if text:
            draw.text((width // 2, 6 + i * _LINE), _ascii(text), fill=ink, font=font)
    for i, text in enumerate(annotations):
        draw.text((6, top + 6 + i * _LINE), _ascii(text), fill=ink, font=font)
    # Depth scale: a tick every 0.5 cm, longer every cm, as scanners draw beside the image.
    tick_step = max(4, round(0.5 / pixel_spacing_cm))
    for n, y in enumerate(range(top, top + rows, tick_step)):
        length = 10 if n % 2 == 0 else 5
        draw.line([(left + columns + 4, y), (left + columns + 4 + length, y)], fill=ink)
    # The tissue goes in last, so no text or tick can ever overlap it.
    screen.paste(Image.fromarray(tissue), (left, top))
    pixels = np.asarray(screen)

    ds = _base_dataset(
        pixels,
        patient=patient,
        study=study,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        series_number=series_number,
        synthetic=synthetic,
        note=f"view: {view}" if view else "",
    )
    ds.ImageType = ["DERIVED" if synthetic else "ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "YES"
    if laterality is not None:
        ds.ImageLaterality = laterality
    ds.SequenceOfUltrasoundRegions = DicomSequence(
        [_tissue_region((left, top, left + columns, top + rows), pixel_spacing_cm)]
    )
    return ds


def wrap_image(
    pixels: np.ndarray,
    *,
    patient: PatientInfo,
    study: StudyInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    synthetic: bool,
    source_note: str,
    series_number: int = 1,
    pixel_spacing_cm: float | None = None,
) -> Dataset:
    """An existing uint8 image (grey or RGB, e.g. a real PNG crop) as Ultrasound Image
    Storage, pixels unchanged, without a screen around it.

    The tissue region is the image's content box from :func:`pacs.pixels.content_box`: the
    whole image for a clean crop, less any band of burned-in text at its edge, so the region
    crop of the wrapped dataset equals the content crop the same image gets as a file.
    ``source_note`` (where the image came from) goes into Derivation Description and Image
    Comments. Without ``pixel_spacing_cm`` the region has no physical units.
    """
    pixels = _checked_pixels(pixels, "pixels")
    grey = pixels if pixels.ndim == 2 else np.asarray(Image.fromarray(pixels).convert("L"))
    ds = _base_dataset(
        pixels,
        patient=patient,
        study=study,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        series_number=series_number,
        synthetic=synthetic,
        note=source_note,
    )
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = source_note[:1024]
    ds.SequenceOfUltrasoundRegions = DicomSequence(
        [_tissue_region(content_box(grey), pixel_spacing_cm)]
    )
    return ds


def write_dataset(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM file (preamble, file meta; Explicit VR Little Endian unless
    its file meta names another transfer syntax), creating parent folders. The file appears
    complete or not at all (written beside it, then renamed). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(getattr(ds, "file_meta", None), FileMetaDataset):
        ds.file_meta = FileMetaDataset(getattr(ds, "file_meta", Dataset()))
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "MediaStorageSOPClassUID" not in meta:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        dcmwrite(temporary, ds, enforce_file_format=True)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    logger.debug("wrote DICOM file", extra={"path": str(path)})
    return path


# --------------------------------------------------------------------------- helpers


def _checked_pixels(pixels: np.ndarray, name: str) -> np.ndarray:
    """uint8 (rows, columns) or (rows, columns, 3), C-contiguous; ValueError otherwise."""
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"{name} must be (rows, columns) or (rows, columns, 3), got {array.shape}")
    if min(array.shape[:2]) < 1:
        raise ValueError(f"{name} is empty: {array.shape}")
    return np.ascontiguousarray(array)


def _base_dataset(
    pixels: np.ndarray,
    *,
    patient: PatientInfo,
    study: StudyInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    series_number: int,
    synthetic: bool,
    note: str,
) -> Dataset:
    """Patient, study, series, equipment, image and pixel modules common to both writers."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    # UTF-8, so names and comments (the em dash of the synthetic marker) survive.
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = sop_instance_uid

    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date or ""
    ds.PatientSex = patient.sex or ""

    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.StudyDescription = study.description
    ds.ReferringPhysicianName = study.referring
    ds.StudyID = study.accession_number[:16]

    ds.Modality = "US"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = study.study_date
    ds.SeriesTime = study.study_time
    ds.BodyPartExamined = "THYROID"
    ds.Manufacturer = SYNTHETIC_MANUFACTURER if synthetic else ""

    ds.InstanceNumber = instance_number
    ds.ContentDate = study.study_date
    ds.ContentTime = study.study_time
    ds.PatientOrientation = ""
    ds.LossyImageCompression = "00"
    comments = [SYNTHETIC_COMMENT] if synthetic else []
    if note:
        comments.append(note)
    if comments:
        ds.ImageComments = "; ".join(comments)[:10240]

    rows, columns = pixels.shape[:2]
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    if pixels.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"
    return ds


def _tissue_region(box: tuple[int, int, int, int], spacing_cm: float | None) -> Dataset:
    """A Sequence of Ultrasound Regions item: 2D tissue over ``box`` (right/bottom exclusive;
    DICOM's MaxX1/MaxY1 are inclusive)."""
    left, top, right, bottom = box
    item = Dataset()
    item.RegionSpatialFormat = 1  # 2D (tissue or flow)
    item.RegionDataType = 1  # tissue
    item.RegionFlags = 0
    item.RegionLocationMinX0 = left
    item.RegionLocationMinY0 = top
    item.RegionLocationMaxX1 = right - 1
    item.RegionLocationMaxY1 = bottom - 1
    # 3 = cm; 0 = none, for images whose scale nobody knows.
    units = 3 if spacing_cm else 0
    item.PhysicalUnitsXDirection = units
    item.PhysicalUnitsYDirection = units
    item.PhysicalDeltaX = float(spacing_cm or 0.0)
    item.PhysicalDeltaY = float(spacing_cm or 0.0)
    return item


def _ascii(text: str) -> str:
    """Text the default bitmap font can draw (scanners burn in plain ASCII as well)."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return folded.upper()


def _display_name(name: str) -> str:
    parts = [p for p in name.split("^") if p]
    return ", ".join(parts[:2]) if parts else name


def _display_date(date: str) -> str:
    return f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 and date.isdigit() else date


def _display_time(time: str) -> str:
    return f"{time[:2]}:{time[2:4]}" if len(time) >= 4 and time[:4].isdigit() else time
