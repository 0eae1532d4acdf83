"""The observer of every worker context: task events into this process's metrics.

``worker.signals.install`` gives every :class:`~worker.context.WorkerContext` one
(:func:`worker_observer`); the metric objects are defined in :mod:`thyrocad.metrics`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select

from thyrocad.db.schema import Instance, Study
from thyrocad.metrics import (
    metrics,
    model_loaded,
    number,
    observe_training,
    reason_class,
    safe_label,
)
from thyrocad.worker.context import WorkerContext

logger = logging.getLogger(__name__)


def worker_observer(ctx: WorkerContext) -> Callable[[str, dict[str, Any]], None]:
    """The observer for one worker context (``worker.context.set_observer_factory``).

    Events: ``batch`` {size, seconds, records}, ``unreadable`` {reasons},
    ``study_result`` {study}, ``training`` {outcome, seconds} (the same as calling
    :func:`observe_training`).

    Observing never fails a task: an error here is logged and the task goes on.
    """
    instances, studies = Instance.__table__, Study.__table__
    seen_results: OrderedDict[int, None] = OrderedDict()

    def received_at(instance_ids: Sequence[int]) -> list[dt.datetime]:
        query = select(instances.c.received_at).where(instances.c.id.in_(instance_ids))
        with ctx.engine.connect() as conn:
            return [_aware(row[0]) for row in conn.execute(query)]

    def last_received(study_uid: str) -> dt.datetime | None:
        query = select(studies.c.last_received_at).where(studies.c.study_instance_uid == study_uid)
        with ctx.engine.connect() as conn:
            value = conn.execute(query).scalar_one_or_none()
        return _aware(value) if value is not None else None

    def on_batch(fields: dict[str, Any]) -> None:
        m = metrics()
        m.batch_size.observe(number(fields.get("size")))
        m.batch_seconds.observe(number(fields.get("seconds")))
        records = list(fields.get("records") or ())
        versions = set()
        for record in records:
            version = safe_label(record.model_version)
            versions.add(version)
            m.predictions.labels(safe_label(record.label), version).inc()
        for version in versions:
            if version != m.loaded_version:
                model_loaded(version)
        ids = sorted({record.instance_id for record in records})
        if ids:
            now = dt.datetime.now(dt.UTC)
            for start in range(0, len(ids), 500):
                for at in received_at(ids[start : start + 500]):
                    m.receipt_to_prediction.observe(max(0.0, (now - at).total_seconds()))

    def on_study_result(fields: dict[str, Any]) -> None:
        result = fields["study"]
        if result.id in seen_results:  # an unchanged study returns its latest revision
            return
        seen_results[result.id] = None
        while len(seen_results) > 4096:
            seen_results.popitem(last=False)
        m = metrics()
        m.study_results.labels(safe_label(result.label)).inc()
        last = last_received(result.key)
        if last is not None:
            latency = (_aware(result.created_at) - last).total_seconds()
            m.study_latency.observe(max(0.0, latency))

    def on_unreadable(fields: dict[str, Any]) -> None:
        m = metrics()
        for reason in fields.get("reasons") or ():
            m.unreadable.labels(reason_class(str(reason))).inc()

    def on_training(fields: dict[str, Any]) -> None:
        observe_training(str(fields.get("outcome", "")), number(fields.get("seconds")))

    handlers = {
        "batch": on_batch,
        "unreadable": on_unreadable,
        "study_result": on_study_result,
        "training": on_training,
    }

    def observe(event: str, fields: dict[str, Any]) -> None:
        handler = handlers.get(event)
        if handler is None:
            return
        try:
            handler(fields)
        except Exception:
            logger.exception("could not record metrics", extra={"metrics_event": event})

    return observe


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
