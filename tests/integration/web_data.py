"""A small, real data set for the web page's tests: DICOM files in a spool, registered,
predicted, aggregated, with evidence maps, through the repository the pipeline uses.

``seed(engine, spool)`` returns what the tests look for (ids, and the distinctive
patient id and name that must never reach a URL or a log line).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import Engine, insert, select

from thyrocad.db import repository as repo
from thyrocad.db.engine import make_session_factory
from thyrocad.db.records import InstanceRecord, ModelVersionRecord, PredictionRecord
from thyrocad.db.schema import EvidenceMap, Prediction, Study
from thyrocad.pacs.dicom_files import PatientInfo, StudyInfo, ultrasound_dataset, write_dataset

CLASSES = ("autoimmune", "normal")
VERSION = "vgg19-web-1"
OLD_VERSION = "vgg19-web-0"
INPUT_SIZE = 64
# Distinctive, so that a search of URLs, logs and metrics can find any leak.
PATIENT_ID = "PIDZQX4417"
PATIENT_NAME = "Quokkafeld^Wilhelmina"
ACCESSION = "ACCZQ9931"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Seeded:
    study_id: int  # the distinctive patient's study, with three images
    study_uid: str
    prediction_ids: tuple[int, ...]  # its images' predictions under VERSION
    evidence_prediction_ids: tuple[int, ...]  # those with an evidence map
    other_study_ids: tuple[int, ...]  # newest first, by result
    no_finding_study_id: int
    all_study_ids: tuple[int, ...]


def evidence_png(peak: tuple[int, int], grid: int = 14) -> bytes:
    """An 8-bit grey map at a conv grid with its peak (255) at ``peak`` (row, column)."""
    rows, cols = np.mgrid[0:grid, 0:grid]
    heat = np.exp(-((rows - peak[0]) ** 2 + (cols - peak[1]) ** 2) / 6.0)
    pixels = np.round(255 * heat / heat.max()).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _tissue(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(110, 25, size=(96, 128)).clip(0, 255)
    return base.astype(np.uint8)


def _instance(
    spool: Path, *, patient: PatientInfo, study: StudyInfo, number: int, seed: int
) -> InstanceRecord:
    series_uid = f"{study.study_instance_uid}.1"
    sop_uid = f"{study.study_instance_uid}.1.{number}"
    ds = ultrasound_dataset(
        _tissue(seed),
        patient=patient,
        study=study,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        instance_number=number,
    )
    path = write_dataset(ds, spool / f"{sop_uid}.dcm")
    return InstanceRecord(
        sop_instance_uid=sop_uid,
        sop_class_uid=str(ds.SOPClassUID),
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=series_uid,
        spool_path=str(path),
        sha256=f"{seed:064x}",
        size_bytes=path.stat().st_size,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        patient_key=patient.patient_id,
        patient_name=patient.patient_name,
        patient_birth_date=date(1961, 4, 5),
        patient_sex="F",
        study_date=date.fromisoformat(
            f"{study.study_date[:4]}-{study.study_date[4:6]}-{study.study_date[6:]}"
        ),
        accession_number=study.accession_number,
        modality="US",
    )


def _predict(
    session, instance_id: int, p: float, version: str = VERSION, now: datetime = T0
) -> None:
    label = CLASSES[0] if p >= 0.5 else CLASSES[1]
    repo.save_predictions(
        session,
        [
            PredictionRecord(
                instance_id=instance_id,
                model_version=version,
                label=label,
                probability=p,
                probabilities={CLASSES[0]: p, CLASSES[1]: 1 - p},
            )
        ],
        None,
        now,
    )


def seed(engine: Engine, spool: Path, registry: Path | None = None) -> Seeded:
    """Fill a migrated database (and ``spool``) with the web page's test studies."""
    sessions = make_session_factory(engine)
    artifact = (registry or spool.parent / "models") / VERSION / "model.keras"
    with sessions.begin() as session:
        for version in (OLD_VERSION, VERSION):
            repo.upsert_model_version(
                session,
                ModelVersionRecord(
                    version=version,
                    architecture="vgg19",
                    classes=CLASSES,
                    input_size=INPUT_SIZE,
                    artifact_path=str(artifact.parent.parent / version / "model.keras"),
                    metrics=_metrics() if version == VERSION else {},
                    created_at=T0 - timedelta(days=2 if version == OLD_VERSION else 1),
                ),
                T0,
            )
            repo.set_active_model(session, version, T0, actor="ml-owner")

    patient = PatientInfo(PATIENT_ID, PATIENT_NAME, "19610405", "F")
    main_study = StudyInfo("1.2.826.0.1.3680043.10.9999.1", "20260301", "101500", ACCESSION)
    probabilities = (0.91, 0.72, 0.35)
    with sessions.begin() as session:
        ids = [
            repo.register_instance(
                session,
                _instance(spool, patient=patient, study=main_study, number=n + 1, seed=100 + n),
                T0,
            ).instance_id
            for n in range(3)
        ]
        for instance_id, p in zip(ids, probabilities, strict=True):
            _predict(session, instance_id, p, OLD_VERSION, T0)
            _predict(session, instance_id, p, VERSION, T0 + timedelta(minutes=1))
        study_id = session.execute(
            select(Study.id).where(Study.study_instance_uid == main_study.study_instance_uid)
        ).scalar_one()
        mean = float(np.mean(probabilities))
        for revision, version in enumerate((OLD_VERSION, VERSION), start=1):
            repo.save_study_result(
                session,
                study_id,
                version,
                "mean",
                CLASSES[0],
                mean - 0.01 * (2 - revision),
                {CLASSES[0]: mean, CLASSES[1]: 1 - mean},
                3,
                T0 + timedelta(minutes=revision),
            )
        patient_id = session.execute(
            select(Study.patient_id).where(Study.id == study_id)
        ).scalar_one()
        repo.save_patient_result(
            session,
            patient_id,
            VERSION,
            "mean",
            CLASSES[0],
            mean,
            {CLASSES[0]: mean, CLASSES[1]: 1 - mean},
            3,
            1,
            T0 + timedelta(minutes=3),
        )
        prediction_ids = tuple(
            session.execute(
                select(Prediction.id)
                .where(Prediction.instance_id.in_(ids), Prediction.model_version == VERSION)
                .order_by(Prediction.instance_id)
            ).scalars()
        )
        with_evidence = prediction_ids[:2]
        session.execute(
            insert(EvidenceMap),
            [
                {
                    "prediction_id": pid,
                    "method": "grad-cam",
                    "layer": "block5_conv4",
                    "png": evidence_png((3 + 6 * i, 4 + 5 * i)),
                    "created_at": T0,
                }
                for i, pid in enumerate(with_evidence)
            ],
        )

    # Twelve more studies of other patients, one result each, a day apart; every third
    # labelled, every fourth in 2025; one without a usable image.
    others: list[int] = []
    no_finding = 0
    for k in range(12):
        other_patient = PatientInfo(f"OTHER{k:02d}", f"Other^Patient{k:02d}", "19700101", "M")
        year = 2025 if k % 4 == 0 else 2026
        study = StudyInfo(
            f"1.2.826.0.1.3680043.10.9999.{100 + k}",
            f"{year}01{k + 1:02d}",
            "080000",
            f"ACC{k:04d}",
        )
        with sessions.begin() as session:
            instance_id = repo.register_instance(
                session,
                _instance(spool, patient=other_patient, study=study, number=1, seed=200 + k),
                T0,
            ).instance_id
            sid = session.execute(
                select(Study.id).where(Study.study_instance_uid == study.study_instance_uid)
            ).scalar_one()
            when = T0 + timedelta(hours=1 + k)
            if k == 5:
                repo.mark_rejected(session, instance_id, "cannot decode frame 0 of 1")
                repo.save_study_result(
                    session,
                    sid,
                    VERSION,
                    "mean",
                    None,
                    None,
                    {},
                    0,
                    when,
                    reason="no usable images",
                )
                no_finding = sid
            else:
                p = 0.2 + 0.05 * k
                _predict(session, instance_id, p, VERSION, when)
                repo.save_study_result(
                    session,
                    sid,
                    VERSION,
                    "mean",
                    CLASSES[0] if p >= 0.5 else CLASSES[1],
                    p,
                    {CLASSES[0]: p, CLASSES[1]: 1 - p},
                    1,
                    when,
                )
            if k % 3 == 0:
                repo.add_label(
                    session,
                    study_uid=study.study_instance_uid,
                    diagnosis=CLASSES[1],
                    labelled_by="dr-seed",
                    source="cli",
                    now=when,
                )
            others.append(sid)
    others.reverse()  # newest result first
    return Seeded(
        study_id=study_id,
        study_uid=main_study.study_instance_uid,
        prediction_ids=prediction_ids,
        evidence_prediction_ids=with_evidence,
        other_study_ids=tuple(others),
        no_finding_study_id=no_finding,
        all_study_ids=(*others, study_id),
    )


def _metrics() -> dict[str, object]:
    def metric(value: float) -> dict[str, object]:
        return {"value": value, "ci95": [round(value - 0.08, 3), round(min(1.0, value + 0.05), 3)]}

    level = {
        name: metric(v)
        for name, v in (
            ("accuracy", 0.86),
            ("auc", 0.912),
            ("sensitivity", 0.84),
            ("specificity", 0.88),
            ("precision", 0.87),
            ("f1", 0.855),
        )
    }
    return {
        "positive_class": CLASSES[0],
        "threshold": 0.5,
        "patient_rule": "mean",
        "classes": list(CLASSES),
        "image": {**level, "n": 120},
        "patient": {**level, "n": 24},
    }
