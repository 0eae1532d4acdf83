"""One training run, start to end: train, evaluate the held-out patients, save a version.

The ``train`` command and the refit both register their models here; the images
come decoded (``pacs.datasets``), so this module needs nothing but arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thyrocad.models.evaluation import evaluate
from thyrocad.models.evaluation_report import EVALUATION_FOLDER, report_to_json, write_report
from thyrocad.models.registry import Registry
from thyrocad.models.training import TrainConfig
from thyrocad.models.training import train as train_model


@dataclass(frozen=True)
class Trained:
    version: str
    metrics: dict[str, Any] | None


def train_and_register(
    images: np.ndarray,
    labels: list[str],
    patient_ids: list[str],
    *,
    classes: Sequence[str],
    positive_class: str,
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
    """Train (patient split), evaluate the held-out patients, save a registry version.

    ``images`` are preprocessed arrays (N, S, S) with one label and patient id each;
    ``weights`` is ``imagenet``, ``none`` or a weights file. Returns the new version
    and its test-split metrics (None when the test split holds one class only).
    """
    config = TrainConfig(
        arch=arch,
        classes=tuple(classes),
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
    write_extras = None
    if len(set(result.test_labels)) >= 2:
        report = evaluate(
            result.test_labels,
            result.test_probabilities,
            result.test_patients,
            tuple(classes),
            positive_class=positive_class,
            seed=seed,
        )
        metrics = metadata["metrics"] = report_to_json(report)
        title = f"{arch} hold-out evaluation"

        def write_extras(folder: Path) -> None:
            # The plots the models page shows beside these metrics, from the same report.
            write_report(report, folder / EVALUATION_FOLDER, title)

    version = Registry(registry_dir).save(result.model, metadata, write_extras)
    return Trained(version.version, metrics)
