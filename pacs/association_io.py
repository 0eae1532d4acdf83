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

Reads are bounded too, in time and in length. pynetdicom 3.0 reads a PDU with a
blocking ``recv`` until every announced byte came: half a PDU and silence holds its DUL
thread, and with it the association's slot, forever (its ARTIM and idle timers run on
that same thread), and a P-DATA PDU announcing 4 GiB is buffered as it arrives. Here a
connection has ``artim_timeout`` seconds from its opening to complete its A-ASSOCIATE-RQ,
and an established association ``network_timeout`` seconds for each PDU once it began;
a PDU longer than we advertised gets an A-ABORT before its body is read.

Everything is attached per association at EVT_CONN_OPEN, before its threads start,
and leaves pynetdicom's state machine and its loops' logic untouched.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom.pdu import A_ABORT_RQ

from thyrocad.pacs.admission import peer

logger = logging.getLogger(__name__)

# Reads up to this length go straight into one buffer; a PDU is at most the listener's
# max_pdu_size (128 KiB by default) plus its 6-byte header.
_RECV_PREALLOCATE = 1024 * 1024

# The longest a reactor blocks before looking at its timers and stop flags again.
_MAX_WAIT = 0.05

# The longest the DUL leaves the socket unread while the association thread answers an
# A-ASSOCIATE-RQ (it answers at once; this only bounds a thread that never does).
_ANSWER_WAIT = 2.0

# PDU types (PS3.8 9.3.1): pynetdicom reads the body of these, and only of these.
_PDU_TYPES = frozenset(range(0x01, 0x08))
_P_DATA_TF = 0x04
# Any other PDU than P-DATA: an A-ASSOCIATE-RQ of 128 presentation contexts with a dozen
# transfer syntaxes each and a user identity token stays well under this; release and
# abort PDUs are 4 bytes.
_OTHER_PDU_MAX = 256 * 1024
# What a max_pdu_size of 0 ("no limit", as DICOM defines it) allows: a 32-bit length.
_PDU_LENGTH_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class TransportLimits:
    """How long and how much an accepted connection may take to send what it sends."""

    max_pdu_size: int = 131072  # the Maximum Length we advertise; 0 means no limit
    artim_timeout: float = 5.0  # connection opened -> whole A-ASSOCIATE-RQ received
    network_timeout: float = 60.0  # first -> last byte of each later PDU

    def longest(self, pdu_type: int) -> int:
        """The largest length field accepted for a PDU of ``pdu_type``."""
        if pdu_type == _P_DATA_TF:
            # Maximum Length is that of the P-DATA-TF variable field (PS3.8 D.1.1), which
            # is what the length field counts.
            return self.max_pdu_size or _PDU_LENGTH_MAX
        return _OTHER_PDU_MAX


def tune_association(event: Any, limits: TransportLimits | None = None) -> None:
    """EVT_CONN_OPEN handler for the listener's associations."""
    assoc = event.assoc
    try:
        transport = assoc.dul.socket
        # Nagle's algorithm halves DICOM throughput and adds 40-60 ms stalls.
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        logger.debug("could not tune the association's socket")
        return
    _PYNETDICOM_LOG.install()
    limits = limits or TransportLimits()
    reader = PduReader(transport, assoc, limits)
    transport.recv = reader
    _wait_instead_of_polling(assoc)
    _stop_waiting_when_closed(assoc, reader)
    if isinstance(transport.socket, ssl.SSLSocket):
        _tls_handshake(transport.socket, assoc, reader, limits)


# OpenSSL's reasons for the failures an operator meets, in words.
_HANDSHAKE_FAILURES = {
    "WRONG_VERSION_NUMBER": "not TLS (a plain DICOM client on the TLS port?)",
    "HTTP_REQUEST": "not TLS (an HTTP request)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate (THYROCAD_TLS_CA is set)",
    "CERTIFICATE_VERIFY_FAILED": "the client's certificate is not signed by THYROCAD_TLS_CA",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust our certificate's CA",
    "UNEXPECTED_EOF_WHILE_READING": "the client closed the connection",
    "TimeoutError": "no handshake within the ARTIM timeout",
}


def _tls_handshake(
    sock: ssl.SSLSocket, assoc: Any, reader: PduReader, limits: TransportLimits
) -> None:
    """The server's TLS handshake, on the connection's own thread and within ARTIM; a
    client that fails it (no or an untrusted certificate, plain TCP) is logged once and
    its connection ends as a closed one."""
    try:
        sock.settimeout(limits.artim_timeout)
        sock.do_handshake()
    except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError included
        reader.closed = True
        reason = str(getattr(exc, "reason", None) or type(exc).__name__)
        logger.warning(
            "TLS handshake failed: %s",
            _HANDSHAKE_FAILURES.get(reason, reason),
            extra={"address": peer(assoc)["address"], "tls_reason": reason},
        )
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def recv_exactly(transport: Any, nr_bytes: int, deadline: float | None = None) -> bytearray:
    """``AssociationSocket.recv`` in as few system calls as the kernel allows: block until
    ``nr_bytes`` arrived; if the peer closes first, return what came (as pynetdicom does).
    With a ``deadline`` (``time.monotonic()``), raise ``TimeoutError`` once it passed."""
    sock = transport.socket
    late = False

    def wait_at_most() -> None:
        nonlocal late
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # One more read still takes what already arrived (the end of a connection
                # in particular); a second one past the deadline is a peer too slow.
                if late:
                    raise TimeoutError("deadline passed")
                late = True
            sock.settimeout(max(remaining, 0.001))

    if nr_bytes > _RECV_PREALLOCATE:
        # Longer than any PDU we accept by default: memory grows with what arrives, not
        # with the length the peer announced.
        received = bytearray()
        while len(received) < nr_bytes:
            wait_at_most()
            part = sock.recv(min(nr_bytes - len(received), _RECV_PREALLOCATE))
            if not part:
                break
            received += part
        return received
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    nr_read = 0
    while nr_read < nr_bytes:
        wait_at_most()
        got = sock.recv_into(view[nr_read:])
        if not got:
            view.release()
            del buffer[nr_read:]
            break
        nr_read += got
    return buffer


class PduReader:
    """``AssociationSocket.recv`` for the listener: whole PDUs, each within its deadline,
    none longer than we advertised.

    pynetdicom reads a PDU as ``recv(6)`` (type, reserved byte, length) and, for a known
    type, ``recv(length)``; the reader follows that rhythm to know which read is a
    header. A read that misses its deadline, fails, or meets a PDU too long returns
    short: pynetdicom then takes the connection as closed (Evt17) and its state machine
    ends the association as it would for a peer that went away.
    """

    def __init__(self, transport: Any, assoc: Any, limits: TransportLimits) -> None:
        self._transport = transport
        self._assoc = assoc
        self._limits = limits
        self._opened = time.monotonic()
        self._deadline = self._opened + limits.artim_timeout
        self._header_next = True
        # Nothing more will be read: the peer closed, stalled or overstepped.
        self.closed = False

    def __call__(self, nr_bytes: int) -> bytearray:
        if self.closed:
            # Garbage after an invalid PDU is not read 6 bytes (one pynetdicom error line)
            # at a time: the connection is over.
            return bytearray()
        header = self._header_next
        if header:
            # Before the association is up, the whole request counts from the connection's
            # opening (ARTIM); afterwards each PDU gets network_timeout from its header.
            established = bool(getattr(self._assoc, "is_established", False))
            if established:
                self._deadline = time.monotonic() + self._limits.network_timeout
            else:
                self._deadline = self._opened + self._limits.artim_timeout
        try:
            data = recv_exactly(self._transport, nr_bytes, self._deadline)
        except OSError as exc:  # TimeoutError included
            self._end("timed out" if isinstance(exc, TimeoutError) else "read failed", header)
            if not header:
                _PYNETDICOM_LOG.quiet_once()
            return bytearray()
        if len(data) < nr_bytes:
            self.closed = True
            return data
        if not header:
            self._header_next = True
            return data
        pdu_type, _, length = struct.unpack(">BBL", data)
        if pdu_type not in _PDU_TYPES:
            self.closed = True
            return data  # pynetdicom aborts on it and reads no body
        if length > self._limits.longest(pdu_type):
            self._abort_oversized(pdu_type, length)
            return bytearray()
        self._header_next = False
        return data

    def _end(self, why: str, at_header: bool) -> None:
        self.closed = True
        established = bool(getattr(self._assoc, "is_established", False))
        what = "PDU" if established else "association request"
        logger.warning(
            "connection closed: %s %s",
            what,
            why,
            extra={
                "address": peer(self._assoc)["address"],
                "timeout_seconds": (
                    self._limits.network_timeout if established else self._limits.artim_timeout
                ),
                "mid_pdu": not at_header,
            },
        )

    def _abort_oversized(self, pdu_type: int, length: int) -> None:
        self.closed = True
        logger.warning(
            "A-ABORT: PDU longer than we accept",
            extra={
                "address": peer(self._assoc)["address"],
                "pdu_type": f"0x{pdu_type:02X}",
                "pdu_length": length,
                "limit": self._limits.longest(pdu_type),
            },
        )
        abort = A_ABORT_RQ()
        abort.source = 0x02  # the service provider
        abort.reason_diagnostic = 0x06  # invalid PDU parameter value
        sock = self._transport.socket
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)
            sock.sendall(abort.encode())
            # Nothing more of it is read; what is in flight is discarded by the kernel.
            sock.shutdown(socket.SHUT_RDWR)


class _PynetdicomLog(logging.Filter):
    """pynetdicom's PDU decoding log, one line per event: no traceback for a PDU a peer got wrong
    (it logs one for every undecodable PDU), and no "PDU shorter than expected" error
    for a read the reader ended on purpose (it logged why already)."""

    def __init__(self) -> None:
        super().__init__()
        self._ended_here = threading.local()

    def quiet_once(self) -> None:
        """Drop the next "shorter than expected" record of this (DUL) thread."""
        self._ended_here.flag = True

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(self._ended_here, "flag", False) and "shorter than expected" in str(record.msg):
            self._ended_here.flag = False
            return False
        if record.exc_info:
            record.exc_info = None
            record.exc_text = None
        return True

    def install(self) -> None:
        # The DUL, and the decoding helpers it calls on a PDU's fields.
        for name in ("pynetdicom.dul", "pynetdicom.utils"):
            named = logging.getLogger(name)
            if self not in named.filters:
                named.addFilter(self)


_PYNETDICOM_LOG = _PynetdicomLog()


def _stop_waiting_when_closed(assoc: Any, reader: PduReader) -> None:
    """The acceptor's association thread waits ``acse_timeout`` for the A-ASSOCIATE-RQ even
    when the connection closed at once (a port scan, a TCP health check): stop waiting as
    soon as the reader saw the connection end."""
    dul = assoc.dul
    receive = getattr(dul, "receive_pdu", None)
    if receive is None:
        return

    def receive_pdu(wait: bool = False, timeout: float | None = None) -> Any:
        if not wait or timeout is None:
            return receive(wait, timeout)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            primitive = receive(True, max(0.0, min(_MAX_WAIT, remaining)))
            if primitive is not None or remaining <= 0:
                return primitive
            if reader.closed:
                # Anything decoded before the end is already queued.
                return receive(False, None)

    dul.receive_pdu = receive_pdu


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
    awaiting_answer_since: list[float] = []

    def answer_pending() -> bool:
        # Sta3: an A-ASSOCIATE-RQ went up to the association thread, whose AC or RJ is
        # due. Reading on now lets garbage after the request move the state machine on
        # first, and pynetdicom's DUL thread then dies on the answer it cannot send.
        if dul.state_machine.current_state != "Sta3":
            awaiting_answer_since.clear()
            return False
        if not awaiting_answer_since:
            awaiting_answer_since.append(time.monotonic())
        return time.monotonic() - awaiting_answer_since[0] < _ANSWER_WAIT

    def wait_then_check_socket() -> bool:
        if not dul.event_queue.empty():
            # The next PDU is read once the state machine has acted on the last one (the
            # connection's opening included), never ahead of it.
            return False
        if answer_pending():
            with contextlib.suppress(OSError, ValueError):
                select.select([doorbell], [], [], _MAX_WAIT)
            doorbell.clear()
            return False
        sock = getattr(dul.socket, "socket", None)
        # TLS keeps decrypted bytes that select cannot see.
        buffered = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        if dul.to_provider_queue.empty() and not dul._kill_thread and not buffered:
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
