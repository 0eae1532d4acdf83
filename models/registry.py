"""Model versions on disk: ``root/<version>/{model.keras, metadata.json}`` plus ``active.json``.

Every write is atomic (a temporary folder or file, then a rename), so a crash never
leaves half a version or a torn ``active.json``; writers of ``active.json`` and of
metadata hold an advisory lock so two processes cannot lose each other's update.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from thyrocad.models.classifier import Classifier, load_classifier
from thyrocad.models.errors import RegistryError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
ACTIVE_FILE = "active.json"
_LOCK_FILE = ".lock"
_REQUIRED_KEYS = ("architecture", "classes", "input_size")
_RESERVED_KEYS = frozenset({"version", "created_at"})
_VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelVersion:
    """One saved model: its id, what it classifies, its ``.keras`` file and metadata."""

    version: str
    architecture: str
    classes: tuple[str, ...]
    input_size: int
    path: Path
    created_at: str
    metadata: dict[str, Any]


def _json_default(value: Any) -> Any:
    """Serialise the few non-JSON types metadata naturally holds."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a synced temporary file and a rename."""
    try:
        text = json.dumps(data, indent=2, sort_keys=True, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"cannot write {path.name}: {exc}") from exc
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _now() -> datetime:
    return datetime.now(UTC)


class Registry:
    """Model versions under ``root``; at most one is active, with a history to roll back."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / _LOCK_FILE).open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _new_version_id(self, architecture: str, when: datetime) -> str:
        stamp = when.strftime("%Y%m%d-%H%M%S")
        while True:
            version = f"{architecture}-{stamp}-{secrets.token_hex(3)}"
            if not (self.root / version).exists():
                return version

    def save(
        self,
        model: Any,
        metadata: dict[str, Any],
        write_extras: Callable[[Path], object] | None = None,
    ) -> ModelVersion:
        """Save ``model`` with ``metadata`` as a new version and return it.

        ``metadata`` must hold ``architecture``, ``classes`` and ``input_size``; the
        registry adds ``version`` and ``created_at``. ``write_extras`` may add files to
        the version's folder (its evaluation report) before it appears. The version
        appears complete or not at all.
        """
        missing = [key for key in _REQUIRED_KEYS if key not in metadata]
        if missing:
            raise RegistryError(f"metadata lacks {missing}; cannot save a model version")
        self.root.mkdir(parents=True, exist_ok=True)
        created = _now()
        version = self._new_version_id(str(metadata["architecture"]), created)
        record = {
            **metadata,
            "version": version,
            "created_at": created.isoformat(timespec="microseconds"),
        }
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-{version}-"))
        try:
            model.save(staging / MODEL_FILE)
            with (staging / MODEL_FILE).open("rb") as handle:
                os.fsync(handle.fileno())
            _write_json_atomic(staging / METADATA_FILE, record)
            if write_extras is not None:
                write_extras(staging)
            os.rename(staging, self.root / version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(self.root)
        logger.info("model version saved", extra={"version": version})
        return self.get(version)

    def _read(self, version: str) -> ModelVersion:
        if not _VERSION_PATTERN.match(version):
            raise RegistryError(f"{version!r} is not a valid version id")
        folder = self.root / version
        if not folder.is_dir():
            raise RegistryError(f"no model version {version!r} in {self.root}")
        meta_path = folder / METADATA_FILE
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RegistryError(f"model version {version!r} has no {METADATA_FILE}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{meta_path} is corrupt: {exc}") from exc
        if not isinstance(metadata, dict):
            raise RegistryError(f"{meta_path} is corrupt: not a JSON object")
        missing = [key for key in (*_REQUIRED_KEYS, "created_at") if key not in metadata]
        if missing:
            raise RegistryError(f"{meta_path} is corrupt: lacks {missing}")
        model_path = folder / MODEL_FILE
        if not model_path.is_file():
            raise RegistryError(f"model version {version!r} has no {MODEL_FILE}")
        if not zipfile.is_zipfile(model_path):
            raise RegistryError(f"{model_path} is corrupt: not a .keras archive")
        try:
            return ModelVersion(
                version=version,
                architecture=str(metadata["architecture"]),
                classes=tuple(str(c) for c in metadata["classes"]),
                input_size=int(metadata["input_size"]),
                path=model_path,
                created_at=str(metadata["created_at"]),
                metadata=metadata,
            )
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"{meta_path} is corrupt: {exc}") from exc

    def get(self, version: str) -> ModelVersion:
        """Return ``version``; RegistryError if it is missing or its files are corrupt."""
        return self._read(version)

    def list(self) -> list[ModelVersion]:
        """Return the readable versions, oldest first.

        A corrupt version folder is logged as an error and left out, so one broken
        folder does not hide the others; :meth:`get` on it raises RegistryError.
        """
        if not self.root.is_dir():
            return []
        versions: list[ModelVersion] = []
        for folder in self.root.iterdir():
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                versions.append(self._read(folder.name))
            except RegistryError as exc:
                logger.error(
                    "unreadable model version", extra={"version": folder.name, "reason": str(exc)}
                )
        return sorted(versions, key=lambda v: (v.created_at, v.version))

    def load(self, version: str) -> Classifier:
        """Load ``version`` as a Classifier, compiled and ready to predict."""
        found = self.get(version)
        return load_classifier(found.path, found.version, found.metadata)

    def _read_active(self) -> dict[str, Any]:
        path = self.root / ACTIVE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"active": None, "history": [], "log": []}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path} is corrupt: {exc}") from exc
        if not isinstance(state, dict) or not isinstance(state.get("history"), list):
            raise RegistryError(f"{path} is corrupt: expected an object with a history list")
        state.setdefault("log", [])
        return state

    def promote(self, version: str) -> ModelVersion:
        """Make ``version`` the active one (pushed on the history) and return it."""
        with self._locked():
            found = self.get(version)
            state = self._read_active()
            if state.get("active") == version:
                return found
            state["history"].append(version)
            state["active"] = version
            state["log"].append(
                {
                    "action": "promote",
                    "version": version,
                    "at": _now().isoformat(timespec="seconds"),
                }
            )
            _write_json_atomic(self.root / ACTIVE_FILE, state)
        logger.info("model version promoted", extra={"version": version})
        return found

    def active(self) -> ModelVersion | None:
        """Return the active version, ``None`` if none was promoted yet."""
        version = self._read_active().get("active")
        return None if version is None else self.get(str(version))

    def rollback(self) -> ModelVersion:
        """Make the previously active version active again and return it.

        RegistryError when there is no earlier promotion to return to.
        """
        with self._locked():
            state = self._read_active()
            history: list[str] = state["history"]
            if len(history) < 2:
                raise RegistryError("no previously active model version to roll back to")
            previous = self.get(history[-2])
            history.pop()
            state["active"] = previous.version
            state["log"].append(
                {
                    "action": "rollback",
                    "version": previous.version,
                    "at": _now().isoformat(timespec="seconds"),
                }
            )
            _write_json_atomic(self.root / ACTIVE_FILE, state)
        logger.info("model version rolled back", extra={"version": previous.version})
        return previous

    def update_metadata(self, version: str, /, **fields: Any) -> ModelVersion:
        """Merge ``fields`` (e.g. ``metrics=...``) into ``version``'s metadata; return it.

        ``version`` and ``created_at`` cannot change.
        """
        reserved = sorted(_RESERVED_KEYS & fields.keys())
        if reserved:
            raise RegistryError(f"metadata field(s) {reserved} cannot be changed")
        with self._locked():
            found = self.get(version)
            _write_json_atomic(self.root / version / METADATA_FILE, {**found.metadata, **fields})
        return self.get(version)
