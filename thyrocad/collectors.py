"""Gauges computed on scrape (the spool, the database and the broker), and the probes
that they and ``/readyz`` use to reach the database and the broker quickly.

The gauges' names and help texts are defined in :mod:`thyrocad.metrics`
(:func:`~thyrocad.metrics.spool_families`, :func:`~thyrocad.metrics.cluster_families`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from thyrocad.metrics import cluster_families, safe_label, spool_families
from thyrocad.settings import Settings

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy.engine import Engine

    from thyrocad.pacs.spool import Spool

logger = logging.getLogger(__name__)


def probe_engine(url: str) -> Engine:
    """An engine for health checks and scrapes: no pool, short connect timeout."""
    from sqlalchemy.pool import NullPool

    from thyrocad.db.engine import is_sqlite, make_engine

    kwargs: dict[str, Any] = {"poolclass": NullPool}
    if not is_sqlite(url) and url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 3}
    return make_engine(url, **kwargs)


def probe_app(settings: Settings) -> Celery:
    """A Celery app that only inspects the broker, failing fast when it is down."""
    from celery import Celery

    from thyrocad.worker.app import broker_options

    app = Celery("thyrocad-probe", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options={**broker_options(settings), "max_retries": 0},
        broker_connection_timeout=3,
        broker_connection_retry=False,
        broker_connection_max_retries=0,
    )
    return app


class SpoolCollector:
    """Spool usage on scrape; walking the files is cached for ``cache_seconds``."""

    def __init__(self, spool: Spool, min_free_bytes: int, cache_seconds: float = 30.0) -> None:
        self._spool = spool
        self._min_free = min_free_bytes
        self._cache_seconds = cache_seconds
        self._cached: tuple[float, int, int] | None = None

    def _usage(self) -> tuple[int, int]:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > self._cache_seconds:
            files = used = 0
            for path in self._spool.entries():
                try:
                    used += path.stat().st_size
                    files += 1
                except OSError:
                    continue  # moved away between listing and stat
            self._cached = (now, files, used)
        return self._cached[1], self._cached[2]

    def describe(self) -> Iterable[Any]:
        return spool_families()

    def collect(self) -> Iterator[Any]:
        free_f, used_f, files_f, min_f = spool_families()
        try:
            free_f.add_metric([], float(self._spool.free_bytes()))
            files, used = self._usage()
            used_f.add_metric([], float(used))
            files_f.add_metric([], float(files))
        except OSError:
            logger.warning("spool not readable for metrics", extra={"spool": str(self._spool.root)})
        min_f.add_metric([], float(self._min_free))
        yield from (free_f, used_f, files_f, min_f)


class ClusterCollector:
    """What the database and broker say about the whole deployment, on scrape.

    Exported by the listener and beat; dashboards aggregate with ``max``.
    """

    def __init__(self, settings: Settings) -> None:
        from thyrocad.db.engine import make_session_factory

        self._sessions = make_session_factory(probe_engine(settings.db_url))
        self._app = probe_app(settings)

    def describe(self) -> Iterable[Any]:
        return cluster_families()

    def collect(self) -> Iterator[Any]:
        from thyrocad.db import repository
        from thyrocad.worker.app import queue_depths

        db_up, broker_up, queues, states, present, info = cluster_families()
        try:
            with self._sessions() as session:
                counts = repository.instance_counts(session)
                active = repository.active_model(session)
            for state, n in counts.items():
                states.add_metric([safe_label(state)], float(n))
            present.add_metric([], 1.0 if active else 0.0)
            if active:
                info.add_metric([safe_label(active.version), safe_label(active.architecture)], 1.0)
            db_up.add_metric([], 1.0)
        except Exception as exc:
            logger.warning("database unreachable for metrics: %s", type(exc).__name__)
            db_up.add_metric([], 0.0)
        try:
            depths = queue_depths(self._app)
            for queue, depth in depths.items():
                if depth >= 0:
                    queues.add_metric([safe_label(queue)], float(depth))
            broker_up.add_metric([], 1.0)
        except Exception as exc:
            logger.warning("broker unreachable for metrics: %s", type(exc).__name__)
            broker_up.add_metric([], 0.0)
        yield from (db_up, broker_up, queues, states, present, info)
