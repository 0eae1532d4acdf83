"""Repository functions: the only way the rest of thyrocad reads and writes the database.

Every function takes a ``Session`` first, accepts and returns plain records
(``db.records``), and never commits: the caller owns the transaction. Times
default to "now" in UTC and can be injected (``now=``) for tests; naive
datetimes are refused.

Concurrency, on both backends:

* upserts go through ``INSERT … ON CONFLICT`` on natural keys, so two
  processes registering the same instance cannot create two rows;
* functions that read-then-write start with a write to the row that guards
  the decision (PostgreSQL: that row's lock; SQLite: the database write lock,
  which pysqlite takes at the first write of a transaction), so the read
  that follows sees every committed change and no other writer can interleave;
* rows are locked in one order everywhere — patient, study, series, instance —
  so PostgreSQL transactions of the listener and the workers cannot deadlock;
* ``claim_instances`` is one ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP
  LOCKED) RETURNING``: concurrent PostgreSQL workers skip each other's rows,
  and SQLite serialises the statement under its write lock.

The functions live in one module per concern — ``receiving`` (registering and
refusing instances), ``queueing`` (queued and lost tasks), ``claims`` (a worker's
batches and how they settle), ``predictions``, ``counts``, ``finalisation`` (results),
``model_versions``, ``labels`` (labels and hold-out), ``archive`` (backfill
and Structured Report dispatches) and ``audit`` (the audit trail) — and are
imported from here:
``from db import repository; repository.register_instance(...)``.
"""

from __future__ import annotations

from thyrocad.db.errors import RepositoryError
from thyrocad.db.records import (
    AuditEvent,
    AuditEventRecord,
    BackfillItemRecord,
    ReportImage,
    ReportSource,
    SrDispatchRecord,
    StudyProgress,
)
from thyrocad.db.repository._common import (
    PENDING_STATES,
    UNSETTLED_STATES,
)
from thyrocad.db.repository.archive import (
    BACKFILL_STATES,
    backfill_items,
    pending_sr_dispatches,
    report_source,
    save_sr_dispatch,
    set_backfill_state,
    sr_dispatch,
    sr_dispatches,
    study_progress,
    upsert_backfill_item,
)
from thyrocad.db.repository.audit import (
    AUDIT_KINDS,
    audit_events,
    default_actor,
    record_audit_event,
    record_audit_events,
)
from thyrocad.db.repository.claims import (
    claim_instances,
    database_now,
    mark_failed,
    mark_rejected,
    release_claim,
    release_worker_claims,
    renew_claims,
)
from thyrocad.db.repository.counts import (
    instance_counts,
    rejection_counts,
)
from thyrocad.db.repository.finalisation import (
    has_no_usable_image,
    patient_predictions,
    results,
    save_patient_result,
    save_study_result,
    studies_to_finalise,
    study_predictions,
)
from thyrocad.db.repository.labels import (
    add_label,
    decide_holdout,
    label_history,
    latest_labels,
)
from thyrocad.db.repository.model_versions import (
    active_model,
    list_model_versions,
    set_active_model,
    set_model_status,
    upsert_model_version,
)
from thyrocad.db.repository.predictions import save_predictions
from thyrocad.db.repository.queueing import (
    instances_to_requeue,
    mark_queued,
)
from thyrocad.db.repository.receiving import (
    known_instance,
    record_rejection,
    register_instance,
    register_instances,
)

__all__ = [
    "AUDIT_KINDS",
    "AuditEvent",
    "AuditEventRecord",
    "BACKFILL_STATES",
    "BackfillItemRecord",
    "PENDING_STATES",
    "ReportImage",
    "ReportSource",
    "RepositoryError",
    "SrDispatchRecord",
    "StudyProgress",
    "UNSETTLED_STATES",
    "active_model",
    "add_label",
    "audit_events",
    "backfill_items",
    "claim_instances",
    "database_now",
    "decide_holdout",
    "default_actor",
    "has_no_usable_image",
    "instance_counts",
    "instances_to_requeue",
    "known_instance",
    "label_history",
    "latest_labels",
    "list_model_versions",
    "mark_failed",
    "mark_queued",
    "mark_rejected",
    "patient_predictions",
    "record_audit_event",
    "record_audit_events",
    "record_rejection",
    "register_instance",
    "register_instances",
    "rejection_counts",
    "release_claim",
    "release_worker_claims",
    "renew_claims",
    "report_source",
    "results",
    "save_patient_result",
    "save_predictions",
    "save_sr_dispatch",
    "save_study_result",
    "set_active_model",
    "set_backfill_state",
    "set_model_status",
    "sr_dispatch",
    "pending_sr_dispatches",
    "sr_dispatches",
    "studies_to_finalise",
    "study_predictions",
    "study_progress",
    "upsert_backfill_item",
    "upsert_model_version",
]
