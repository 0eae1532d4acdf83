"""Logging for every thyrocad process: one line per event, optionally JSON.

Context travels in ``extra=`` (UIDs, counts, versions); patient names and ids
are never logged, and a filter drops such keys if a caller passes them anyway.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

# Keys that could carry patient identity: never written, whoever passes them.
_PHI_KEYS = {"patient_name", "patient_id", "patient_key", "patient_birth_date", "PatientName"}
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and k not in _PHI_KEYS}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = _context(record)
        if ctx:
            line += " " + " ".join(f"{k}={v}" for k, v in ctx.items())
        return line


#: Scheduled tasks that run every second or minute: their routine lines are DEBUG.
PERIODIC_TASKS = frozenset(
    {
        "thyrocad.finalise_studies",
        "thyrocad.requeue_stale",
        "thyrocad.requeue_reports",
        "thyrocad.retrain",
    }
)


class QuietWhenIdle(logging.Filter):
    """Demotes what Celery logs at INFO for each run of a periodic task (beat's "Sending
    due task", the worker's "received" and "succeeded") to DEBUG, unless the task did
    something (returned a count other than 0). What an operator acts on stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not self._routine(record):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)

    @staticmethod
    def _routine(record: logging.LogRecord) -> bool:
        args = record.args
        if record.name == "celery.beat" and isinstance(args, tuple) and len(args) == 2:
            return str(args[1]) in PERIODIC_TASKS  # (entry name, task name)
        if record.name in ("celery.worker.strategy", "celery.app.trace") and isinstance(args, dict):
            if args.get("name") not in PERIODIC_TASKS:
                return False
            return str(args.get("return_value", "0")) in ("0", "None", "False")
        return False


def configure_logging(
    level: str = "INFO", json_lines: bool = False, *, local_broker: bool = False
) -> None:
    """Route all logs to stderr in text or JSON lines.

    ``local_broker``: the embedded, one-machine setup, where Celery's warnings about
    a missing broker hostname and a worker run by root say nothing to act on.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(QuietWhenIdle())
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library warnings (Celery's, TensorFlow's) become log records too: one line each.
    logging.captureWarnings(True)
    # pynetdicom logs every PDU at INFO: too chatty for an always-on service.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if local_broker:
        import warnings

        warnings.filterwarnings("ignore", message="You're running the worker with superuser")
        handler.addFilter(_no_broker_hostname_warning)


def _no_broker_hostname_warning(record: logging.LogRecord) -> bool:
    # The filesystem transport has no host; kombu warns that it "reverts to localhost".
    return not (record.name == "kombu.connection" and "No hostname was supplied" in str(record.msg))


@contextlib.contextmanager
def native_output_logged(logger: logging.Logger, level: int = logging.INFO) -> Iterator[None]:
    """While the block runs, what native code writes to file descriptor 2 becomes log
    records of ``logger``, one per line.

    TensorFlow prints to the raw stderr when it is imported, before anything can set up
    its logging (TF_CPP_MIN_LOG_LEVEL does not silence "oneDNN custom operations are
    on"); with JSON logs that would break one JSON object per line.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    logger.log(level, "%s", line.strip())


#: Native libraries that print start-up notes to the raw stderr when first imported
#: (TensorFlow 2.21's absl "log messages before absl::InitializeLog()" and "oneDNN
#: custom operations are on", which TF_CPP_MIN_LOG_LEVEL no longer silences).
NOISY_NATIVE_IMPORTS: tuple[str, ...] = ("tensorflow",)


class _QuietImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports each of ``names`` the first time it is asked for with what it writes to
    fd 2 turned into DEBUG records of the ``tensorflow`` logger, then steps aside.

    The real import runs inside :meth:`find_spec` (by the other finders); the import
    system then "loads" the finished module through this loader, which hands it over
    and puts back its own spec."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = set(names)
        self.specs: dict[str, Any] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.names:
            return None
        self.names.discard(fullname)
        if not self.names and self in sys.meta_path:
            sys.meta_path.remove(self)
        with native_output_logged(logging.getLogger("tensorflow"), logging.DEBUG):
            module = importlib.import_module(fullname)
        self.specs[fullname] = module.__spec__
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return sys.modules[spec.name]

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.specs.pop(module.__name__)


def quiet_native_imports(names: Sequence[str] = NOISY_NATIVE_IMPORTS) -> None:
    """From now on, the first import of each of ``names`` keeps its native start-up
    notes off the terminal (at DEBUG in the log instead): a command's output stays its
    own, and an error stays one line. Modules already imported are left alone."""
    pending = [name for name in names if name not in sys.modules]
    if pending and not any(isinstance(f, _QuietImporter) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImporter(pending))
