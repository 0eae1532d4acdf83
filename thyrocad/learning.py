"""Train, evaluate and register a model from images on disk (the ``train``/``evaluate`` commands).

Pixels go through ``pacs.pixels`` — the same preprocessing inference uses —
before ``models`` sees them as arrays.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.data import ImageRecord, discover
from models.errors import DatasetError
from pacs.errors import PixelError
from pacs.pixels import FramePolicy, images_from_file
from thyrocad.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedImages:
    images: np.ndarray  # (N, S, S) uint8
    labels: list[str]
    patient_ids: list[str]
    skipped: list[tuple[Path, str]]


def load_images(
    records: Sequence[ImageRecord],
    size: int,
    policy: FramePolicy | None = None,
    on_image: Callable[[], None] | None = None,
) -> LoadedImages:
    """Decode and preprocess every record; undecodable files are skipped with a reason."""
    policy = policy or FramePolicy()
    pixels, labels, patients, skipped = [], [], [], []
    for rec in records:
        try:
            frames = images_from_file(rec.path, size, policy)
        except PixelError as exc:
            skipped.append((rec.path, exc.reason))
            logger.warning("skipped %s: %s", rec.path.name, exc.reason)
        else:
            for frame in frames:
                pixels.append(frame.pixels)
                labels.append(rec.label)
                patients.append(rec.patient_id)
        if on_image:
            on_image()
    if not pixels:
        raise DatasetError("no image could be decoded")
    return LoadedImages(np.stack(pixels), labels, patients, skipped)


def load_dataset(
    source: Path,
    size: int,
    classes: Sequence[str] | None = None,
    on_image: Callable[[], None] | None = None,
) -> LoadedImages:
    """A folder or CSV manifest, decoded at ``size``."""
    return load_images(discover(source, classes), size, on_image=on_image)


@dataclass(frozen=True)
class Trained:
    version: str
    metrics: dict[str, Any] | None


def train_and_register(
    s: Settings,
    images: np.ndarray,
    labels: list[str],
    patient_ids: list[str],
    *,
    arch: str,
    epochs: int,
    batch_size: int,
    input_size: int,
    weights: str,
    seed: int,
    registry_dir: Path,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.0,
    early_stopping: int | None = None,
    augment_variants: int = 0,
    source: str = "",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> Trained:
    """Train (patient split), evaluate the held-out patients, save a registry version."""
    from models.evaluation import evaluate
    from models.evaluation_report import report_to_json
    from models.registry import Registry
    from models.training import TrainConfig
    from models.training import train as train_model

    config = TrainConfig(
        arch=arch,
        classes=tuple(s.classes),
        input_size=input_size,
        epochs=epochs,
        batch_size=batch_size,
        weights=None if weights == "none" else weights,
        seed=seed,
        test_fraction=test_fraction,
        validation_fraction=validation_fraction,
        early_stopping_patience=early_stopping,
        augment_variants=augment_variants,
    )
    result = train_model(images, labels, patient_ids, config, on_epoch=on_epoch)
    metadata = dict(result.metadata)
    metadata["source"] = source
    metrics = None
    if len(set(result.test_labels)) >= 2:
        report = evaluate(
            result.test_labels,
            result.test_probabilities,
            result.test_patients,
            tuple(s.classes),
            positive_class=s.positive_class,
            seed=seed,
        )
        metrics = metadata["metrics"] = report_to_json(report)
    version = Registry(registry_dir).save(result.model, metadata)
    return Trained(version.version, metrics)


def promote_version(s: Settings, version: str, registry_dir: Path) -> None:
    """Make a registry version active on disk and in the database the workers read."""
    from db import repository
    from db.engine import make_engine, make_session_factory, upgrade
    from models.registry import Registry
    from worker.retraining import version_record

    v = Registry(registry_dir).promote(version)
    now = dt.datetime.now(dt.UTC)
    if not s.database_url:
        upgrade(s.db_url)
    with make_session_factory(make_engine(s.db_url)).begin() as session:
        repository.upsert_model_version(session, version_record(v, now), now)
        repository.set_active_model(session, v.version, now)
