"""Synthetic thyroid ultrasound studies on disk: pixels from ``models.synth``, DICOM from ``pacs``.

Layout ``OUT/<label>/<patient>/<view>.dcm`` (or ``.png``) — the same folder
layout training reads, so a synthetic set is directly trainable. Every image is
marked synthetic in its header and never presented as clinical data.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from thyrocad.models.synth import synth_patient
from thyrocad.pacs.dicom_files import (
    PatientInfo,
    StudyInfo,
    uid_from,
    ultrasound_dataset,
    write_dataset,
)


@dataclass(frozen=True)
class SyntheticPatient:
    patient_id: str
    label: str
    study_instance_uid: str
    paths: tuple[Path, ...]


def write_synthetic_set(
    out: Path,
    patients: int,
    *,
    seed: int = 0,
    size: int = 224,
    fmt: str = "dicom",
    classes: tuple[str, str] = ("autoimmune", "normal"),
    autoimmune_fraction: float = 0.5,
    id_prefix: str = "SYN",
    patient_name: str | None = None,
) -> list[SyntheticPatient]:
    """Write ``patients`` synthetic patients, one 5-image study each; deterministic in ``seed``.

    Patient IDs are ``id_prefix`` + seed + index; names ``SYNTHETIC^<id>`` unless
    ``patient_name`` gives every patient that one (a test looking for leaks wants a
    name found nowhere else).
    """
    if fmt not in ("dicom", "png"):
        raise ValueError("format must be 'dicom' or 'png'")
    rng = np.random.default_rng(seed)
    n_pos = int(round(patients * autoimmune_fraction))
    labels = [classes[0]] * n_pos + [classes[1]] * (patients - n_pos)
    rng.shuffle(labels)
    written = []
    base_date = dt.date(2026, 1, 5)
    for index, label in enumerate(labels):
        pid = f"{id_prefix}{seed:03d}{index:04d}"
        images = synth_patient(np.random.default_rng([seed, index]), label, size)
        folder = out / label / pid
        folder.mkdir(parents=True, exist_ok=True)
        study_uid = uid_from(f"thyrocad-synth/{seed}/{index}/study")
        series_uid = uid_from(f"thyrocad-synth/{seed}/{index}/series")
        date = base_date + dt.timedelta(days=index)
        patient = PatientInfo(patient_id=pid, patient_name=patient_name or f"SYNTHETIC^{pid}")
        study = StudyInfo(
            study_instance_uid=study_uid,
            study_date=date.strftime("%Y%m%d"),
            study_time="101500",
            accession_number=f"ACC{seed:03d}{index:04d}",
        )
        paths = []
        for number, image in enumerate(images, start=1):
            if fmt == "png":
                path = folder / f"{number}_{image.view}.png"
                Image.fromarray(image.pixels).save(path)
            else:
                ds = ultrasound_dataset(
                    image.pixels,
                    patient=patient,
                    study=study,
                    series_instance_uid=series_uid,
                    sop_instance_uid=uid_from(f"thyrocad-synth/{seed}/{index}/{number}"),
                    instance_number=number,
                    view=image.view.replace("_", " ").upper(),
                    synthetic=True,
                )
                path = write_dataset(ds, folder / f"{number}_{image.view}.dcm")
            paths.append(path)
        written.append(SyntheticPatient(pid, label, study_uid, tuple(paths)))
    return written
