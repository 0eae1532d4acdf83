"""Rescoring: stored studies predicted again under the active model, as new result revisions.

Nothing here predicts by itself. :func:`request_rescore` sends the studies'
instances back to ``queued`` and marks the studies for finalisation; the normal
batched inference path then predicts them with the active version (a prediction
is keyed by instance, frame and version, so the old version's predictions stay),
and the finaliser writes a new study and patient result revision computed from
the active version's predictions. Old revisions are kept.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from thyrocad.db import repository
from thyrocad.worker import learning_store as store
from thyrocad.worker.learning_store import RescoreProgress

logger = logging.getLogger(__name__)

Publish = Callable[[list[int]], None]

__all__ = ["NothingToRescore", "RescorePlan", "RescoreProgress", "progress", "request_rescore"]


class NothingToRescore(Exception):
    """No active model, or no predicted study matches the request."""


@dataclass(frozen=True)
class RescorePlan:
    """What a rescore request changed: the studies and the instances sent to inference."""

    model_version: str
    study_ids: tuple[int, ...]
    instance_ids: tuple[int, ...]


def request_rescore(
    sessions: sessionmaker[Session],
    publish: Publish,
    *,
    since: dt.datetime | None = None,
    study_uid: str | None = None,
    batch: int = 32,
    now: dt.datetime | None = None,
) -> RescorePlan:
    """Queue the predicted studies received since ``since`` (and/or one study) for rescoring.

    ``publish(ids)`` sends one inference task per ``batch`` instances (after the
    commit, so a worker always finds them queued). Idempotent: instances already
    predicted by the active version are not predicted again. Raises
    :class:`NothingToRescore` without an active model or a matching study.
    """
    if since is None and study_uid is None:
        raise ValueError("give a date (since) or a study UID")
    now = now or dt.datetime.now(dt.UTC)
    with sessions.begin() as session:
        active = repository.active_model(session)
        if active is None:
            raise NothingToRescore("no active model version: promote one first")
        study_ids = store.studies_to_rescore(session, since, study_uid)
        if not study_ids:
            what = f"study {study_uid}" if study_uid else "study"
            when = f" received since {since:%Y-%m-%d %H:%M} UTC" if since else ""
            raise NothingToRescore(f"no predicted {what}{when}")
        instance_ids = store.mark_for_rescore(session, study_ids, active.version, now)
    for start in range(0, len(instance_ids), max(1, batch)):
        publish(instance_ids[start : start + batch])
    logger.info(
        "rescore requested",
        extra={
            "model_version": active.version,
            "studies": len(study_ids),
            "instances": len(instance_ids),
        },
    )
    return RescorePlan(active.version, tuple(study_ids), tuple(instance_ids))


def progress(sessions: sessionmaker[Session], plan: RescorePlan) -> RescoreProgress:
    """How many of the plan's instances and studies are done under its model version."""
    with sessions() as session:
        return store.rescore_progress(session, plan.study_ids, plan.model_version)
