"""Audit events of the listener's associations: who connected, whether they were let in
and why not, and how many instances each association stored or had refused.

pynetdicom's handlers call in from the association threads; the events go to a sink
that must return at once (the intake queues them and writes them with its batches), so
auditing never holds up or fails an association. No patient data: AE titles, the peer's
address and counts only.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt

from thyrocad.db.records import AuditEvent
from thyrocad.db.repository.audit import ASSOCIATION, INSTANCES_RECEIVED
from thyrocad.pacs.admission import peer, refusal_reason
from thyrocad.pacs.meta import STATUS_SUCCESS

Sink = Callable[[AuditEvent], None]

# How long a closed connection waits for its association's release or abort to show.
_SETTLE_SECONDS = 0.2


def _ending(assoc: Any) -> str:
    """How an association ended, as far as it can tell: released, aborted or closed."""
    if getattr(assoc, "is_released", False):
        return "released"
    try:
        aborted = bool(getattr(assoc, "is_aborted", False) or assoc.acse.is_aborted())
    except Exception:  # a half-torn-down association: its DUL may be gone
        aborted = False
    return "aborted" if aborted else "closed"


@dataclass
class _Association:
    number: str
    peer: dict[str, str]
    stored: int = 0
    refused: int = 0
    ended: str = "closed"


class AssociationAudit:
    """Bind :meth:`handlers` to a listener's server; call :meth:`stored` per C-STORE."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._lock = threading.Lock()
        self._open: weakref.WeakKeyDictionary[Any, _Association] = weakref.WeakKeyDictionary()
        # Process id and a counter: ties an association's two events together.
        self._numbers = (f"{os.getpid()}-{n}" for n in itertools.count(1))

    def handlers(self) -> list[Any]:
        """``evt_handlers`` entries for the listener's server."""
        return [
            (evt.EVT_ACCEPTED, self.accepted),
            (evt.EVT_REJECTED, self.rejected),
            (evt.EVT_RELEASED, self.released),
            (evt.EVT_ABORTED, self.aborted),
            (evt.EVT_CONN_CLOSE, self.closed),
        ]

    def accepted(self, event: Any) -> None:
        """EVT_ACCEPTED: the association is let in; its instances are counted from now."""
        who = peer(event.assoc)
        with self._lock:
            state = _Association(next(self._numbers), who)
            self._open[event.assoc] = state
        self._emit(ASSOCIATION, who, "success", {"association": state.number})

    def rejected(self, event: Any) -> None:
        """EVT_REJECTED: who was refused, and why."""
        self._emit(
            ASSOCIATION, peer(event.assoc), "refused", {"reason": refusal_reason(event.assoc)}
        )

    def stored(self, assoc: Any, status: int) -> None:
        """Count one C-STORE of ``assoc`` answered with ``status``."""
        with self._lock:
            state = self._open.get(assoc)
            if state is None:
                return  # not an association of ours (a C-GET's own association)
            if status == STATUS_SUCCESS:
                state.stored += 1
            else:
                state.refused += 1

    def released(self, event: Any) -> None:
        """EVT_RELEASED: the association ended normally."""
        self._end(event.assoc, "released")

    def aborted(self, event: Any) -> None:
        """EVT_ABORTED: the association was aborted (by either side)."""
        self._end(event.assoc, "aborted")

    def closed(self, event: Any) -> None:
        """EVT_CONN_CLOSE: the end of any association not ended by the events above.

        It may come first: the connection of an aborted association closes before
        the association's own thread sees the A-ABORT (and a released one's may close
        while that thread is still finishing the release), hence the short look.
        """
        assoc = event.assoc
        with self._lock:
            if assoc not in self._open:
                return
        deadline = time.monotonic() + _SETTLE_SECONDS
        while True:
            how = _ending(assoc)
            if how != "closed" or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        self._end(assoc, how)

    def _end(self, assoc: Any, how: str) -> None:
        with self._lock:
            state = self._open.pop(assoc, None)
        if state is None:
            return  # refused, or already ended
        self._emit(
            INSTANCES_RECEIVED,
            state.peer,
            "success" if how == "released" else "failure",
            {
                "association": state.number,
                "stored": state.stored,
                "refused": state.refused,
                "ended": how,
            },
        )

    def _emit(self, kind: str, who: dict[str, str], outcome: Any, details: dict[str, Any]) -> None:
        self._sink(
            AuditEvent(
                kind=kind,
                actor=who["calling_aet"] or "unknown",
                outcome=outcome,
                details={**who, **details},
                at=dt.datetime.now(dt.UTC),
            )
        )
