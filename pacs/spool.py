"""The spool: acknowledged instances on disk before anything else happens.

An instance is acknowledged only after its bytes are in the spool: written to a
temporary file, flushed with fsync, renamed into place, and the folder fsynced,
so a crash at any point leaves either the whole file or nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from thyrocad.pacs.errors import SpoolError


@dataclass(frozen=True)
class SpoolEntry:
    """One spooled instance: where it is and what it holds."""

    sop_instance_uid: str
    path: Path
    sha256: str
    size_bytes: int


class Spool:
    """Instances stored as ``<root>/<2 hex>/<SOP Instance UID>.dcm``."""

    SUFFIX = ".dcm"

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, sop_instance_uid: str) -> Path:
        """Where an instance lives; the fan-out folder keeps directories small."""
        if not sop_instance_uid or "/" in sop_instance_uid or sop_instance_uid.startswith("."):
            raise SpoolError(f"unsafe SOP Instance UID for a file name: {sop_instance_uid!r}")
        bucket = hashlib.sha1(sop_instance_uid.encode()).hexdigest()[:2]
        return self.root / bucket / f"{sop_instance_uid}{self.SUFFIX}"

    def write(
        self, sop_instance_uid: str, data: bytes | Sequence[bytes | memoryview]
    ) -> SpoolEntry:
        """Store ``data`` (bytes, or parts written one after the other, see
        :mod:`pacs.received`) durably; raise :class:`SpoolError` when it cannot be done."""
        parts = [data] if isinstance(data, bytes) else list(data)
        size = sum(memoryview(part).nbytes for part in parts)
        target = self.path_for(sop_instance_uid)
        if self.min_free_bytes and self.free_bytes() - size < self.min_free_bytes:
            raise SpoolError(
                f"spool has less than {self.min_free_bytes // 2**20} MiB free at {self.root}"
            )
        digest = hashlib.sha256()
        tmp_name = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
            with os.fdopen(fd, "wb") as handle:
                for part in parts:
                    handle.write(part)
                    digest.update(part)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
            tmp_name = None
            _fsync_dir(target.parent)
        except OSError as exc:
            raise SpoolError(f"cannot write to the spool: {exc.strerror or exc}") from exc
        finally:
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
        return SpoolEntry(
            sop_instance_uid=sop_instance_uid,
            path=target,
            sha256=digest.hexdigest(),
            size_bytes=size,
        )

    def read(self, path: Path | str) -> bytes:
        """The bytes of a spooled instance."""
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise SpoolError(f"spooled file unreadable: {exc.strerror or exc}") from exc

    def entries(self) -> Iterator[Path]:
        """Every spooled instance file (temporary files are skipped)."""
        for bucket in sorted(self.root.iterdir()) if self.root.exists() else []:
            if not bucket.is_dir():
                continue
            for path in bucket.iterdir():
                if path.suffix == self.SUFFIX and not path.name.startswith("."):
                    yield path

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.entries())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
