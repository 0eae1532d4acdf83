"""Logging for every thyrocad process: one line per event, optionally JSON.

Context travels in ``extra=`` (UIDs, counts, versions); patient names and ids
are never logged, and a filter drops such keys if a caller passes them anyway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
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


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Route all logs to stderr in text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
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


@contextlib.contextmanager
def native_output_logged(logger: logging.Logger) -> Iterator[None]:
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
                    logger.info("%s", line.strip())
