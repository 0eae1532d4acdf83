"""The bytes of a received C-STORE, file meta and data set, without copying the data set.

pynetdicom collects a C-STORE's data set in a ``BytesIO``. ``Event.encoded_dataset()``
copies it twice (``getvalue()``, then joined to the file meta), and parsing those bytes
copies the pixel data a third time: a 200 MB instance held 600 MB beyond the buffer
itself. Here the handler gets the encoded file meta and a read-only view of the buffer:
the header is parsed from it (large values are not read, see :func:`pacs.meta.read_dataset`)
and the spool writes it as it is, so the listener holds one copy of an instance.

The file meta is encoded here, byte for byte as pynetdicom's ``Event.file_meta`` and
``encode_file_meta`` would (through pydicom's datasets: a quarter of a millisecond per
instance); a value outside what that shortcut writes goes through pydicom as before.
"""

from __future__ import annotations

import bisect
import functools
import io
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pydicom.uid import RE_VALID_UID

Part = bytes | memoryview

_PREFIX = b"\x00" * 128 + b"DICM"


@contextmanager
def received_parts(event: Any) -> Iterator[list[Part]]:
    """The encoded instance of an ``EVT_C_STORE`` as parts to read or write in order:
    preamble, prefix and file meta, then the data set as the peer sent it. The view of
    pynetdicom's buffer is valid inside the ``with`` block only."""
    from pynetdicom.dsutils import encode_file_meta  # the listener's import, not a worker's

    stream = getattr(getattr(event, "request", None), "DataSet", None)
    if not isinstance(stream, io.BytesIO):  # another pynetdicom, a test's event
        yield [event.encoded_dataset(include_meta=True)]
        return
    head = _file_meta_of(event)
    if head is None:
        head = _PREFIX + encode_file_meta(event.file_meta)
    with stream.getbuffer() as body:
        yield [head, body.toreadonly()]


def _file_meta_of(event: Any) -> bytes | None:
    """Preamble, prefix and the file meta pynetdicom's ``Event.file_meta`` describes, for a
    real pynetdicom event; None for anything else (its ``file_meta`` is what counts)."""
    from pynetdicom.events import Event

    if type(event) is not Event:
        return None
    request = event.request
    return file_meta_bytes(
        getattr(request, "AffectedSOPClassUID", None),
        getattr(request, "AffectedSOPInstanceUID", None),
        getattr(event.context, "transfer_syntax", None),
    )


def file_meta_bytes(
    sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any
) -> bytes | None:
    """Preamble, ``DICM`` and the encoded File Meta Information of a C-STORE's data set,
    exactly as ``pynetdicom.dsutils.encode_file_meta(Event.file_meta)`` writes it: group
    length, version ``00 01``, the three UIDs, pynetdicom's implementation class UID and
    version name. None unless every UID is a valid one of at most 64 characters (pydicom
    then writes its characters, padded with one NUL to an even length)."""
    values = []
    for uid in (sop_class_uid, sop_instance_uid, transfer_syntax):
        if not isinstance(uid, str) or len(uid) > 64 or not RE_VALID_UID.match(uid):
            return None
        values.append(uid.encode("ascii"))
    body = b"".join(
        [
            _META_VERSION,
            _element(0x0002, b"UI", values[0]),
            _element(0x0003, b"UI", values[1]),
            _element(0x0010, b"UI", values[2]),
            _implementation(),
        ]
    )
    return _PREFIX + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


# (0002,0001) File Meta Information Version: OB, reserved bytes, 4-byte length, 00 01.
_META_VERSION = struct.pack("<HH2s2xI", 0x0002, 0x0001, b"OB", 2) + b"\x00\x01"


def _element(element: int, vr: bytes, value: bytes, pad: bytes = b"\x00") -> bytes:
    """A group 2 element with a 2-byte length (UI, SH), padded to an even length."""
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


@functools.cache
def _implementation() -> bytes:
    """(0002,0012) and (0002,0013): pynetdicom's implementation class UID and version."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    return _element(0x0012, b"UI", str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii")) + _element(
        0x0013, b"SH", str(PYNETDICOM_IMPLEMENTATION_VERSION).encode("ascii"), b" "
    )


class PartsReader(io.RawIOBase):
    """A seekable, read-only file over parts read one after the other; reads copy only
    what they return."""

    def __init__(self, parts: Sequence[Part]) -> None:
        super().__init__()
        self._parts = [p if isinstance(p, memoryview) else memoryview(p) for p in parts]
        self._starts: list[int] = []
        total = 0
        for part in self._parts:
            self._starts.append(total)
            total += part.nbytes
        self._size = total
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _slices(self, size: int) -> Iterator[memoryview]:
        """Views of the next ``size`` bytes (fewer at the end), advancing the position."""
        for part, start in zip(self._parts, self._starts, strict=True):
            if size <= 0:
                return
            end = start + part.nbytes
            if self._pos >= end:
                continue
            offset = self._pos - start
            n = min(part.nbytes - offset, size)
            yield part[offset : offset + n]
            self._pos += n
            size -= n

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        done = 0
        for piece in self._slices(target.nbytes):
            target[done : done + piece.nbytes] = piece
            done += piece.nbytes
        return done

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self._size
        # Most reads (pydicom reads a header a few bytes at a time) lie inside one part.
        pos = self._pos
        index = bisect.bisect_right(self._starts, pos) - 1
        if 0 <= index < len(self._parts):
            part, offset = self._parts[index], pos - self._starts[index]
            if offset + size <= part.nbytes:
                self._pos = pos + size
                return part[offset : offset + size].tobytes()
        return b"".join(self._slices(size))
