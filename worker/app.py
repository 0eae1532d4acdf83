"""The Celery application: queues, routes, reliability settings and the beat schedule.

Built by :func:`create_app` from settings (never at import). Tasks are declared
with ``shared_task`` in :mod:`worker.tasks` and bind to whichever app is current.
"""

from __future__ import annotations

from datetime import timedelta

from celery import Celery
from kombu import Queue
from kombu.exceptions import ChannelError

from thyrocad.settings import Settings

QUEUES = ("inference", "aggregation", "training", "maintenance")

TASK_ROUTES = {
    "thyrocad.infer": {"queue": "inference"},
    "thyrocad.finalise_studies": {"queue": "aggregation"},
    "thyrocad.requeue_stale": {"queue": "maintenance"},
    "thyrocad.retrain": {"queue": "training"},
    "thyrocad.send_report": {"queue": "maintenance"},
    "thyrocad.requeue_reports": {"queue": "maintenance"},
}


def broker_options(settings: Settings) -> dict[str, object]:
    """Transport options; the embedded filesystem broker needs its folders."""
    if settings.broker_url.startswith("filesystem://"):
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.1,
        }
    # Redis re-delivers an unacknowledged task after this long; the stale
    # requeue task recovers sooner from a killed worker.
    return {"visibility_timeout": 3600}


def create_app(settings: Settings) -> Celery:
    """A configured Celery app for these settings, made the current app."""
    app = Celery("thyrocad", broker=settings.broker_url, set_as_current=True)
    if settings.broker_url.startswith("filesystem://"):
        app.conf.broker_transport = "thyrocad.worker.filesystem_broker:Transport"
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="maintenance",
        task_routes=TASK_ROUTES,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A task is acknowledged only after it finished; a killed worker's task
        # is delivered again, which is safe because every task is idempotent.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        beat_schedule={
            "finalise-studies": {
                "task": "thyrocad.finalise_studies",
                "schedule": timedelta(seconds=settings.finalise_interval_seconds),
                "options": {"expires": max(settings.finalise_interval_seconds * 5, 5.0)},
            },
            "requeue-stale": {
                "task": "thyrocad.requeue_stale",
                "schedule": timedelta(seconds=settings.requeue_interval_seconds),
                "options": {"expires": settings.requeue_interval_seconds * 2},
            },
        },
    )
    app.conf.thyrocad_settings = settings
    if settings.sr_destination:
        app.conf.beat_schedule["requeue-reports"] = {
            "task": "thyrocad.requeue_reports",
            "schedule": timedelta(minutes=10),
            "options": {"expires": 600},
        }
    if settings.retrain_interval_seconds > 0:
        # Cheap when there is nothing to do: the task skips until enough new labels exist.
        app.conf.beat_schedule["retrain"] = {
            "task": "thyrocad.retrain",
            "schedule": timedelta(seconds=settings.retrain_interval_seconds),
            "kwargs": {"trigger": "schedule"},
            "options": {"expires": settings.retrain_interval_seconds},
        }
    import thyrocad.worker.archive_tasks  # noqa: F401  (Structured Reports: thyrocad.send_report)
    import thyrocad.worker.learning_tasks  # noqa: F401  (continuous learning: thyrocad.retrain)
    import thyrocad.worker.tasks  # noqa: F401  (registers the shared tasks with this app)

    return app


def queue_depths(app: Celery) -> dict[str, int]:
    """Messages waiting per queue; -1 where the broker cannot tell."""
    depths: dict[str, int] = {}
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        for name in QUEUES:
            try:
                depths[name] = int(channel.queue_declare(name, passive=True).message_count)
            except ChannelError:
                # NOT_FOUND: Redis deletes an empty list, so an empty queue "does not exist".
                depths[name] = 0
            except Exception:
                depths[name] = -1
    return depths
