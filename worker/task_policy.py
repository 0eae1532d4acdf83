"""What every task module shares: the transient errors, the retry policy, and queueing
a task by its name.

Task modules (``tasks``, ``archive_tasks``, ``learning_tasks``) import this module and
``worker.context``, never each other: a function that queues another module's task
names it (``publish("thyrocad.infer", ids)``), and ``worker.app.create_app`` imports
every task module, so each name is registered wherever tasks run.
"""

from __future__ import annotations

from typing import Any

from celery import current_app
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import OperationalError as DatabaseError

#: Errors a retry may cure: the database or the broker did not answer.
TRANSIENT = (DatabaseError, BrokerError, ConnectionError)

#: Task options: retry transient errors with exponential backoff, for as long as it takes.
RETRY: dict[str, Any] = {
    "autoretry_for": TRANSIENT,
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "max_retries": None,
}


def publish(task: str, *args: object) -> None:
    """Queue the task named ``task`` with ``args``, routed by ``worker.app.TASK_ROUTES``."""
    current_app.send_task(task, args=list(args))
