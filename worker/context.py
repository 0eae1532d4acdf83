"""Per-process resources of a worker: settings, database sessions, spool, model.

Celery tasks are plain functions, so each worker process keeps one
:class:`WorkerContext`, made on first use after the fork (never at import), and
disposed of the pooled connections it inherited from a parent. A worker process
that starts gives back the claims its previous life held (:func:`recover_at_start`)
and queues their instances again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import current_app
from celery.signals import celeryd_init, worker_process_init
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from thyrocad.db.engine import make_engine, make_session_factory
from thyrocad.pacs.pixels import FramePolicy
from thyrocad.pacs.spool import Spool
from thyrocad.settings import Settings, load_settings
from thyrocad.worker import task_policy
from thyrocad.worker.claims import ClaimBook, set_node_name, worker_name
from thyrocad.worker.device import Device, batch_size
from thyrocad.worker.model_holder import ModelHolder

logger = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What tasks in one process share.

    ``settings`` are this process's effective settings: on a GPU worker
    (``THYROCAD_WORKER_DEVICE=gpu:N``) ``batch_max`` holds ``THYROCAD_GPU_BATCH_MAX``,
    so a drain claims as many images as one forward pass on the GPU takes.
    """

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    spool: Spool
    frame_policy: FramePolicy
    models: ModelHolder
    claims: ClaimBook
    device: Device = field(default_factory=Device)
    # Hook for metrics: called with an event name and its fields.
    observe: Callable[[str, dict[str, Any]], None] = field(default=lambda event, fields: None)

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        device = Device.parse(settings.worker_device)
        settings = settings.model_copy(update={"batch_max": batch_size(device, settings)})
        engine = make_engine(settings.db_url)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            spool=Spool(settings.spool_dir),
            frame_policy=FramePolicy.parse(settings.frame_policy),
            models=ModelHolder(device, settings),
            claims=ClaimBook(worker_name()),
            device=device,
        )

    def wait_for_database(self, timeout: float, interval: float = 0.5) -> bool:
        """Block until the database answers (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return True
            except SQLAlchemyError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(interval)


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


@celeryd_init.connect
def _node_started(sender: str | None = None, **_: object) -> None:
    set_node_name(sender)


@worker_process_init.connect
def _after_fork(sender: object = None, **_: object) -> None:
    # Connections inherited from the parent must not be shared across processes.
    global _context
    if _context is not None:
        _context.engine.dispose(close=False)
        _context = None
    if isinstance(sender, str):  # the solo pool names its node here
        set_node_name(sender)
    threading.Thread(target=_recover_claims, name="thyrocad-claims-at-start", daemon=True).start()


def recover_at_start(ctx: WorkerContext, give_up_after: float = 3600.0) -> list[int]:
    """At process start: release what this worker held before it restarted and queue it.

    Waits for the database (a worker may start during an outage). The killed task of
    the previous life is not delivered again soon (its broker message waits for the
    visibility timeout), so the released instances get a task of their own.
    """
    if not ctx.wait_for_database(give_up_after):
        return []
    try:
        released = ctx.claims.release_stale(ctx.sessions)
    except SQLAlchemyError:
        logger.warning("could not release earlier claims; their lease will", exc_info=True)
        return []
    if released:
        task_policy.publish("thyrocad.infer", released)
    return released


def _recover_claims() -> None:
    try:
        recover_at_start(get_context())
    except Exception:  # a task will meet the same problem and report it
        logger.exception("could not give back the claims held before this start")
