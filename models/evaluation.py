"""Honest evaluation of a classifier: image- and patient-level metrics with bootstrap CIs.

What this module guarantees, because the paper it implements did not (see PAPER.md):

- Point metrics equal scikit-learn's on the same predictions (``accuracy_score``,
  ``roc_auc_score``, ``recall_score``, ``precision_score``, ``f1_score`` with
  ``zero_division=0``, ``confusion_matrix``); values are fractions, not percentages.
- One decision rule everywhere: an image (or patient) is predicted positive when its
  positive-class probability is >= ``threshold``; otherwise it gets the most probable of
  the other classes. Sensitivity, specificity, precision and F1 are positive-vs-rest.
- The per-class table comes from the same confusion matrix, so in a binary task the
  sensitivity of one class is the specificity of the other.
- 95 % confidence intervals by a seeded percentile bootstrap over *patients*: images of
  one patient are correlated, so resampling images would understate the uncertainty.
- Inputs that cannot give honest metrics raise ``EvaluationError``, never a number.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from thyrocad.models import scoring
from thyrocad.models.aggregation import RULES, combine
from thyrocad.models.errors import EvaluationError
from thyrocad.models.scoring import METRIC_NAMES

logger = logging.getLogger(__name__)

# Rows are softmax outputs; CSVs written elsewhere round them, so allow a little slack.
_SUM_TOLERANCE = 1e-3
_MIN_BOOTSTRAP = 100


@dataclass(frozen=True)
class Metric:
    """A point estimate (a fraction) and its 95 % bootstrap percentile interval."""

    value: float
    ci95: tuple[float, float]


@dataclass(frozen=True)
class LevelReport:
    """Metrics at one level (image or patient).

    ``confusion`` has true classes as rows and predicted classes as columns, both in the
    report's class order. ``per_class`` holds one dict per class (one-vs-rest): class,
    support, precision, sensitivity (= recall), specificity, f1.
    """

    n: int
    accuracy: Metric
    auc: Metric
    sensitivity: Metric
    specificity: Metric
    precision: Metric
    f1: Metric
    confusion: list[list[int]]
    per_class: list[dict]


@dataclass(frozen=True)
class EvaluationReport:
    """The whole evaluation: both levels, the settings that produced them and curves.

    ``curves[level]`` holds ``roc`` ({"fpr", "tpr", "auc"}) for the positive class and
    ``pr`` ({class: {"recall", "precision", "average_precision"}}) per class.
    ``bootstrap`` records how the intervals were computed.
    """

    classes: tuple[str, ...]
    positive_class: str
    threshold: float
    patient_rule: str
    image: LevelReport
    patient: LevelReport
    curves: dict
    bootstrap: dict = field(default_factory=dict)


def _level_report(
    level: scoring.Level, resampled: dict[str, np.ndarray], classes: Sequence[str]
) -> LevelReport:
    point = scoring.weighted_metrics(level, np.ones((1, level.true.shape[0])))
    n_classes = len(classes)
    confusion = np.bincount(
        level.true * n_classes + level.predicted, minlength=n_classes * n_classes
    ).reshape(n_classes, n_classes)
    metrics = {
        name: Metric(float(point[name][0]), scoring.percentile_ci(resampled[name]))
        for name in METRIC_NAMES
    }
    return LevelReport(
        n=int(level.true.shape[0]),
        confusion=confusion.tolist(),
        per_class=scoring.per_class_table(confusion, classes),
        **metrics,
    )


def _validate(
    labels: Sequence[str],
    probabilities: np.ndarray,
    patient_ids: Sequence[str],
    classes: Sequence[str],
    positive_class: str | None,
    threshold: float,
    patient_rule: str,
    n_bootstrap: int,
) -> tuple[tuple[str, ...], str, np.ndarray, np.ndarray, list[str]]:
    classes = tuple(str(c) for c in classes)
    if len(classes) < 2 or len(set(classes)) != len(classes) or "" in classes:
        raise EvaluationError(f"classes must be at least two distinct names, got {classes}")
    positive = classes[0] if positive_class is None else positive_class
    if positive not in classes:
        raise EvaluationError(f"positive class {positive!r} is not one of {classes}")
    try:
        threshold_ok = 0.0 <= float(threshold) <= 1.0  # False for NaN as well
    except (TypeError, ValueError):
        threshold_ok = False
    if not threshold_ok:
        raise EvaluationError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if patient_rule not in RULES:
        raise EvaluationError(f"unknown patient rule {patient_rule!r}; expected one of {RULES}")
    if not isinstance(n_bootstrap, int | np.integer) or n_bootstrap < _MIN_BOOTSTRAP:
        raise EvaluationError(
            f"n_bootstrap must be an integer >= {_MIN_BOOTSTRAP} "
            f"(fewer resamples give noise as interval limits), got {n_bootstrap!r}"
        )
    try:
        probs = np.asarray(probabilities, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"probabilities are not numeric: {exc}") from exc
    labels = list(labels)
    patient_ids = [str(p) for p in patient_ids]
    if probs.size == 0 or not labels:
        raise EvaluationError("nothing to evaluate: the set of predictions is empty")
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise EvaluationError(
            f"probabilities must have shape (n_images, {len(classes)}) for classes "
            f"{classes}, got {probs.shape}"
        )
    if not len(labels) == probs.shape[0] == len(patient_ids):
        raise EvaluationError(
            f"{len(labels)} labels, {probs.shape[0]} probability rows and "
            f"{len(patient_ids)} patient ids: they must be one per image"
        )
    n_bad = int(np.sum(~np.isfinite(probs).all(axis=1)))
    if n_bad:
        raise EvaluationError(f"{n_bad} probability rows contain NaN or infinite values")
    if probs.min() < -1e-9 or probs.max() > 1 + 1e-9:
        raise EvaluationError(
            f"probabilities must lie in [0, 1], got values from {probs.min()} to {probs.max()}"
        )
    # Rows must be distributions (softmax outputs): a row that does not sum to 1 means
    # logits, swapped or missing columns, and the decision rule would be meaningless.
    sums = probs.sum(axis=1)
    if np.any(np.abs(sums - 1.0) > _SUM_TOLERANCE):
        raise EvaluationError(
            f"each probability row must sum to 1 (within {_SUM_TOLERANCE}), got sums from "
            f"{sums.min():.4f} to {sums.max():.4f}"
        )
    unknown = sorted({str(label) for label in labels} - set(classes))
    if unknown:
        raise EvaluationError(f"unknown labels {unknown}; classes are {classes}")
    index = {name: i for i, name in enumerate(classes)}
    true = np.array([index[str(label)] for label in labels], dtype=np.int64)
    pos_index = index[positive]
    n_pos = int(np.sum(true == pos_index))
    if n_pos == 0 or n_pos == true.shape[0]:
        raise EvaluationError(
            f"labels hold only {'the positive class' if n_pos else 'negatives'} "
            f"({positive!r} vs rest): AUC, sensitivity and specificity are undefined"
        )
    return classes, positive, probs, true, patient_ids


def evaluate(
    labels: Sequence[str],
    probabilities: np.ndarray,
    patient_ids: Sequence[str],
    classes: Sequence[str],
    positive_class: str | None = None,
    threshold: float = 0.5,
    patient_rule: str = "mean",
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> EvaluationReport:
    """Evaluate image probabilities at image and patient level, with 95 % bootstrap CIs.

    Args:
        labels: the true class name of each image.
        probabilities: (n_images, n_classes) probabilities, columns in ``classes`` order;
            each row must sum to 1 (within 1e-3) and lie in [0, 1].
        patient_ids: the patient of each image; all images of a patient share its label.
        classes: class names in column order.
        positive_class: the class that sensitivity, precision, F1 and AUC refer to
            (default ``classes[0]``).
        threshold: predicted positive when the positive probability >= threshold.
        patient_rule: how a patient's image probabilities are combined
            (``models.aggregation.RULES``).
        n_bootstrap: resamples of patients for the intervals (at least 100).
        seed: seed of the bootstrap; the same inputs and seed give the same report.

    Returns:
        An ``EvaluationReport``. Precision (and F1) is 0 when nothing is predicted
        positive, as scikit-learn with ``zero_division=0``.

    Raises:
        EvaluationError: empty input, shape mismatch, NaN or out-of-range probabilities,
            rows not summing to 1, unknown labels, only one class (positive vs rest),
            a patient whose images carry different labels, or bad settings.
    """
    classes, positive, probs, true, patient_ids = _validate(
        labels,
        probabilities,
        patient_ids,
        classes,
        positive_class,
        threshold,
        patient_rule,
        n_bootstrap,
    )
    pos_index = classes.index(positive)

    # Patients in order of first appearance; each image points at its patient.
    patient_index: dict[str, int] = {}
    image_patient = np.array(
        [patient_index.setdefault(p, len(patient_index)) for p in patient_ids], dtype=np.int64
    )
    n_patients = len(patient_index)
    patient_true = np.full(n_patients, -1, dtype=np.int64)
    patient_true[image_patient] = true
    mixed = np.flatnonzero(patient_true[image_patient] != true)
    if mixed.size:
        raise EvaluationError(
            f"{np.unique(image_patient[mixed]).size} patient(s) have images with different "
            f"labels (first at row {int(mixed[0])}); a patient has one diagnosis"
        )
    patient_probs = np.stack(
        [
            combine(probs[image_patient == p], patient_rule, threshold, pos_index)
            for p in range(n_patients)
        ]
    )

    image_level = scoring.Level(
        true, scoring.predict_classes(probs, pos_index, threshold), probs, pos_index
    )
    patient_level = scoring.Level(
        patient_true,
        scoring.predict_classes(patient_probs, pos_index, threshold),
        patient_probs,
        pos_index,
    )

    rng = np.random.default_rng(seed)
    # One draw of patients serves both levels, so their intervals describe the same
    # hypothetical test sets.
    draws = rng.integers(0, n_patients, size=(n_bootstrap, n_patients))
    image_resampled = scoring.bootstrap(image_level, draws, image_patient, n_patients)
    patient_resampled = scoring.bootstrap(
        patient_level, draws, np.arange(n_patients, dtype=np.int64), n_patients
    )
    used = int(np.sum(~np.isnan(patient_resampled["accuracy"])))
    if used == 0:
        raise EvaluationError(
            f"none of {n_bootstrap} bootstrap resamples of {n_patients} patients held both "
            "classes: too few patients for a confidence interval"
        )
    if used < 0.9 * n_bootstrap:
        logger.warning(
            "many bootstrap resamples held one class only and were skipped",
            extra={"n_bootstrap": n_bootstrap, "used": used, "n_patients": n_patients},
        )

    report = EvaluationReport(
        classes=classes,
        positive_class=positive,
        threshold=float(threshold),
        patient_rule=patient_rule,
        image=_level_report(image_level, image_resampled, classes),
        patient=_level_report(patient_level, patient_resampled, classes),
        curves={
            "image": scoring.curves(image_level, classes),
            "patient": scoring.curves(patient_level, classes),
        },
        bootstrap={
            "method": "percentile",
            "unit": "patient",
            "n_bootstrap": n_bootstrap,
            "used": used,
            "skipped_one_class": n_bootstrap - used,
            "seed": seed,
        },
    )
    logger.info(
        "evaluated predictions",
        extra={
            "n_images": report.image.n,
            "n_patients": report.patient.n,
            "image_auc": report.image.auc.value,
            "patient_auc": report.patient.auc.value,
        },
    )
    return report
