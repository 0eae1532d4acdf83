"""Celery tasks: thin wrappers that load ids, call a function, persist.

Every task is idempotent, so ``acks_late`` re-delivery after a crash is safe.
Transient database/broker errors retry with exponential backoff; inference,
which holds claims, waits for the database instead and retries the moment it
answers, so a short outage delays results by the outage, not by a backoff.
"""

from __future__ import annotations

import logging

from celery import shared_task
from sqlalchemy.exc import OperationalError as DatabaseError

from thyrocad.db import repository
from thyrocad.worker.aggregation import finalise_due
from thyrocad.worker.context import get_context
from thyrocad.worker.inference import run_inference
from thyrocad.worker.model_holder import NoActiveModel
from thyrocad.worker.task_policy import RETRY

logger = logging.getLogger(__name__)

#: How long an inference task waits for a database that went away before it backs off.
DATABASE_WAIT_SECONDS = 120.0


@shared_task(name="thyrocad.infer", bind=True, **RETRY)
def infer(self, instance_ids: list[int]) -> int:  # type: ignore[no-untyped-def]
    """Predict pending instances (the ids are a hint: the task drains the backlog)."""
    ctx = get_context()
    try:
        outcome = run_inference(ctx)
        while outcome.model_changed:  # a promotion landed mid-drain: go on with the new model
            outcome = run_inference(ctx)
    except NoActiveModel as exc:
        # Not a failure of these instances: they stay queued until a promotion.
        logger.warning("%s", exc)
        raise self.retry(countdown=30, exc=exc) from exc
    except DatabaseError as exc:
        logger.warning("database unavailable during inference; waiting for it")
        if not ctx.wait_for_database(DATABASE_WAIT_SECONDS):
            raise  # the backoff of RETRY takes over
        logger.info("database answers again; inference resumes")
        raise self.retry(countdown=0, exc=exc) from exc
    return outcome.predicted


@shared_task(name="thyrocad.finalise_studies", **RETRY)
def finalise_studies() -> int:
    """Finalise studies idle for the configured time."""
    return len(finalise_due(get_context()))


@shared_task(name="thyrocad.requeue_stale", **RETRY)
def requeue_stale() -> int:
    """Re-publish instances whose task was lost (broker outage, killed worker)."""
    ctx = get_context()
    with ctx.sessions.begin() as session:
        now = repository.database_now(session)  # claims' clock (repository.claims)
        ids = repository.instances_to_requeue(
            session,
            now,
            ctx.settings.requeue_stale_seconds,
            lease_seconds=ctx.settings.claim_lease_seconds,
            received_seconds=ctx.settings.requeue_interval_seconds,
        )
        if ids:
            repository.mark_queued(session, ids, now)
    if ids:
        infer.apply_async(args=[ids])
        logger.info("requeued %d stale instances", len(ids))
    return len(ids)
