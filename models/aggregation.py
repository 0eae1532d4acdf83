"""Combine the class probabilities of several images into one result per group.

A group is whatever shares a diagnosis: the five images of a patient in the paper,
a study or a patient in the pipeline. Pure numpy, so the pipeline and the evaluation
use exactly the same rules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

RULES = ("mean", "median", "max", "majority")


def _check(probabilities: np.ndarray, rule: str, positive_index: int) -> np.ndarray:
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; expected one of {', '.join(RULES)}")
    array = np.asarray(probabilities, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(
            f"probabilities must be a 2-D array (images, classes), got shape {array.shape}"
        )
    if array.shape[0] == 0:
        raise ValueError("cannot combine an empty group: it has no image probabilities")
    if array.shape[1] < 2:
        raise ValueError(f"probabilities need at least 2 class columns, got {array.shape[1]}")
    if not 0 <= positive_index < array.shape[1]:
        raise ValueError(
            f"positive_index {positive_index} is outside the {array.shape[1]} class columns"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("probabilities contain NaN or infinite values")
    return array


def combine(
    probabilities: np.ndarray,
    rule: str = "mean",
    threshold: float = 0.5,
    positive_index: int = 0,
) -> np.ndarray:
    """Combine one group's image probabilities into the group's class probabilities.

    Args:
        probabilities: (k, n_classes) probabilities of the k images of one group.
        rule: one of ``RULES``.
            ``mean`` / ``median``: per class over the images (the median result is
            renormalised to sum to 1, since per-class medians need not).
            ``max``: the row of the image with the highest positive-class probability,
            i.e. the group is as suspicious as its most suspicious image.
            ``majority``: the fraction of images voting for each class.
        threshold: only for ``majority`` with two classes: an image votes positive when
            its positive probability is >= threshold, the same decision rule that
            ``models.evaluation`` uses. With more classes an image votes for its argmax.
        positive_index: the column of the positive class (``max`` and ``majority``).

    Returns:
        (n_classes,) float64 probabilities of the group, summing to 1 when the inputs do.

    Raises:
        ValueError: unknown rule, empty group, wrong shape or non-finite values.
    """
    array = _check(probabilities, rule, positive_index)
    n_classes = array.shape[1]
    if rule == "mean":
        return array.mean(axis=0)
    if rule == "median":
        median = np.median(array, axis=0)
        total = median.sum()
        # Per-class medians of a binary problem sum to 1 already; with more classes they
        # may not, and a group result must still be a distribution.
        return median / total if total > 0 else np.full(n_classes, 1.0 / n_classes)
    if rule == "max":
        return array[int(np.argmax(array[:, positive_index]))].copy()
    # majority
    if n_classes == 2:
        positive = array[:, positive_index] >= threshold
        votes = np.where(positive, positive_index, 1 - positive_index)
    else:
        votes = np.argmax(array, axis=1)
    return np.bincount(votes, minlength=n_classes).astype(np.float64) / array.shape[0]


def group_by(
    keys: Sequence[str],
    probabilities: np.ndarray,
    rule: str = "mean",
    threshold: float = 0.5,
    positive_index: int = 0,
) -> tuple[list[str], np.ndarray]:
    """Combine image probabilities per group key (e.g. patient id or study UID).

    Args:
        keys: one group key per image (row of ``probabilities``).
        probabilities: (n_images, n_classes) image probabilities.
        rule, threshold, positive_index: as in ``combine``.

    Returns:
        The distinct keys in order of first appearance, and a (n_groups, n_classes)
        array of group probabilities in the same order.

    Raises:
        ValueError: keys and rows differ in number, or as in ``combine``.
    """
    array = np.asarray(probabilities, dtype=np.float64)
    keys = list(keys)
    if array.ndim != 2 or array.shape[0] != len(keys):
        raise ValueError(
            f"{len(keys)} keys do not match probabilities of shape {array.shape}; "
            "expected one key per row"
        )
    if not keys:
        raise ValueError("cannot group an empty set of images")
    rows: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        rows.setdefault(key, []).append(index)
    order = list(rows)
    combined = np.stack(
        [combine(array[rows[key]], rule, threshold, positive_index) for key in order]
    )
    return order, combined
