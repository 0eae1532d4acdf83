"""/metrics, /healthz and /readyz of every long-running thyrocad process.

One small HTTP server per process on ``THYROCAD_METRICS_PORT`` (0 disables it):

* ``/metrics`` — Prometheus text format (see :mod:`thyrocad.metrics`);
* ``/healthz`` — 200 while the process runs (liveness);
* ``/readyz`` — 200 when the process can do its work, else 503, with a JSON body
  naming each check. The checks depend on the role:

  ========== ========= ======= ======================= =====================
  role       database  broker  spool                   active model
  ========== ========= ======= ======================= =====================
  listener   yes       yes     writable, ≥ min free    present
  inference  yes       yes     readable                present and loaded
  worker     yes       yes     —                       present
  beat       yes       yes     —                       —
  ========== ========= ======= ======================= =====================

A listener whose database or broker is down still acknowledges instances
(the spool holds them); it reports unready so that operators see it, not so
that traffic is taken away from it. A worker's ``/readyz`` also names its
device (``"device": {"name": "gpu:0", "backend": "jax", ...}``), as the
``thyrocad_worker_device_info`` metric does.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thyrocad import metrics
from thyrocad.collectors import ClusterCollector, SpoolCollector, probe_app, probe_engine
from thyrocad.errors import PortInUse
from thyrocad.settings import Settings

if TYPE_CHECKING:
    from prometheus_client.registry import Collector, CollectorRegistry

    from thyrocad.worker.device import DeviceReport

logger = logging.getLogger(__name__)

ROLES = ("listener", "inference", "worker", "beat")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


class Readiness:
    """The readiness checks of one process role, each answering within seconds."""

    def __init__(
        self,
        settings: Settings,
        role: str,
        loaded_versions: Callable[[], set[str]] | None = None,
        device: DeviceReport | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; one of {ROLES}")
        from thyrocad.db.engine import make_session_factory

        self.settings = settings
        self.role = role
        self._engine = probe_engine(settings.db_url)
        self._sessions = make_session_factory(self._engine)
        self._app = probe_app(settings)
        self._loaded_versions = loaded_versions or (lambda: set())
        self.device = device  # a worker's; shown as it is, not a check
        self._failures: dict[str, str] = {}

    def _log_failure(self, check: str, exc: BaseException | None) -> None:
        """Log why a check fails, once per change: /readyz answers anyone who can reach
        it, so the addresses in the reason go to the log only (psycopg and redis never
        put a password in their messages)."""
        reason = _short(exc) if exc is not None else ""
        if self._failures.get(check, "") == reason:
            return
        self._failures[check] = reason
        if reason:
            logger.warning("readiness: %s unreachable", check, extra={"reason": reason})
        else:
            logger.info("readiness: %s reachable again", check)

    def database(self) -> Check:
        from sqlalchemy import text

        try:
            with self._engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            self._log_failure("database", exc)
            return Check("database", False, "unreachable")
        self._log_failure("database", None)
        return Check("database", True)

    def broker(self) -> Check:
        if self.settings.broker_url.startswith("filesystem://"):
            folder = self.settings.broker_dir / "queue"
            ok = folder.is_dir() and os.access(folder, os.W_OK)
            return Check("broker", ok, "" if ok else f"{folder} is not a writable folder")
        try:
            with self._app.connection_for_read() as conn:
                conn.default_channel  # noqa: B018 - connects (and fails fast) on access
        except Exception as exc:
            self._log_failure("broker", exc)
            return Check("broker", False, "unreachable")
        self._log_failure("broker", None)
        return Check("broker", True)

    def spool(self, writable: bool) -> Check:
        root = self.settings.spool_dir
        if not root.is_dir():
            return Check("spool", False, f"{root} does not exist")
        if not writable:
            ok = os.access(root, os.R_OK | os.X_OK)
            return Check("spool", ok, "" if ok else f"{root} is not readable")
        try:
            with tempfile.NamedTemporaryFile(dir=root, prefix=".ready-"):
                pass
            free = os.statvfs(root)
        except OSError as exc:
            return Check("spool", False, f"{root} is not writable: {exc.strerror or exc}")
        free_mb = free.f_bavail * free.f_frsize // 2**20
        if free_mb < self.settings.spool_min_free_mb:
            return Check(
                "spool",
                False,
                f"{free_mb} MiB free, below THYROCAD_SPOOL_MIN_FREE_MB="
                f"{self.settings.spool_min_free_mb}",
            )
        return Check("spool", True, f"{free_mb} MiB free")

    def model(self, loaded: bool) -> Check:
        from thyrocad.db import repository

        try:
            with self._sessions() as session:
                active = repository.active_model(session)
        except Exception:  # the database check logs why
            return Check("model", False, "database unreachable")
        if active is None:
            return Check("model", False, "no active model version")
        if not loaded:
            return Check("model", True, active.version)
        if not Path(active.artifact_path).exists():
            return Check("model", False, f"artifact of {active.version} not found on this host")
        if active.version not in self._loaded_versions():
            return Check("model", False, f"{active.version} is not loaded yet")
        return Check("model", True, f"{active.version} loaded")

    def run(self) -> list[Check]:
        checks = [self.database(), self.broker()]
        if self.role == "listener":
            checks.append(self.spool(writable=True))
        elif self.role == "inference":
            checks.append(self.spool(writable=False))
        if self.role != "beat":
            checks.append(self.model(loaded=self.role == "inference"))
        return checks


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class HealthServer:
    """A threaded HTTP server for /metrics, /healthz and /readyz."""

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, readiness: Readiness
    ) -> None:
        self.registry = registry
        self.readiness = readiness
        handler = _handler(self)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="thyrocad-health", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        logger.info(
            "metrics and health endpoints up",
            extra={"metrics_port": self.port, "role": self.readiness.role},
        )
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def ready(self) -> tuple[bool, list[Check]]:
        checks = self.readiness.run()
        return all(c.ok for c in checks), checks


def _handler(server: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._json(200, {"status": "alive", "role": server.readiness.role})
            elif path == "/readyz":
                ok, checks = server.ready()
                body = {
                    "ready": ok,
                    "role": server.readiness.role,
                    "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
                }
                if server.readiness.device is not None:
                    body["device"] = server.readiness.device.as_dict()
                self._json(200 if ok else 503, body)
            else:
                self._json(404, {"error": "not found"})

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return None  # scrapes every few seconds: not worth a log line each

    return Handler


def start_health_server(
    settings: Settings,
    role: str,
    collectors: Iterable[Collector] = (),
    device: DeviceReport | None = None,
) -> HealthServer | None:
    """Serve metrics and health for this process; None when THYROCAD_METRICS_PORT is 0."""
    if not settings.metrics_port:
        return None
    registry = metrics.scrape_registry(collectors)
    if device is not None:
        metrics.worker_device(device.device, device.backend)
    readiness = Readiness(settings, role, lambda: metrics.loaded_versions(registry), device)
    try:
        server = HealthServer(settings.metrics_host, settings.metrics_port, registry, readiness)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise PortInUse(
            f"port {settings.metrics_port} on {settings.metrics_host} is already in use: stop "
            "the other process, or choose another port with THYROCAD_METRICS_PORT"
        ) from exc
    return server.start()


def listener_collectors(settings: Settings, spool: Any) -> list[Collector]:
    """Collectors of the listener: the spool and the deployment (scraped once for all
    listener processes)."""
    return [
        SpoolCollector(spool, settings.spool_min_free_mb * 2**20),  # type: ignore[list-item]
        ClusterCollector(settings),  # type: ignore[list-item]
    ]


def start_worker_health(
    settings: Settings,
    queues: Sequence[str],
    pool: str,
    device: DeviceReport | None = None,
) -> HealthServer | None:
    """Metrics and health of a Celery worker, before ``worker_main``.

    Call before the app is created: a prefork pool needs multiprocess mode set
    up before ``prometheus_client`` is imported. Installs the worker observer,
    the task failure/retry signals, and (in processes that predict) a thread
    that keeps the active model loaded. ``device`` (what the worker command's
    probe found) goes into ``/readyz`` and ``thyrocad_worker_device_info``.
    """
    if not settings.metrics_port:
        return None
    prefork = pool == "prefork"
    if prefork:
        metrics.prepare_multiprocess(settings.metrics_multiproc_dir)
    from thyrocad.worker import signals

    inference = "inference" in queues
    signals.install(watch_model=inference, prefork=prefork)
    return start_health_server(settings, "inference" if inference else "worker", device=device)


def start_beat_health(settings: Settings) -> HealthServer | None:
    """Metrics (deployment-wide gauges) and health of the beat scheduler."""
    return start_health_server(settings, "beat", [ClusterCollector(settings)])  # type: ignore[list-item]
