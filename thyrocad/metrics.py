"""Prometheus metrics of every thyrocad process, and the observers that feed them.

The listener's :class:`~pacs.intake.Intake` and the workers' ``WorkerContext``
report events (``observer(event, fields)``); :func:`observe_intake` and
``worker.observer.worker_observer`` turn them into counters and histograms. Gauges
that describe the whole deployment (queue depth, instances by state, the active
model, the spool) are computed when Prometheus scrapes, by the collectors of
:mod:`thyrocad.collectors`; their names are defined here.

This module imports nothing of thyrocad's other packages, so every one may use it.

Label values come from small fixed sets (outcomes, reason classes, task names,
class names, model versions) and pass :func:`safe_label`: never a UID, a
patient name or id.

Celery's prefork pool runs tasks in child processes, so a prefork worker uses
prometheus_client's multiprocess mode: :func:`prepare_multiprocess` must run
before ``prometheus_client`` is first imported (the value class is chosen at
import), which is why this module imports it only inside functions. The solo
and threads pools (and the listener and beat) use the ordinary registry.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.registry import Collector, CollectorRegistry

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Classes of refusal reasons; the free-text reason is stored in the database.
REJECT_REASONS = (
    "not_dicom",
    "missing_uid",
    "invalid_uid",
    "sop_class",
    "no_pixel_data",
    "missing_dimensions",
    "truncated",
    "undecodable",
    "spool_full",
    "spool_error",
    "other",
)
RECEIVE_OUTCOMES = ("accepted", "rejected")
REGISTER_OUTCOMES = ("new", "duplicate", "replaced")
ASSOCIATION_OUTCOMES = ("accepted", "refused")
TRAINING_OUTCOMES = ("promoted", "candidate", "failed", "skipped")
TASKS = (
    "thyrocad.infer",
    "thyrocad.finalise_studies",
    "thyrocad.requeue_stale",
    "thyrocad.retrain",
    "thyrocad.send_report",
)

# A run of dot-separated numbers (1.2.840.10008…) is a UID whatever it labels.
_UID_LIKE = re.compile(r"\d+(?:\.\d+){2,}")
_LABEL_CHARS = re.compile(r"[A-Za-z0-9_:+-][A-Za-z0-9_.:+-]{0,63}")

# First match wins: (class, pattern searched in the lower-cased reason).
_REASON_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (label, re.compile(pattern))
    for label, pattern in (
        ("not_dicom", r"not a (readable )?dicom"),
        ("spool_full", r"spool has less than|no space left"),
        ("invalid_uid", r"unsafe sop instance uid|invalid \w*uid"),
        ("missing_uid", r"missing \w*uid"),
        ("sop_class", r"sop class|not an ultrasound"),
        ("no_pixel_data", r"no pixel data"),
        ("missing_dimensions", r"rows/columns|image size"),
        ("truncated", r"truncated"),
        ("undecodable", r"cannot decode|unsupported|photometric|palette|samples|empty frame"),
        ("spool_error", r"spool"),
    )
)
_STATUS_OUT_OF_RESOURCES = 0xA700


def reason_class(reason: str, status: int | None = None) -> str:
    """Map a free-text refusal reason (and its DIMSE status) to one of :data:`REJECT_REASONS`."""
    text = str(reason or "").lower()
    for label, pattern in _REASON_RULES:
        if pattern.search(text):
            return label
    if status == _STATUS_OUT_OF_RESOURCES:
        return "spool_error"
    return "other"


def safe_label(value: object, allowed: Collection[str] | None = None) -> str:
    """A label value that cannot carry an identifier: ``allowed`` members, else tame tokens.

    Anything outside ``allowed`` (when given), longer than 64 characters, with
    unusual characters, or containing a UID-like run of numbers becomes ``other``.
    """
    text = str(value)
    if allowed is not None:
        return text if text in allowed else "other"
    if not _LABEL_CHARS.fullmatch(text) or _UID_LIKE.search(text):
        return "other"
    return text


# --------------------------------------------------------------------------- set-up


def prepare_multiprocess(base_dir: Path | None = None) -> Path:
    """Switch this process tree to multiprocess metrics, in a fresh folder.

    Call before anything imports ``prometheus_client`` (the prefork worker's
    parent, before the pool forks). Returns the folder; it is removed when
    the process that made it exits.
    """
    existing = os.environ.get(MULTIPROC_ENV)
    if "prometheus_client" in sys.modules and not existing:
        raise RuntimeError("prometheus_client was imported before multiprocess mode was set up")
    if base_dir is not None:
        base_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"thyrocad-metrics-{os.getpid()}-", dir=base_dir))
    os.environ[MULTIPROC_ENV] = str(folder)
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # never from a forked child
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(remove)
    return folder


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def mark_process_dead(pid: int | None = None) -> None:
    """Forget a finished process's live gauges (prefork children call this on exit)."""
    folder = multiprocess_dir()
    if folder:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid(), folder)


class _Metrics:
    """The process's metric objects, made on first use (see the module docstring)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()
        # Listener
        self.received = Counter(
            "thyrocad_instances_received",
            "Instances answered at C-STORE, by outcome (accepted = acknowledged and spooled).",
            ["outcome"],
        )
        self.rejected = Counter(
            "thyrocad_instances_rejected",
            "Instances refused at C-STORE, by reason class.",
            ["reason"],
        )
        self.registered = Counter(
            "thyrocad_instances_registered",
            "Acknowledged instances registered in the database: new, duplicate or replaced.",
            ["outcome"],
        )
        self.received_bytes = Counter(
            "thyrocad_received_bytes", "Bytes of acknowledged instances written to the spool."
        )
        self.associations = Counter(
            "thyrocad_associations", "DICOM associations, by outcome.", ["outcome"]
        )
        # Summed over the listener processes that are alive (THYROCAD_LISTENER_PROCESSES).
        self.associations_open = Gauge(
            "thyrocad_associations_open",
            "DICOM associations established now (not connections still negotiating).",
            multiprocess_mode="livesum",
        )
        # Workers
        self.unreadable = Counter(
            "thyrocad_instances_unreadable",
            "Acknowledged instances the inference worker could not decode, by reason class.",
            ["reason"],
        )
        self.batch_seconds = Histogram(
            "thyrocad_inference_batch_duration_seconds",
            "Forward-pass time of one inference batch.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.batch_size = Histogram(
            "thyrocad_inference_batch_size",
            "Images per inference batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.evidence_seconds = Histogram(
            "thyrocad_evidence_batch_duration_seconds",
            "Grad-CAM time of one inference batch (THYROCAD_EVIDENCE_MAPS), PNGs included.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.evidence_failures = Counter(
            "thyrocad_evidence_failures",
            "Predictions stored without their evidence map because computing it failed.",
        )
        self.predictions = Counter(
            "thyrocad_predictions",
            "Stored image predictions, by predicted class and model version.",
            ["label", "model_version"],
        )
        self.receipt_to_prediction = Histogram(
            "thyrocad_receipt_to_prediction_seconds",
            "From an instance's receipt to its stored prediction.",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
        )
        self.study_results = Counter(
            "thyrocad_study_results", "New study result revisions, by label.", ["label"]
        )
        self.study_latency = Histogram(
            "thyrocad_study_result_latency_seconds",
            "From a study's last received image to its result.",
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
        )
        self.task_failures = Counter(
            "thyrocad_task_failures", "Celery tasks that failed, by task.", ["task"]
        )
        self.task_retries = Counter(
            "thyrocad_task_retries", "Celery task retries, by task.", ["task"]
        )
        self.model_loaded = Gauge(
            "thyrocad_model_loaded",
            "1 for the model version this worker has loaded, 0 for one it unloaded.",
            ["model_version"],
            multiprocess_mode="livemax",
        )
        # The device an inference worker runs its model on (worker.device).
        self.worker_device = Gauge(
            "thyrocad_worker_device_info",
            "1 for the device and Keras backend this worker runs its model on.",
            ["device", "backend"],
            multiprocess_mode="livemax",
        )
        # Training
        self.training_runs = Counter(
            "thyrocad_training_runs", "Training runs, by outcome.", ["outcome"]
        )
        self.training_seconds = Histogram(
            "thyrocad_training_duration_seconds",
            "Duration of training runs, by outcome.",
            ["outcome"],
            buckets=(30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400),
        )
        self.training_last = Gauge(
            "thyrocad_training_last_run_timestamp_seconds",
            "When the last training run of each outcome finished (Unix time).",
            ["outcome"],
            multiprocess_mode="max",
        )
        # Known label values start at 0, so that rate() and increase() see the first event.
        for metric, values in (
            (self.received, RECEIVE_OUTCOMES),
            (self.rejected, REJECT_REASONS),
            (self.unreadable, REJECT_REASONS),
            (self.registered, REGISTER_OUTCOMES),
            (self.associations, ASSOCIATION_OUTCOMES),
            (self.task_failures, TASKS),
            (self.task_retries, TASKS),
            (self.training_runs, TRAINING_OUTCOMES),
        ):
            for value in values:
                metric.labels(value)
        self.loaded_version: str | None = None


_lock = threading.Lock()
_metrics: _Metrics | None = None


def metrics() -> _Metrics:
    """This process's metrics, created on first call."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = _Metrics()
        return _metrics


# --------------------------------------------------------------------------- observers


def observe_intake(event: str, fields: dict[str, object]) -> None:
    """The listener's observer (``start_service(settings, observe_intake)``)."""
    m = metrics()
    if event == "accepted":
        m.received.labels("accepted").inc()
        m.received_bytes.inc(number(fields.get("bytes")))
    elif event == "rejected":
        m.received.labels("rejected").inc()
        status = fields.get("status")
        m.rejected.labels(
            reason_class(str(fields.get("reason", "")), status if isinstance(status, int) else None)
        ).inc()
    elif event == "association":
        m.associations.labels(safe_label(fields.get("outcome"), ASSOCIATION_OUTCOMES)).inc()
    elif event == "registered":
        m.registered.labels(safe_label(fields.get("outcome"), REGISTER_OUTCOMES)).inc()
    elif event == "associations_open":
        m.associations_open.set(number(fields.get("count")))


def observe_training(outcome: str, seconds: float) -> None:
    """Count a finished training run (promoted, candidate, failed or skipped) and its duration."""
    m = metrics()
    label = safe_label(outcome, TRAINING_OUTCOMES)
    m.training_runs.labels(label).inc()
    m.training_seconds.labels(label).observe(max(0.0, float(seconds)))
    m.training_last.labels(label).set(time.time())


def observe_task_failure(task: str) -> None:
    metrics().task_failures.labels(safe_label(task, TASKS)).inc()


def observe_task_retry(task: str) -> None:
    metrics().task_retries.labels(safe_label(task, TASKS)).inc()


def model_loaded(version: str) -> None:
    """Record that this process now serves ``version`` (the previous one reads 0)."""
    m = metrics()
    label = safe_label(version)
    with _lock:
        previous, m.loaded_version = m.loaded_version, label
    if previous is not None and previous != label:
        m.model_loaded.labels(previous).set(0)
    m.model_loaded.labels(label).set(1)


def worker_device(device: str, backend: str) -> None:
    """Record the device (``cpu``, ``gpu:N``) and Keras backend this worker predicts on."""
    metrics().worker_device.labels(safe_label(device), safe_label(backend)).set(1)


def observe_evidence(seconds: float, failed: int) -> None:
    """Record one batch's Grad-CAM time and the predictions it left without a map."""
    m = metrics()
    m.evidence_seconds.observe(max(0.0, float(seconds)))
    if failed:
        m.evidence_failures.inc(failed)


def number(value: object) -> float:
    """A numeric event field as a float; 0 for anything else."""
    return float(value) if isinstance(value, int | float) else 0.0


# --------------------------------------------------------------------------- scrape-time gauges


def _gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, documentation, labels=list(labels) if labels else None)


def spool_families() -> list[Any]:
    """The spool gauges (``thyrocad.collectors.SpoolCollector`` fills them)."""
    return [
        _gauge("thyrocad_spool_free_bytes", "Free bytes on the spool's file system."),
        _gauge("thyrocad_spool_used_bytes", "Bytes of spooled instances."),
        _gauge("thyrocad_spool_files", "Spooled instance files."),
        _gauge(
            "thyrocad_spool_min_free_bytes",
            "Free space below which the listener refuses C-STOREs.",
        ),
    ]


def cluster_families() -> list[Any]:
    """The deployment gauges (``thyrocad.collectors.ClusterCollector`` fills them)."""
    return [
        _gauge("thyrocad_database_up", "1 when the database answered this scrape."),
        _gauge("thyrocad_broker_up", "1 when the broker answered this scrape."),
        _gauge("thyrocad_queue_messages", "Messages waiting per Celery queue.", ["queue"]),
        _gauge("thyrocad_instances", "Instances by processing state.", ["state"]),
        _gauge("thyrocad_active_model_present", "1 when a model version is active."),
        _gauge(
            "thyrocad_active_model_info",
            "The active model version and its architecture (value 1).",
            ["model_version", "architecture"],
        ),
    ]


# --------------------------------------------------------------------------- scraping


class _SweepingCollector:
    """Multiprocess collection that first forgets live gauges of vanished processes.

    A prefork child killed by a signal never runs its shutdown hook; its
    ``livemax`` gauges would otherwise be reported for ever.
    """

    def __init__(self, folder: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self._folder = folder
        self._inner = MultiProcessCollector(None, folder)

    def collect(self) -> Iterable[Any]:
        for path in Path(self._folder).glob("gauge_live*_*.db"):
            try:
                pid = int(path.stem.rsplit("_", 1)[1])
                os.kill(pid, 0)
            except (ValueError, IndexError):
                continue
            except ProcessLookupError:
                mark_process_dead(pid)
            except PermissionError:
                continue
        return self._inner.collect()


def scrape_registry(collectors: Iterable[Collector] = ()) -> CollectorRegistry:
    """The registry a process serves on /metrics: its own metrics (or every pool
    process's, in multiprocess mode) plus ``collectors``."""
    from prometheus_client import REGISTRY, CollectorRegistry

    metrics()
    folder = multiprocess_dir()
    if folder:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(_SweepingCollector(folder))  # type: ignore[arg-type]
    else:
        registry = REGISTRY
    for collector in collectors:
        registry.register(collector)
    return registry


def loaded_versions(registry: CollectorRegistry) -> set[str]:
    """Model versions some process behind ``registry`` has loaded."""
    versions = set()
    for family in registry.collect():
        if family.name == "thyrocad_model_loaded":
            versions |= {s.labels["model_version"] for s in family.samples if s.value > 0}
    return versions


def exported_names() -> set[str]:
    """Every sample name thyrocad can export (with _total, _bucket, _sum, _count)."""
    from prometheus_client.metrics import MetricWrapperBase

    names: set[str] = set()
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gauge": ("",),
        "summary": ("_sum", "_count", ""),
    }
    for value in vars(metrics()).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    families: list[Any] = [
        *spool_families(),
        *cluster_families(),
    ]
    names |= {family.name for family in families}
    return names
