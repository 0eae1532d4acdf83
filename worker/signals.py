"""Celery signal handlers that feed the metrics of a worker process.

Installed by the worker command (``thyrocad.health.start_worker_health``) when
metrics are enabled: task failures and retries, the observer of every
:class:`~worker.context.WorkerContext`, the bookkeeping of prefork children
that exit, and, in processes that predict, a thread that keeps the active model
loaded so the first image after a start or a promotion does not wait for it.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery.signals import (
    task_failure,
    task_retry,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from thyrocad import metrics
from thyrocad.db import repository
from thyrocad.worker.context import get_context, set_observer_factory
from thyrocad.worker.observer import worker_observer

logger = logging.getLogger(__name__)

#: How often a predicting process checks which model version is active.
MODEL_WATCH_SECONDS = 15.0

_installed = False
_stop = threading.Event()


def _task_name(sender: Any, request: Any = None) -> str:
    name = getattr(sender, "name", None) or getattr(request, "task", None)
    return str(name or "unknown")


def _on_failure(sender: Any = None, **_: Any) -> None:
    metrics.observe_task_failure(_task_name(sender))


def _on_retry(sender: Any = None, request: Any = None, **_: Any) -> None:
    metrics.observe_task_retry(_task_name(sender, request))


def _on_child_exit(**_: Any) -> None:
    _stop.set()
    metrics.mark_process_dead(os.getpid())


def keep_model_loaded(stop: threading.Event, interval: float = MODEL_WATCH_SECONDS) -> None:
    """Load the active model version into this process's context whenever it changes."""
    while True:
        try:
            ctx = get_context()
            with ctx.sessions() as session:
                active = repository.active_model(session)
            if active is not None and ctx.models.version != active.version:
                ctx.models.get(active)
            if ctx.models.version is not None:
                metrics.model_loaded(ctx.models.version)
        except Exception:
            # The next task will try again and report the error where it matters.
            logger.warning("could not load the active model; retrying", exc_info=True)
        if stop.wait(interval):
            return


def _start_watcher(**_: Any) -> None:
    _stop.clear()
    threading.Thread(
        target=keep_model_loaded, args=(_stop,), name="thyrocad-model-watch", daemon=True
    ).start()


def install(*, watch_model: bool, prefork: bool) -> None:
    """Connect the handlers (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    set_observer_factory(worker_observer)
    task_failure.connect(_on_failure, weak=False)
    task_retry.connect(_on_retry, weak=False)
    if prefork:
        worker_process_shutdown.connect(_on_child_exit, weak=False)
    if watch_model:
        # Prefork: in every pool child after the fork (never TensorFlow in the
        # parent); solo and threads: in the process that runs the tasks.
        signal = worker_process_init if prefork else worker_ready
        signal.connect(_start_watcher, weak=False)
