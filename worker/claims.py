"""The claims a worker process holds: who it is, which batches are in flight, their lease.

A claim has a short lease (``THYROCAD_CLAIM_LEASE_SECONDS``) so that the instances of
a worker that vanished are taken over quickly; a live worker renews the lease of its
batches while it works on them (:func:`heartbeat`), so a slow batch is never stolen.
Each claim also names the worker process that holds it (:func:`worker_name`: the Celery
node name and the pool slot, the same after a restart), so a process gives back at
once whatever it holds but no longer works on: at start (what its killed previous life
held; ``worker.context.recover_at_start``) and before each drain (what a drain that died
with the database left).
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from thyrocad.db import repository

logger = logging.getLogger(__name__)

_node_name: str | None = None


def set_node_name(name: str | None) -> None:
    """Remember the Celery node name (``inference@host``) of this worker."""
    global _node_name
    _node_name = name or None


def worker_name() -> str:
    """This process's stable name: node name and pool slot (``inference@host/0``)."""
    from billiard.process import current_process

    slot = getattr(current_process(), "index", None) or 0
    return f"{_node_name or socket.gethostname()}/{slot}"


class ClaimBook:
    """The claim tokens of the batches this process is working on right now.

    Tokens are opened under the lock before their claim is made, and the release of
    stale claims reads them under the same lock, so a release never gives back a
    batch that a thread of this process is just claiming.
    """

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self._lock = threading.Lock()
        self._live: set[str] = set()

    def open(self) -> str:
        token = uuid.uuid4().hex
        with self._lock:
            self._live.add(token)
        return token

    def close(self, token: str) -> None:
        with self._lock:
            self._live.discard(token)

    def live(self) -> list[str]:
        with self._lock:
            return sorted(self._live)

    def release_stale(self, sessions: sessionmaker[Session]) -> list[int]:
        """Give back this worker's claims that no batch of this process works on."""
        with self._lock, sessions.begin() as session:
            released = repository.release_worker_claims(
                session, self.worker, sorted(self._live), _utcnow()
            )
        if released:
            logger.info(
                "released %d instances this worker had claimed earlier",
                len(released),
                extra={"worker": self.worker},
            )
        return released

    def renew(self, sessions: sessionmaker[Session]) -> int:
        tokens = self.live()
        if not tokens:
            return 0
        with sessions.begin() as session:
            return repository.renew_claims(session, tokens, repository.database_now(session))


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@contextmanager
def heartbeat(
    claims: ClaimBook, sessions: sessionmaker[Session], lease_seconds: float
) -> Iterator[None]:
    """Renew the claims of ``claims`` every third of the lease while the block runs."""
    stop = threading.Event()
    interval = max(0.5, lease_seconds / 3.0)

    def beat() -> None:
        failing = False
        while not stop.wait(interval):
            try:
                claims.renew(sessions)
                if failing:
                    logger.info("claim renewal works again")
                failing = False
            except SQLAlchemyError:
                # Once per outage: the drain itself meets the same error and retries.
                if not failing:
                    logger.warning("cannot renew claims: database unavailable")
                failing = True

    thread = threading.Thread(target=beat, name="thyrocad-claim-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(interval + 5.0)
