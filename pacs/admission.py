"""Which peers get an association slot, and a log line for every one refused.

pynetdicom counts every acceptor thread against ``maximum_associations``, including
connections that have not sent an A-ASSOCIATE-RQ yet: sixteen idle sockets (a port scan,
a TCP health check) lock every real sender out. Here a slot is taken when an
association request arrives and given back when its connection closes; connections
still waiting to send their request are bounded separately and only by a generous
number (their time is bounded by ARTIM, see ``pacs.association_io``).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

from pynetdicom import evt

logger = logging.getLogger(__name__)

# (result source, diagnostic) of an A-ASSOCIATE-RJ (PS3.8 9.3.4) -> what the log says.
_REJECT_REASONS = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context not supported",
    (0x01, 0x03): "calling AE title not allowed",
    (0x01, 0x07): "called AE title is not ours",
    (0x02, 0x01): "user identity not accepted",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "too many associations",
}

# Presentation context results (PS3.8 9.3.3.2) -> what the log says.
_CONTEXT_RESULTS = {
    0x01: "user rejection",
    0x02: "no reason",
    0x03: "abstract syntax not supported",
    0x04: "transfer syntaxes not supported",
}

# Rejected abstract syntaxes named in the log line; the rest are counted.
_CONTEXTS_SHOWN = 5

# A connection refused for want of room is logged at most this often (a flood would
# otherwise write one line per connection).
_REFUSAL_LOG_INTERVAL = 10.0


def refusal_reason(assoc: Any) -> str:
    """Why an association was refused, in words, from its A-ASSOCIATE-RJ."""
    answer = getattr(getattr(assoc, "acceptor", None), "primitive", None)
    key = (
        int(getattr(answer, "result_source", 0) or 0),
        int(getattr(answer, "diagnostic", 0) or 0),
    )
    return _REJECT_REASONS.get(key, "rejected")


def peer(assoc: Any) -> dict[str, str]:
    """Calling and called AE titles and the address of an association's requestor: what
    the listener's logs say about a peer (no patient data)."""
    found = {"calling_aet": "", "called_aet": "", "address": ""}
    requestor = getattr(assoc, "requestor", None)
    primitive = getattr(requestor, "primitive", None)
    if primitive is not None:
        found["calling_aet"] = str(primitive.calling_ae_title).strip()
        found["called_aet"] = str(primitive.called_ae_title).strip()
    info = getattr(requestor, "address_info", None)
    if info is not None:
        found["address"] = f"{info.address}:{info.port}"
    return found


class Admission:
    """Association slots for one listener process; bind :meth:`handlers` to its server."""

    def __init__(self, max_associations: int, max_waiting: int | None = None) -> None:
        self.max_associations = max_associations
        # Connections that have not sent their association request yet.
        self.max_waiting = max_waiting if max_waiting is not None else max(64, 4 * max_associations)
        self._lock = threading.Lock()
        self._holding: weakref.WeakSet[Any] = weakref.WeakSet()
        self._refused_connections = 0
        self._last_refusal_log = float("-inf")

    def handlers(self) -> list[Any]:
        """``evt_handlers`` entries for the listener's server."""
        return [
            (evt.EVT_REQUESTED, self.requested),
            (evt.EVT_REJECTED, self.rejected),
            (evt.EVT_ACCEPTED, self.accepted),
            (evt.EVT_CONN_CLOSE, self.closed),
        ]

    def in_use(self) -> int:
        """Slots held now: associations requested and not yet closed."""
        with self._lock:
            return self._prune()

    def connection_allowed(self, open_connections: int, address: Any) -> bool:
        """Whether the server takes one more TCP connection while ``open_connections``
        are open; a refused one is closed at once."""
        if open_connections < self.max_associations + self.max_waiting:
            return True
        now = time.monotonic()
        with self._lock:
            self._refused_connections += 1
            if now - self._last_refusal_log < _REFUSAL_LOG_INTERVAL:
                return False
            refused, self._refused_connections = self._refused_connections, 0
            self._last_refusal_log = now
        logger.warning(
            "connections refused: too many open",
            extra={
                "refused": refused,
                "open_connections": open_connections,
                "address": _host_port(address),
            },
        )
        return False

    def requested(self, event: Any) -> None:
        """EVT_REQUESTED: take a slot, or answer A-ASSOCIATE-RJ (transient, local limit
        exceeded) as pynetdicom would, before it negotiates anything."""
        assoc = event.assoc
        with self._lock:
            if self._prune() < self.max_associations:
                self._holding.add(assoc)
                return
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def rejected(self, event: Any) -> None:
        """EVT_REJECTED: one log line saying who was refused and why; the slot is free."""
        assoc = event.assoc
        with self._lock:
            self._holding.discard(assoc)
        logger.warning("association refused: %s", refusal_reason(assoc), extra=peer(assoc))

    def accepted(self, event: Any) -> None:
        """EVT_ACCEPTED: one log line naming the presentation contexts refused, if any:
        a warning when nothing was accepted, else information (many senders, dcmtk's
        storescu among them, propose every storage class they know)."""
        assoc = event.assoc
        refused = sorted(
            {
                (str(cx.abstract_syntax), _CONTEXT_RESULTS.get(cx.result, str(cx.result)))
                for cx in getattr(assoc, "rejected_contexts", [])
            }
        )
        if not refused:
            return
        accepted = len(getattr(assoc, "accepted_contexts", []))
        shown = "; ".join(f"{uid} ({why})" for uid, why in refused[:_CONTEXTS_SHOWN])
        if len(refused) > _CONTEXTS_SHOWN:
            shown += f"; and {len(refused) - _CONTEXTS_SHOWN} more"
        logger.log(
            logging.INFO if accepted else logging.WARNING,
            "presentation contexts rejected",
            extra={
                **peer(assoc),
                "accepted": accepted,
                "rejected": len(refused),
                "contexts": shown,
            },
        )

    def closed(self, event: Any) -> None:
        """EVT_CONN_CLOSE: the slot is free."""
        with self._lock:
            self._holding.discard(event.assoc)

    def _prune(self) -> int:
        # An association whose thread ended without a close event gives its slot back too.
        for assoc in [a for a in self._holding if not a.is_alive()]:
            self._holding.discard(assoc)
        return len(self._holding)


def _host_port(address: Any) -> str:
    try:
        return f"{address[0]}:{address[1]}"
    except (TypeError, IndexError):
        return str(address)
