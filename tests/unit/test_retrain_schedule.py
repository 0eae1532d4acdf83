"""The refit is on the beat schedule, on its own queue, as configured."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from thyrocad.settings import load_settings
from thyrocad.worker.app import TASK_ROUTES, create_app


def test_retrain_is_scheduled_on_the_training_queue(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path, database_url="", celery_broker_url="", retrain_interval_seconds=900
    )
    app = create_app(settings)
    entry = app.conf.beat_schedule["retrain"]
    assert entry["task"] == "thyrocad.retrain"
    assert entry["schedule"] == timedelta(seconds=900)
    assert TASK_ROUTES["thyrocad.retrain"] == {"queue": "training"}
    assert "thyrocad.retrain" in app.tasks


def test_no_schedule_when_disabled(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path, database_url="", celery_broker_url="", retrain_interval_seconds=0
    )
    assert "retrain" not in create_app(settings).conf.beat_schedule
