"""An evaluation as files: JSON for scripts, Markdown for people, ROC and PR plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from thyrocad.models.evaluation import EvaluationReport, LevelReport, Metric
from thyrocad.models.scoring import METRIC_NAMES

logger = logging.getLogger(__name__)


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


#: The folder of a model version that holds its hold-out evaluation report.
EVALUATION_FOLDER = "evaluation"


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
