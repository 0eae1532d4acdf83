"""The bytes of a received C-STORE, file meta and data set, without copying the data set.

pynetdicom collects a C-STORE's data set in a ``BytesIO``. ``Event.encoded_dataset()``
copies it twice (``getvalue()``, then joined to the file meta), and parsing those bytes
copies the pixel data a third time: a 200 MB instance held 600 MB beyond the buffer
itself. Here the handler gets the encoded file meta and a read-only view of the buffer:
the header is parsed from it (large values are not read, see :func:`pacs.meta.read_dataset`)
and the spool writes it as it is, so the listener holds one copy of an instance.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

Part = bytes | memoryview


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
    head = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
    with stream.getbuffer() as body:
        yield [head, body.toreadonly()]


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
        return b"".join(self._slices(size))
