"""Predictions as CSV (``patient_id,label,prob_<class>,...``): what ``thyrocad evaluate
--predictions`` reads, so metrics can be computed for any model's output."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from thyrocad.models.errors import EvaluationError


def read_predictions_csv(path: Path) -> tuple[list[str], np.ndarray, list[str], tuple[str, ...]]:
    """Read a predictions CSV ``patient_id,label,prob_<class>,...``.

    Classes come from the ``prob_`` columns in header order; other columns are ignored.

    Returns:
        ``(labels, probabilities (n, n_classes) float64, patient_ids, classes)``, the
        arguments ``evaluate`` takes.

    Raises:
        EvaluationError: unreadable file, missing or duplicate columns, fewer than two
            ``prob_`` columns, ragged rows, empty fields, bad or non-finite numbers, no rows.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationError(f"cannot read predictions CSV {path}: {exc}") from exc
    if not rows:
        raise EvaluationError(f"predictions CSV {path} is empty; expected a header row")
    header = [name.strip() for name in rows[0]]
    if len(set(header)) != len(header):
        raise EvaluationError(f"predictions CSV {path} has duplicate columns: {header}")
    missing = [name for name in ("patient_id", "label") if name not in header]
    prob_columns = [i for i, name in enumerate(header) if name.startswith("prob_")]
    classes = tuple(header[i][len("prob_") :] for i in prob_columns)
    if missing or len(prob_columns) < 2 or "" in classes:
        raise EvaluationError(
            f"predictions CSV {path} needs columns patient_id, label and at least two "
            f"prob_<class> columns; header is {header}"
        )
    pid_col, label_col = header.index("patient_id"), header.index("label")
    labels: list[str] = []
    patient_ids: list[str] = []
    values: list[list[float]] = []
    for line_number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # a blank line, e.g. at the end of the file
        if len(row) != len(header):
            raise EvaluationError(
                f"{path} line {line_number}: {len(row)} fields, header has {len(header)}"
            )
        patient, label = row[pid_col].strip(), row[label_col].strip()
        if not patient or not label:
            raise EvaluationError(f"{path} line {line_number}: empty patient_id or label")
        numbers = []
        for column in prob_columns:
            try:
                number = float(row[column])
            except ValueError:
                raise EvaluationError(
                    f"{path} line {line_number}: {header[column]} is not a number: {row[column]!r}"
                ) from None
            if not math.isfinite(number):
                raise EvaluationError(
                    f"{path} line {line_number}: {header[column]} is not finite: {row[column]!r}"
                )
            numbers.append(number)
        labels.append(label)
        patient_ids.append(patient)
        values.append(numbers)
    if not values:
        raise EvaluationError(f"predictions CSV {path} has a header but no prediction rows")
    return labels, np.array(values, dtype=np.float64), patient_ids, classes


def write_predictions_csv(
    path: Path,
    labels: Sequence[str],
    probabilities: np.ndarray,
    patient_ids: Sequence[str],
    classes: Sequence[str],
) -> Path:
    """Write predictions in the format ``read_predictions_csv`` reads; returns ``path``.

    Floats are written with ``repr`` so that reading them back gives the same values.

    Raises:
        EvaluationError: the inputs differ in length or the columns do not match classes.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise EvaluationError(
            f"probabilities of shape {probs.shape} do not match {len(classes)} classes"
        )
    if not len(labels) == probs.shape[0] == len(patient_ids):
        raise EvaluationError("labels, probability rows and patient ids differ in number")
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "label", *(f"prob_{name}" for name in classes)])
        for patient, label, row in zip(patient_ids, labels, probs, strict=True):
            writer.writerow([patient, label, *(repr(float(v)) for v in row)])
    return path
