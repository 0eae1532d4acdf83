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

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.aggregation import RULES, combine
from models.errors import EvaluationError

logger = logging.getLogger(__name__)

METRIC_NAMES = ("accuracy", "auc", "sensitivity", "specificity", "precision", "f1")
# Rows are softmax outputs; CSVs written elsewhere round them, so allow a little slack.
_SUM_TOLERANCE = 1e-3
_MIN_BOOTSTRAP = 100
# Bound the (resamples x items) weight matrix to keep memory flat on big test sets.
_CHUNK_ELEMENTS = 2_000_000


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


@dataclass(frozen=True)
class _Level:
    """Everything the metrics of one level need, as index arrays."""

    true: np.ndarray  # class index per item
    predicted: np.ndarray  # class index per item
    scores: np.ndarray  # (n, n_classes) probabilities
    positive: int


# --------------------------------------------------------------------------- metrics


def _predict(scores: np.ndarray, positive: int, threshold: float) -> np.ndarray:
    """Class index per row: positive when its probability >= threshold, else the best other."""
    others = scores.copy()
    others[:, positive] = -np.inf
    return np.where(scores[:, positive] >= threshold, positive, np.argmax(others, axis=1))


def _weighted_metrics(level: _Level, weights: np.ndarray) -> dict[str, np.ndarray]:
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
        "auc": _weighted_auc(level.scores[:, level.positive], is_pos, weights),
        "sensitivity": ratio(tp, n_pos),
        "specificity": ratio(tn, n_neg),
        "precision": ratio(tp, tp + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }
    for values in out.values():
        values[~valid] = np.nan
    return out


def _weighted_auc(score: np.ndarray, is_pos: np.ndarray, weights: np.ndarray) -> np.ndarray:
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


def _bootstrap(
    level: _Level,
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
        parts.append(_weighted_metrics(level, multiplicity[:, item_patient]))
    return {name: np.concatenate([p[name] for p in parts]) for name in METRIC_NAMES}


def _percentile_ci(values: np.ndarray) -> tuple[float, float]:
    kept = values[~np.isnan(values)]
    low, high = np.percentile(kept, [2.5, 97.5])
    return float(low), float(high)


def _per_class(confusion: np.ndarray, classes: Sequence[str]) -> list[dict]:
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


def _curves(level: _Level, classes: Sequence[str]) -> dict:
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


def _level_report(
    level: _Level, resampled: dict[str, np.ndarray], classes: Sequence[str]
) -> LevelReport:
    point = _weighted_metrics(level, np.ones((1, level.true.shape[0])))
    n_classes = len(classes)
    confusion = np.bincount(
        level.true * n_classes + level.predicted, minlength=n_classes * n_classes
    ).reshape(n_classes, n_classes)
    metrics = {
        name: Metric(float(point[name][0]), _percentile_ci(resampled[name]))
        for name in METRIC_NAMES
    }
    return LevelReport(
        n=int(level.true.shape[0]),
        confusion=confusion.tolist(),
        per_class=_per_class(confusion, classes),
        **metrics,
    )


# --------------------------------------------------------------------------- evaluate


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

    image_level = _Level(true, _predict(probs, pos_index, threshold), probs, pos_index)
    patient_level = _Level(
        patient_true,
        _predict(patient_probs, pos_index, threshold),
        patient_probs,
        pos_index,
    )

    rng = np.random.default_rng(seed)
    # One draw of patients serves both levels, so their intervals describe the same
    # hypothetical test sets.
    draws = rng.integers(0, n_patients, size=(n_bootstrap, n_patients))
    image_resampled = _bootstrap(image_level, draws, image_patient, n_patients)
    patient_resampled = _bootstrap(
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
            "image": _curves(image_level, classes),
            "patient": _curves(patient_level, classes),
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


# --------------------------------------------------------------------------- output


def _level_json(level: LevelReport) -> dict[str, Any]:
    out: dict[str, Any] = {
        name: {
            "value": float(getattr(level, name).value),
            "ci95": [float(getattr(level, name).ci95[0]), float(getattr(level, name).ci95[1])],
        }
        for name in METRIC_NAMES
    }
    out["n"] = int(level.n)
    out["confusion"] = [[int(v) for v in row] for row in level.confusion]
    out["per_class"] = [
        {key: (value if isinstance(value, str) else _plain(value)) for key, value in row.items()}
        for row in level.per_class
    ]
    return out


def _plain(value: Any) -> int | float:
    return int(value) if isinstance(value, int | np.integer) else float(value)


def report_to_json(report: EvaluationReport) -> dict[str, Any]:
    """The report as plain JSON-serialisable data, in the shape scripts rely on.

    ``{"positive_class", "threshold", "patient_rule", "classes", "image": {...},
    "patient": {...}}``; each level holds accuracy, auc, sensitivity, specificity,
    precision and f1 as ``{"value": v, "ci95": [lo, hi]}`` (fractions), then ``n``,
    ``confusion`` (rows true, columns predicted) and ``per_class``.
    """
    return {
        "positive_class": report.positive_class,
        "threshold": float(report.threshold),
        "patient_rule": report.patient_rule,
        "classes": list(report.classes),
        "image": _level_json(report.image),
        "patient": _level_json(report.patient),
    }


def _fmt(metric: Metric) -> str:
    return f"{metric.value:.3f} ({metric.ci95[0]:.3f}–{metric.ci95[1]:.3f})"


def _markdown(report: EvaluationReport, title: str) -> str:
    names = {
        "accuracy": "Accuracy",
        "auc": "AUC-ROC",
        "sensitivity": "Sensitivity (recall)",
        "specificity": "Specificity",
        "precision": "Precision",
        "f1": "F1",
    }
    lines = [
        f"# {title}",
        "",
        f"- classes: {', '.join(report.classes)}; positive class: **{report.positive_class}**",
        f"- decision: positive when P({report.positive_class}) >= {report.threshold:g}",
        f"- patient score: `{report.patient_rule}` of the patient's image probabilities",
        f"- {report.image.n} images, {report.patient.n} patients",
        "",
        "## Metrics (95 % CI)",
        "",
        f"| metric | image level (n = {report.image.n}) | patient level (n = {report.patient.n}) |",
        "|---|---|---|",
    ]
    for name in METRIC_NAMES:
        image, patient = getattr(report.image, name), getattr(report.patient, name)
        lines.append(f"| {names[name]} | {_fmt(image)} | {_fmt(patient)} |")
    for level_name, level in (("Image", report.image), ("Patient", report.patient)):
        lines += [
            "",
            f"## {level_name} level: per class (one-vs-rest)",
            "",
            "| class | precision | sensitivity (recall) | specificity | F1 | support |",
            "|---|---|---|---|---|---|",
        ]
        for row in level.per_class:
            lines.append(
                f"| {row['class']} | {row['precision']:.3f} | {row['sensitivity']:.3f} | "
                f"{row['specificity']:.3f} | {row['f1']:.3f} | {row['support']} |"
            )
        lines += [
            "",
            f"## {level_name} level: confusion matrix (rows true, columns predicted)",
            "",
            "| true \\ predicted | " + " | ".join(report.classes) + " |",
            "|---|" + "---|" * len(report.classes),
        ]
        for name, counts in zip(report.classes, level.confusion, strict=True):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in counts) + " |")
    boot = report.bootstrap
    lines += [
        "",
        "## How the intervals were computed",
        "",
        f"Percentile bootstrap with {boot.get('n_bootstrap', '?')} resamples of patients "
        f"(seed {boot.get('seed', '?')}). At image level a resampled patient brings all "
        "its images (cluster bootstrap), because images of one patient are correlated and "
        "resampling single images would give intervals that are too narrow. Resamples "
        "holding one class only are skipped "
        f"({boot.get('skipped_one_class', '?')} of them). Values are fractions; precision "
        "and F1 are 0 when nothing is predicted positive (scikit-learn's zero_division=0). "
        "Point estimates equal scikit-learn's on the same predictions. A metric at 0 or 1 "
        "(no errors of that kind observed) gets a percentile interval collapsed onto that "
        "value: with few patients read it as 'none seen', not as certainty.",
        "",
    ]
    return "\n".join(lines)


def _plot_roc(report: EvaluationReport, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot, so no global figure state or GUI backend.
    figure = Figure(figsize=(5, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for level_name in ("image", "patient"):
        roc = report.curves[level_name]["roc"]
        axes.plot(roc["fpr"], roc["tpr"], label=f"{level_name} (AUC {roc['auc']:.3f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    axes.set(
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title=f"{title}: ROC, positive = {report.positive_class}",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=100)


def _plot_pr(report: EvaluationReport, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 5))
    FigureCanvasAgg(figure)
    for position, level_name in enumerate(("image", "patient"), start=1):
        axes = figure.add_subplot(1, 2, position)
        for name, curve in report.curves[level_name]["pr"].items():
            axes.plot(
                curve["recall"],
                curve["precision"],
                label=f"{name} (AP {curve['average_precision']:.3f})",
                drawstyle="steps-post",  # as scikit-learn draws PR curves: no interpolation
            )
        axes.set(
            xlabel="recall",
            ylabel="precision",
            title=f"{level_name} level",
            xlim=(0, 1),
            ylim=(0, 1.01),
        )
        axes.legend(loc="lower left")
    figure.suptitle(f"{title}: precision-recall per class")
    figure.savefig(path, dpi=100)


def write_report(
    report: EvaluationReport, out_dir: Path, title: str = "thyrocad evaluation"
) -> dict[str, Path]:
    """Write report.json, report.md, roc.png and pr.png into ``out_dir`` (created if needed).

    Returns:
        ``{"json": ..., "markdown": ..., "roc": ..., "pr": ...}`` paths of the files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "report.json",
        "markdown": out_dir / "report.md",
        "roc": out_dir / "roc.png",
        "pr": out_dir / "pr.png",
    }
    paths["json"].write_text(json.dumps(report_to_json(report), indent=2) + "\n")
    paths["markdown"].write_text(_markdown(report, title))
    _plot_roc(report, paths["roc"], title)
    _plot_pr(report, paths["pr"], title)
    logger.info("wrote evaluation report", extra={"out_dir": str(out_dir)})
    return paths


# --------------------------------------------------------------------------- CSV


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
