"""Celery tasks of continuous learning (the ``training`` queue).

``thyrocad.retrain`` is safe to deliver twice or to several workers at once:
only one refit runs at a time (see ``worker.learning_store``), the others
return "skipped" with the reason, and a re-delivery after a killed worker
closes the dead run and starts afresh.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from thyrocad.worker.context import get_context
from thyrocad.worker.retraining import refit
from thyrocad.worker.task_policy import RETRY

logger = logging.getLogger(__name__)


@shared_task(name="thyrocad.retrain", **RETRY)
def retrain(force: bool = False, trigger: str = "task") -> dict[str, Any]:
    """Refit on newly labelled studies if there are enough (or ``force``); promote if not worse."""
    ctx = get_context()
    outcome = refit(ctx.settings, ctx.engine, force=force, trigger=trigger)
    logger.info("retrain: %s (%s)", outcome.outcome, outcome.reason)
    return outcome.as_dict()
