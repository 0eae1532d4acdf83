"""How the listener runs each accepted pynetdicom association: whole-PDU socket reads,
TCP_NODELAY, and reactor threads that wait for work instead of polling for it.

pynetdicom gives every association two threads. Its DUL thread sleeps 1 ms, checks the
socket with a zero-timeout ``select`` and its queues, and sleeps again; its association
thread does the same with its DIMSE queue. With four busy associations that is 8,000
wake-ups a second, each taking the GIL from the threads doing real work (measured: four
idle associations cost 18 % of a core). Here both threads block until something
arrives: the DUL thread in ``select`` on its socket and a wake-up socket that every put
on its queues writes to, the association thread on an event set by every put on its
queues. A timeout (``_MAX_WAIT``) keeps pynetdicom's timers (ARTIM, idle, shutdown
requests) working as before.

Everything is attached per association at EVT_CONN_OPEN, before its threads start,
and leaves pynetdicom's state machine and its loops' logic untouched.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# Reads up to this length go straight into one buffer; a PDU is at most the listener's
# max_pdu_size (128 KiB by default) plus its 6-byte header.
_RECV_PREALLOCATE = 1024 * 1024

# The longest a reactor blocks before looking at its timers and stop flags again.
_MAX_WAIT = 0.05


def tune_association(event: Any) -> None:
    """EVT_CONN_OPEN handler for the listener's associations."""
    assoc = event.assoc
    try:
        transport = assoc.dul.socket
        # Nagle's algorithm halves DICOM throughput and adds 40-60 ms stalls.
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        logger.debug("could not tune the association's socket")
        return
    # pynetdicom reads a PDU 4 KiB at a time: 350 recv calls for a 1.4 MB image, each
    # dropping and retaking the GIL against the other associations and the intake.
    transport.recv = types.MethodType(recv_exactly, transport)
    _wait_instead_of_polling(assoc)


def recv_exactly(transport: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` in as few system calls as the kernel allows: block until
    ``nr_bytes`` arrived; if the peer closes first, return what came (as pynetdicom does)."""
    if nr_bytes > _RECV_PREALLOCATE:
        # Longer than any PDU we accept: memory grows with what arrives, not with the
        # length the peer announced.
        received = bytearray()
        while len(received) < nr_bytes:
            part = transport.socket.recv(min(nr_bytes - len(received), _RECV_PREALLOCATE))
            if not part:
                break
            received += part
        return received
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    nr_read = 0
    while nr_read < nr_bytes:
        got = transport.socket.recv_into(view[nr_read:])
        if not got:
            view.release()
            del buffer[nr_read:]
            break
        nr_read += got
    return buffer


class NotifyingQueue(queue.Queue[Any]):
    """A FIFO queue that calls ``notify`` after every put."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    @classmethod
    def replacing(cls, old: queue.Queue[Any], notify: Callable[[], None]) -> NotifyingQueue:
        """A notifying queue holding what ``old`` holds (the acceptor's socket has
        already queued its "connection open" event when EVT_CONN_OPEN fires)."""
        new = cls(notify)
        while True:
            try:
                new.put(old.get_nowait())
            except queue.Empty:
                return new

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._notify()


class Doorbell:
    """A socket pair: ``ring`` from any thread wakes a ``select`` on ``fileno()``."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def ring(self) -> None:
        # A full buffer means it is already ringing; a closed one has no waiter left.
        with contextlib.suppress(OSError):
            self._writer.send(b"\0")

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            while self._reader.recv(4096):
                pass

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


# What is replaced or read below, as pynetdicom 3.0 names it.
_DUL_PARTS: tuple[str, ...] = (
    "to_provider_queue",
    "event_queue",
    "to_user_queue",
    "_run_loop_delay",
    "_is_transport_event",
    "_kill_thread",
    "socket",
)


def _wait_instead_of_polling(assoc: Any) -> None:
    dul, dimse = assoc.dul, assoc.dimse
    if not all(hasattr(dul, name) for name in _DUL_PARTS) or not hasattr(dimse, "msg_queue"):
        # Another pynetdicom than the 3.0 this was written for: keep its polling.
        logger.warning("pynetdicom's reactor internals changed; associations poll as usual")
        return
    doorbell = Doorbell()
    dimse_ready = threading.Event()

    # The DUL thread's inputs: primitives to send (from the association thread) and
    # state machine events (from the socket and from other threads on close or abort).
    dul.to_provider_queue = NotifyingQueue.replacing(dul.to_provider_queue, doorbell.ring)
    dul.event_queue = NotifyingQueue.replacing(dul.event_queue, doorbell.ring)
    # The association thread's inputs: decoded DIMSE messages, and ACSE primitives
    # (release and abort requests) from the DUL.
    dimse.msg_queue = NotifyingQueue.replacing(dimse.msg_queue, dimse_ready.set)
    dul.to_user_queue = NotifyingQueue.replacing(dul.to_user_queue, dimse_ready.set)

    # DUL loop: it sleeps `_run_loop_delay` whenever an iteration found nothing, then
    # checks the socket only when no primitive waits to be sent; that check now blocks.
    dul._run_loop_delay = 0
    check_socket = dul._is_transport_event

    def wait_then_check_socket() -> bool:
        if dul.event_queue.empty() and dul.to_provider_queue.empty() and not dul._kill_thread:
            sock = getattr(dul.socket, "socket", None)
            waitables: list[Any] = [doorbell] if sock is None else [sock, doorbell]
            # A socket closed under us is reported by pynetdicom's own check.
            with contextlib.suppress(OSError, ValueError):
                select.select(waitables, [], [], _MAX_WAIT)
            doorbell.clear()
        return bool(check_socket())

    dul._is_transport_event = wait_then_check_socket

    # Association loop: it sleeps 1 ms, then takes a DIMSE message without blocking and
    # checks for release and abort requests; the take now waits for any of them first.
    take_message = dimse.get_msg

    def wait_then_take_message(block: bool = False) -> Any:
        if not block:
            dimse_ready.wait(_MAX_WAIT)
            # Cleared before the queues are looked at, so a put after this wakes the
            # next iteration instead of being missed.
            dimse_ready.clear()
        return take_message(block)

    dimse.get_msg = wait_then_take_message

    # The doorbell's sockets go with the association.
    weakref.finalize(dul, doorbell.close)
