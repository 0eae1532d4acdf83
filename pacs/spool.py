"""The spool: acknowledged instances on disk before anything else happens.

An instance is acknowledged only after its bytes are in the spool: written to a
temporary file, flushed with fsync, renamed into place, and the folder fsynced,
so a crash at any point leaves either the whole file or nothing.

A spool remembers the SHA-256 of the files it wrote lately (:meth:`Spool.written_digest`),
so the listener's reconciler, which compares every new file with the database, need not
read and hash again what this process has just written (1.4 ms of CPU per 1.44 MB image).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
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
    #: Files whose digest is remembered, at most (about 450 bytes each): more than the
    #: reconciler's interval and margin (70 s) hold at 100 images/s.
    RECENT_MAX = 10_000

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        # path -> (inode, size, mtime in ns, sha256) of a file this spool wrote.
        self._recent: OrderedDict[str, tuple[int, int, int, str]] = OrderedDict()
        self._recent_lock = threading.Lock()

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
                written = os.fstat(handle.fileno())  # a rename keeps inode and mtime
            os.replace(tmp_name, target)
            tmp_name = None
            _fsync_dir(target.parent)
        except OSError as exc:
            raise SpoolError(f"cannot write to the spool: {exc.strerror or exc}") from exc
        finally:
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
        sha256 = digest.hexdigest()
        with self._recent_lock:
            key = str(target)
            self._recent.pop(key, None)
            self._recent[key] = (written.st_ino, written.st_size, written.st_mtime_ns, sha256)
            while len(self._recent) > self.RECENT_MAX:
                self._recent.popitem(last=False)
        return SpoolEntry(
            sop_instance_uid=sop_instance_uid,
            path=target,
            sha256=sha256,
            size_bytes=size,
        )

    def written_digest(self, path: Path | str, stat: os.stat_result | None = None) -> str | None:
        """The SHA-256 this spool computed when it wrote ``path``, while the file is still
        that file (same inode, size and modification time); else None (read it)."""
        with self._recent_lock:
            known = self._recent.get(str(path))
        if known is None:
            return None
        try:
            now = stat if stat is not None else os.stat(path)
        except OSError:
            return None
        if (now.st_ino, now.st_size, now.st_mtime_ns) != known[:3]:
            return None
        return known[3]

    def forget_written_before(self, when: float) -> None:
        """Forget the digests of files last written before ``when`` (seconds since the
        epoch): the reconciler's periodic passes no longer look at them."""
        cutoff = int(when * 1e9)
        with self._recent_lock:
            for key in [k for k, v in self._recent.items() if v[2] < cutoff]:
                del self._recent[key]

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
