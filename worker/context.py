"""Per-process resources of a worker: settings, database sessions, spool, model.

Celery tasks are plain functions, so each worker process keeps one
:class:`WorkerContext`, made on first use after the fork (never at import), and
disposed of the pooled connections it inherited from a parent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import current_app
from celery.signals import worker_process_init
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_session_factory
from pacs.pixels import FramePolicy
from pacs.spool import Spool
from thyrocad.settings import Settings, load_settings
from worker.model_holder import ModelHolder

logger = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What tasks in one process share."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    spool: Spool
    frame_policy: FramePolicy
    models: ModelHolder
    # Hook for metrics: called with an event name and its fields.
    observe: Callable[[str, dict[str, Any]], None] = field(default=lambda event, fields: None)

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        engine = make_engine(settings.db_url)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            spool=Spool(settings.spool_dir),
            frame_policy=FramePolicy.parse(settings.frame_policy),
            models=ModelHolder(),
        )


_lock = threading.Lock()
_context: WorkerContext | None = None
Observer = Callable[[str, dict[str, Any]], None]
_observer_factory: Callable[[WorkerContext], Observer] | None = None


def set_observer_factory(factory: Callable[[WorkerContext], Observer] | None) -> None:
    """Give every context made from now on an observer (the worker command: metrics)."""
    global _observer_factory
    _observer_factory = factory


def get_context() -> WorkerContext:
    """This process's context, made from the app's settings on first call."""
    global _context
    with _lock:
        if _context is None:
            settings = getattr(current_app.conf, "thyrocad_settings", None) or load_settings()
            _context = WorkerContext.from_settings(settings)
            if _observer_factory is not None:
                _context.observe = _observer_factory(_context)
        return _context


def set_context(context: WorkerContext | None) -> None:
    """Install a context explicitly (tests, the embedded runner)."""
    global _context
    with _lock:
        _context = context


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    # Connections inherited from the parent must not be shared across processes.
    global _context
    if _context is not None:
        _context.engine.dispose(close=False)
        _context = None
