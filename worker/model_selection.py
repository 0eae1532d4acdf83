"""Which patients are held out, and when a candidate model may replace the active one.

Pure functions, no I/O: the refit (``worker.retraining``) applies them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any


def in_holdout(patient_key: str, fraction: float) -> bool:
    """Whether a stable hash of the patient key puts the patient in the hold-out.

    The same key gives the same answer on every machine and Python version (sha256,
    not ``hash()``); about ``fraction`` of all keys fall inside. The answer is stored
    once per patient (``repository.decide_holdout``) and never recomputed, so a later
    change of the fraction moves no patient that was already decided.
    """
    digest = hashlib.sha256(f"thyrocad-holdout/{patient_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def pseudonym(patient_key: str) -> str:
    """A stable, non-identifying stand-in for a patient key in model metadata and runs."""
    return "P" + hashlib.sha256(f"thyrocad-patient/{patient_key}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PromotionRule:
    """Not worse than the active model: AUC within ``auc_tolerance``, sensitivity >= floor."""

    auc_tolerance: float
    min_sensitivity: float


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def patient_metric(report: dict[str, Any], name: str) -> float:
    return float(report["patient"][name]["value"])


def decide(
    candidate: dict[str, Any], active: dict[str, Any] | None, rule: PromotionRule
) -> Decision:
    """Decide on a candidate from patient-level hold-out reports (``report_to_json`` shape).

    ``active`` is None when there is no active model to compare with; then only the
    sensitivity floor applies. A NaN metric never passes.
    """
    auc = patient_metric(candidate, "auc")
    sensitivity = patient_metric(candidate, "sensitivity")
    problems = []
    if not sensitivity >= rule.min_sensitivity:
        problems.append(
            f"patient sensitivity {sensitivity:.3f} is below the floor {rule.min_sensitivity:.3f}"
        )
    comparison = "no active model to compare with"
    if active is not None:
        active_auc = patient_metric(active, "auc")
        needed = active_auc - rule.auc_tolerance
        comparison = (
            f"patient AUC {auc:.3f} vs active {active_auc:.3f} (tolerance {rule.auc_tolerance:.3f})"
        )
        if math.isnan(active_auc):
            needed = -math.inf  # nothing honest to beat
        if not auc >= needed:
            problems.append(
                f"patient AUC {auc:.3f} is below the active model's {active_auc:.3f} "
                f"minus the tolerance {rule.auc_tolerance:.3f}"
            )
    if problems:
        return Decision(False, "not promoted: " + "; ".join(problems))
    return Decision(
        True,
        f"promoted: {comparison}; sensitivity {sensitivity:.3f} >= {rule.min_sensitivity:.3f}",
    )
