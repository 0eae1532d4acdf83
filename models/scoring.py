"""The numbers behind an evaluation: point metrics as weighted sums, so one code path
gives both the point estimate (all weights 1) and every bootstrap resample of patients
(weights = how often each item was drawn), plus per-class tables and curves.

Equal to scikit-learn's metrics on the same predictions (``tests/unit/test_evaluation.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

METRIC_NAMES = ("accuracy", "auc", "sensitivity", "specificity", "precision", "f1")
# Bound the (resamples x items) weight matrix to keep memory flat on big test sets.
_CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class Level:
    """Everything the metrics of one level need, as index arrays."""

    true: np.ndarray  # class index per item
    predicted: np.ndarray  # class index per item
    scores: np.ndarray  # (n, n_classes) probabilities
    positive: int


def predict_classes(scores: np.ndarray, positive: int, threshold: float) -> np.ndarray:
    """Class index per row: positive when its probability >= threshold, else the best other."""
    others = scores.copy()
    others[:, positive] = -np.inf
    return np.where(scores[:, positive] >= threshold, positive, np.argmax(others, axis=1))


def weighted_metrics(level: Level, weights: np.ndarray) -> dict[str, np.ndarray]:
    """The six headline metrics for each row of ``weights`` (resamples x items).

    A weight is how many times an item appears in a resample, so a row of ones gives the
    plain point estimates, and every metric here is the metric of the resampled set.
    Rows whose set lacks either class get NaN for every metric (see ``_bootstrap``).
    """
    weights = np.asarray(weights, dtype=np.float64)
    is_pos = level.true == level.positive
    pred_pos = level.predicted == level.positive
    tp = weights @ (is_pos & pred_pos)
    fp = weights @ (~is_pos & pred_pos)
    fn = weights @ (is_pos & ~pred_pos)
    tn = weights @ (~is_pos & ~pred_pos)
    n_pos = tp + fn
    n_neg = fp + tn
    total = n_pos + n_neg
    valid = (n_pos > 0) & (n_neg > 0)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        # 0 where the denominator is 0: scikit-learn's behaviour with zero_division=0.
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    out = {
        "accuracy": ratio(weights @ (level.true == level.predicted), total),
        "auc": weighted_auc(level.scores[:, level.positive], is_pos, weights),
        "sensitivity": ratio(tp, n_pos),
        "specificity": ratio(tn, n_neg),
        "precision": ratio(tp, tp + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }
    for values in out.values():
        values[~valid] = np.nan
    return out


def weighted_auc(score: np.ndarray, is_pos: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC per weight row; tied scores count one half, as roc_auc_score does."""
    order = np.argsort(score, kind="stable")
    sorted_score = score[order]
    # One group per distinct score value, so ties share their credit.
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    w = weights[:, order]
    pos_w = np.add.reduceat(w * is_pos[order], starts, axis=1)
    neg_w = np.add.reduceat(w * ~is_pos[order], starts, axis=1)
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    numerator = np.sum(pos_w * (neg_below + 0.5 * neg_w), axis=1)
    denominator = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    return np.divide(
        numerator, denominator, out=np.full_like(numerator, np.nan), where=denominator > 0
    )


def bootstrap(
    level: Level,
    patient_draws: np.ndarray,
    item_patient: np.ndarray,
    n_patients: int,
) -> dict[str, np.ndarray]:
    """Metrics of each bootstrap resample of patients; NaN rows are skipped resamples.

    ``item_patient`` maps each item (image or patient) to its patient index, so resampling
    a patient brings all its images with it (a cluster bootstrap at image level).
    Resamples that hold only one class are not valid test sets (``evaluate`` refuses such
    input itself, and AUC, sensitivity and specificity are undefined there), so they are
    NaN for every metric and left out of the percentiles; their number is reported.
    """
    n_items = item_patient.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // max(n_items, n_patients))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, patient_draws.shape[0], chunk):
        draws = patient_draws[start : start + chunk]
        # How often each patient was drawn, per resample; images inherit their patient's.
        offsets = draws + n_patients * np.arange(draws.shape[0])[:, None]
        multiplicity = np.bincount(offsets.ravel(), minlength=draws.shape[0] * n_patients)
        multiplicity = multiplicity.reshape(draws.shape[0], n_patients)
        parts.append(weighted_metrics(level, multiplicity[:, item_patient]))
    return {name: np.concatenate([p[name] for p in parts]) for name in METRIC_NAMES}


def percentile_ci(values: np.ndarray) -> tuple[float, float]:
    kept = values[~np.isnan(values)]
    low, high = np.percentile(kept, [2.5, 97.5])
    return float(low), float(high)


def per_class_table(confusion: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """One-vs-rest table from the confusion matrix, so every row agrees with every other."""
    total = int(confusion.sum())
    table = []
    for index, name in enumerate(classes):
        tp = int(confusion[index, index])
        support = int(confusion[index].sum())
        predicted = int(confusion[:, index].sum())
        fn = support - tp
        fp = predicted - tp
        tn = total - tp - fn - fp
        table.append(
            {
                "class": name,
                "support": support,
                "precision": tp / predicted if predicted else 0.0,
                "sensitivity": tp / support if support else 0.0,
                "specificity": tn / (tn + fp) if tn + fp else 0.0,
                "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0,
            }
        )
    return table


def curves(level: Level, classes: Sequence[str]) -> dict:
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    is_pos = level.true == level.positive
    fpr, tpr, _ = roc_curve(is_pos, level.scores[:, level.positive])
    pr = {}
    for index, name in enumerate(classes):
        target = level.true == index
        if not target.any():
            continue  # a PR curve for a class with no examples is undefined
        precision, recall, _ = precision_recall_curve(target, level.scores[:, index])
        pr[name] = {
            "recall": recall.tolist(),
            "precision": precision.tolist(),
            "average_precision": float(average_precision_score(target, level.scores[:, index])),
        }
    return {
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": float(auc(fpr, tpr))},
        "pr": pr,
    }
