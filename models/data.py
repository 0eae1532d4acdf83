"""Datasets as records, patient-level splits, the paper's augmentation, and fingerprints.

``models`` never decodes DICOM: :func:`discover` only lists image files with their
patient and label; turning files into pixel arrays is ``pacs``' job, so training and
inference share one preprocessing path.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from thyrocad.models.errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm"})
MANIFEST_COLUMNS = ("path", "patient_id", "label")
_DICOM_MAGIC_OFFSET = 128


@dataclass(frozen=True)
class ImageRecord:
    """One image file with the patient it belongs to and its class label."""

    path: Path
    patient_id: str
    label: str


@dataclass(frozen=True)
class Split:
    """Patient ids on each side of a split; a patient is on exactly one side."""

    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]


def _has_dicom_preamble(path: Path) -> bool:
    """Recognise a DICOM file by the "DICM" marker after its 128-byte preamble."""
    try:
        with path.open("rb") as handle:
            handle.seek(_DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _is_image(path: Path) -> bool:
    if path.name.startswith(".") or not path.is_file():
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    # DICOM files often have no extension or are named by their UID ("1.2.840...").
    return _has_dicom_preamble(path)


def _discover_folder(root: Path) -> list[ImageRecord]:
    records: list[ImageRecord] = []
    for class_dir in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if not class_dir.is_dir():
            continue
        for patient_dir in sorted(class_dir.iterdir()):
            if patient_dir.name.startswith("."):
                continue
            if not patient_dir.is_dir():
                if _is_image(patient_dir):
                    raise DatasetError(
                        f"{patient_dir} lies directly in a class folder; expected "
                        "DIR/<class>/<patient>/<image>"
                    )
                continue
            for image in sorted(patient_dir.rglob("*")):
                if _is_image(image):
                    records.append(ImageRecord(image, patient_dir.name, class_dir.name))
    return records


def _discover_manifest(manifest: Path) -> list[ImageRecord]:
    try:
        with manifest.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing_columns = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
            if missing_columns:
                raise DatasetError(
                    f"manifest {manifest} lacks column(s) {sorted(missing_columns)}; "
                    f"expected a header {','.join(MANIFEST_COLUMNS)}"
                )
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read manifest {manifest}: {exc}") from exc
    records: list[ImageRecord] = []
    missing: list[str] = []
    for line, row in enumerate(rows, start=2):
        raw_path, patient, label = ((row.get(column) or "").strip() for column in MANIFEST_COLUMNS)
        if not raw_path or not patient or not label:
            raise DatasetError(f"manifest {manifest} line {line}: empty path, patient or label")
        path = Path(raw_path)
        if not path.is_absolute():
            path = manifest.parent / path
        if not path.is_file():
            missing.append(str(path))
            continue
        records.append(ImageRecord(path, patient, label))
    if missing:
        shown = ", ".join(missing[:5])
        raise DatasetError(
            f"manifest {manifest} lists {len(missing)} missing file(s), e.g. {shown}"
        )
    return records


def discover(source: Path, classes: Sequence[str] | None = None) -> list[ImageRecord]:
    """List the images of a dataset folder or CSV manifest.

    ``source``: a folder ``DIR/<class>/<patient>/<image>`` (PNG, JPEG, ``.dcm``, or
    DICOM recognised by its preamble whatever its name, e.g. extension-less or a UID)
    or a CSV with header ``path,patient_id,label`` (relative paths resolved against
    the CSV's folder). ``classes``: when given, any other label is an error. Returns
    records sorted by label, patient and path. Raises DatasetError when the source is
    missing, empty, lists missing files or carries unknown labels.
    """
    source = Path(source)
    if source.is_dir():
        records = _discover_folder(source)
    elif source.is_file() and source.suffix.lower() == ".csv":
        records = _discover_manifest(source)
    elif source.exists():
        raise DatasetError(f"{source} is neither a dataset folder nor a .csv manifest")
    else:
        raise DatasetError(f"dataset {source} does not exist")
    if not records:
        raise DatasetError(
            f"no images found in {source}; expected DIR/<class>/<patient>/<image> "
            "(PNG, JPEG or DICOM) or a CSV manifest path,patient_id,label"
        )
    if classes is not None:
        unknown = sorted({r.label for r in records} - set(classes))
        if unknown:
            raise DatasetError(
                f"{source} has label(s) {unknown} outside the configured classes {list(classes)}"
            )
        absent = sorted(set(classes) - {r.label for r in records})
        if absent:
            logger.warning("classes without images", extra={"classes": absent})
    records.sort(key=lambda r: (r.label, r.patient_id, str(r.path)))
    logger.info("dataset discovered", extra={"images": len(records), "source": str(source)})
    return records


def patient_labels(patient_ids: Sequence[str], labels: Sequence[str]) -> dict[str, str]:
    """Map each patient to its label; DatasetError if a patient's images disagree.

    A patient's diagnosis is a property of the patient, so mixed labels mean a broken
    manifest; guessing the majority would hide it.
    """
    if len(patient_ids) != len(labels):
        raise DatasetError(
            f"{len(patient_ids)} patient ids but {len(labels)} labels: one of each per image"
        )
    seen: dict[str, set[str]] = defaultdict(set)
    for patient, label in zip(patient_ids, labels, strict=True):
        seen[str(patient)].add(str(label))
    mixed = sorted(p for p, found in seen.items() if len(found) > 1)
    if mixed:
        raise DatasetError(
            f"patient(s) {mixed[:5]} have images with different labels; a patient must "
            "carry one label"
        )
    return {patient: next(iter(found)) for patient, found in seen.items()}


def _side_counts(n: int, test_fraction: float, validation_fraction: float) -> tuple[int, int]:
    """Test and validation counts for ``n`` patients of one class, leaving train >= 1."""
    n_test = round(n * test_fraction)
    n_val = round(n * validation_fraction)
    # A class with two or more patients gets at least one on each requested side,
    # otherwise small classes silently vanish from the test set.
    if test_fraction > 0 and n_test == 0 and n >= 2:
        n_test = 1
    if validation_fraction > 0 and n_val == 0 and n >= 3:
        n_val = 1
    while n_test + n_val > n - 1 and n_val > 0:
        n_val -= 1
    while n_test + n_val > n - 1 and n_test > 0:
        n_test -= 1
    return n_test, n_val


def split_by_patient(
    patient_ids: Sequence[str],
    labels: Sequence[str],
    test_fraction: float = 0.2,
    validation_fraction: float = 0.0,
    seed: int = 0,
) -> Split:
    """Split patients into train / validation / test, stratified by patient label.

    In: one patient id and one label per image. Fractions are of all patients, taken
    per class (rounded, at least one patient per requested side for classes with
    enough patients, always at least one in train). Same inputs and seed give the same
    split whatever the input order. A patient whose images carry different labels
    raises DatasetError. Returns sorted patient ids per side.
    """
    if not 0 <= test_fraction < 1 or not 0 <= validation_fraction < 1:
        raise DatasetError("test_fraction and validation_fraction must lie in [0, 1)")
    if test_fraction + validation_fraction >= 1:
        raise DatasetError("test_fraction + validation_fraction must stay below 1")
    by_patient = patient_labels(patient_ids, labels)
    if not by_patient:
        raise DatasetError("cannot split an empty dataset")
    rng = np.random.default_rng(seed)
    train: list[str] = []
    validation: list[str] = []
    test: list[str] = []
    for label in sorted(set(by_patient.values())):
        patients = sorted(p for p, found in by_patient.items() if found == label)
        order = [patients[i] for i in rng.permutation(len(patients))]
        n_test, n_val = _side_counts(len(order), test_fraction, validation_fraction)
        test.extend(order[:n_test])
        validation.extend(order[n_test : n_test + n_val])
        train.extend(order[n_test + n_val :])
    return Split(tuple(sorted(train)), tuple(sorted(validation)), tuple(sorted(test)))


def augment(
    images: np.ndarray,
    rng: np.random.Generator,
    max_shift: float = 0.1,
    max_zoom: float = 0.1,
) -> np.ndarray:
    """Randomly shift and zoom each image, as the paper augments.

    In: uint8 ``(N, H, W)`` or ``(N, H, W, 1)``; shifts up to ``max_shift`` of the size
    and zoom factors in ``[1 - max_zoom, 1 + max_zoom]``, drawn from ``rng``; edges
    filled with the nearest pixel, as Keras' ImageDataGenerator does. Out: a new uint8
    array of the same shape.
    """
    if images.dtype != np.uint8:
        raise DatasetError(f"augment expects uint8 images, got {images.dtype}")
    squeeze = images.ndim == 4 and images.shape[-1] == 1
    stack = images[..., 0] if squeeze else images
    if stack.ndim != 3:
        raise DatasetError(f"augment expects (N, H, W) or (N, H, W, 1), got {images.shape}")
    n, height, width = stack.shape
    out = np.empty_like(stack)
    centre = np.array([(height - 1) / 2, (width - 1) / 2])
    for i in range(n):
        zoom = rng.uniform(1 - max_zoom, 1 + max_zoom)
        shift = rng.uniform(-max_shift, max_shift, size=2) * np.array([height, width])
        # affine_transform maps output coordinates to input ones: zoom > 1 magnifies.
        matrix = np.eye(2) / zoom
        offset = centre - matrix @ centre - shift
        warped = ndimage.affine_transform(
            stack[i].astype(np.float32), matrix, offset=offset, order=1, mode="nearest"
        )
        out[i] = np.clip(np.rint(warped), 0, 255).astype(np.uint8)
    return out[..., None] if squeeze else out


def fingerprint(images: np.ndarray, labels: Sequence[str], patient_ids: Sequence[str]) -> str:
    """Return the sha256 hex digest of the pixels (with shape and dtype), labels and patients."""
    digest = hashlib.sha256()
    array = np.ascontiguousarray(images)
    digest.update(json.dumps({"shape": list(array.shape), "dtype": str(array.dtype)}).encode())
    digest.update(array.tobytes())
    digest.update(json.dumps([str(label) for label in labels]).encode())
    digest.update(json.dumps([str(patient) for patient in patient_ids]).encode())
    return digest.hexdigest()


def class_counts(labels: Sequence[str]) -> dict[str, int]:
    """Count images per label, sorted by label (for logs and metadata)."""
    return dict(sorted(Counter(str(label) for label in labels).items()))
