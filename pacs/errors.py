"""The exceptions of the DICOM side of thyrocad.

Every error carries a human-readable reason that is stored with the instance,
and the DIMSE status the listener answers with when it happens during a C-STORE.
"""

from __future__ import annotations


class PacsError(Exception):
    """Base class of every error raised by ``pacs``."""


class InvalidInstance(PacsError):
    """An instance that cannot be accepted; ``status`` is the DIMSE answer."""

    # 0xC000 "cannot understand", 0xA900 "dataset does not match SOP class"
    def __init__(self, reason: str, status: int = 0xC000) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class SpoolError(PacsError):
    """The spool could not store an instance (disk full, permissions): 0xA700."""


class PixelError(PacsError):
    """Pixel data that cannot be decoded or turned into a model input."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SendError(PacsError):
    """A C-STORE, C-FIND or C-MOVE to a peer failed."""
