"""The SQL views radiologists query, by name, with what each row means.

The view definitions live in the migrations (``db/migrations/versions``):
a migration is a frozen snapshot and must not change when this module does.
A later change to a view is a new migration that drops and recreates it.
Every view runs unchanged on PostgreSQL and SQLite.
"""

from __future__ import annotations

#: View name → what one row of it is. ``db.roles`` grants SELECT on exactly these.
VIEWS: dict[str, str] = {
    "image_results": (
        "One image (a frame of an instance) with its most recent prediction: patient key "
        "and name, study UID, study date, accession number, series and SOP instance UIDs, "
        "frame index, diagnosis, probability of the positive class, model version and "
        "predicted_at. Only instances whose current bytes have been predicted."
    ),
    "study_results_latest": (
        "The latest revision of each study result: patient key and name, study UID, study "
        "date, accession number, diagnosis, probability, image count, model version, "
        "aggregation rule, revision, created_at, reason. A study none of whose images "
        "could be used has diagnosis and probability NULL, image count 0 and reason "
        "'no usable images'; reason is NULL on every result with a diagnosis."
    ),
    "patient_results_latest": (
        "The latest revision of each patient result over all their studies: patient key and "
        "name, diagnosis, probability, image and study counts, model version, rule, "
        "revision, created_at."
    ),
    "study_labels_latest": (
        "The ground truth in force for each labelled study: the study's own latest label, "
        "otherwise its patient's latest label (label_level says which), with labelled_by, "
        "source, note and labelled_at."
    ),
}

#: The view names, in the order they are created.
VIEW_NAMES: tuple[str, ...] = tuple(VIEWS)
