"""An idle pipeline is silent: periodic tasks' routine lines are DEBUG, what they did stays."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from thyrocad.logs import QuietWhenIdle


@pytest.fixture
def root_level() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved = root.level
    yield root
    root.setLevel(saved)


def _record(name: str, msg: str, args: object) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, None, None)
    record.args = args  # type: ignore[assignment]  # Celery passes one dict
    return record


BEAT = ("celery.beat", "Scheduler: Sending due task %s (%s)")
RECEIVED = ("celery.worker.strategy", "Task %(name)s[%(id)s] received")
SUCCEEDED = (
    "celery.app.trace",
    "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s",
)


def test_routine_runs_of_periodic_tasks_are_debug(root_level: logging.Logger) -> None:
    quiet = QuietWhenIdle()
    root_level.setLevel(logging.INFO)
    task = {"name": "thyrocad.finalise_studies", "id": "x", "runtime": 0.01}
    assert not quiet.filter(_record(*BEAT, ("finalise-studies", "thyrocad.finalise_studies")))
    assert not quiet.filter(_record(*RECEIVED, task))
    assert not quiet.filter(_record(*SUCCEEDED, {**task, "return_value": "0"}))
    did_something = _record(*SUCCEEDED, {**task, "return_value": "3"})
    assert quiet.filter(did_something) and did_something.levelname == "INFO"
    inference = _record(*RECEIVED, {"name": "thyrocad.infer", "id": "y"})
    assert quiet.filter(inference) and inference.levelname == "INFO"
    root_level.setLevel(logging.DEBUG)
    shown = _record(*RECEIVED, task)
    assert quiet.filter(shown) and shown.levelname == "DEBUG"
