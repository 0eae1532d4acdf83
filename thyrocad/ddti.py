"""The DDTI thyroid ultrasound crops (Pedraza et al., SPIE 2015) as thyrocad inputs.

``cropped/CASE_IMAGE(NODULE).png`` with ``diagnosis.csv`` (``name,tirads``).
TI-RADS 2–3 is read as benign, 4a–5 as suspicious; unlabelled crops are left
out of training. CASE is the patient: every split is by it, never by file.
The labels are nodule risk, not thyroiditis — real tissue for the pipeline and a
real-data exercise of training and evaluation, not a measure of the paper's task.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from thyrocad.pacs.dicom_files import PatientInfo, StudyInfo, uid_from, wrap_image, write_dataset

BENIGN = {"2", "3"}
SUSPICIOUS = {"4a", "4b", "4c", "5"}
CLASSES = ("suspicious", "benign")
_NAME = re.compile(r"^(?P<case>\d+)_(?P<image>\d+)")


@dataclass(frozen=True)
class Crop:
    path: Path
    case: str
    tirads: str
    label: str | None  # None when unlabelled


def read_crops(root: Path) -> list[Crop]:
    """Every crop with its case id and binarised label."""
    tirads: dict[str, str] = {}
    with open(root / "diagnosis.csv", newline="") as handle:
        for row in csv.reader(handle):
            if row and row[0] != "name":
                tirads[row[0].strip()] = (row[1] if len(row) > 1 else "").strip().lower()
    crops = []
    for path in sorted((root / "cropped").glob("*.png")):
        match = _NAME.match(path.stem)
        if not match:
            continue
        score = tirads.get(path.stem, "")
        label = "benign" if score in BENIGN else "suspicious" if score in SUSPICIOUS else None
        crops.append(Crop(path, match["case"], score, label))
    return crops


def write_manifest(crops: list[Crop], out: Path) -> Path:
    """A ``path,patient_id,label`` manifest of the labelled crops for ``thyrocad train``."""
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", "label"])
        for crop in crops:
            if crop.label:
                writer.writerow([str(crop.path.resolve()), f"DDTI{crop.case}", crop.label])
    return out


def wrap_as_dicom(crops: list[Crop], out: Path) -> list[Path]:
    """Each case becomes one study of Ultrasound Image Storage instances (real, not synthetic)."""
    paths = []
    for number, crop in enumerate(crops, start=1):
        patient = PatientInfo(patient_id=f"DDTI{crop.case}", patient_name=f"DDTI^{crop.case}")
        study = StudyInfo(
            study_instance_uid=uid_from(f"ddti/{crop.case}/study"),
            study_date="20150101",
            study_time="000000",
            accession_number=f"DDTI{crop.case}",
        )
        ds = wrap_image(
            np.asarray(Image.open(crop.path).convert("L")),
            patient=patient,
            study=study,
            series_instance_uid=uid_from(f"ddti/{crop.case}/series"),
            sop_instance_uid=uid_from(f"ddti/{crop.path.name}"),
            instance_number=number,
            synthetic=False,
            source_note="DDTI database crop (Pedraza et al., SPIE 2015)",
        )
        paths.append(write_dataset(ds, out / f"DDTI{crop.case}" / f"{crop.path.stem}.dcm"))
    return paths
