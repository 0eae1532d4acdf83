"""The listener process: SCP + intake + spool reconciler, wired from settings."""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from thyrocad import metrics
from thyrocad.db.engine import make_engine, make_session_factory
from thyrocad.errors import PortInUse
from thyrocad.pacs.intake import Intake, Observer, reconcile_spool
from thyrocad.pacs.listener import ListenerConfig, start_listener
from thyrocad.pacs.spool import Spool
from thyrocad.pacs.tls import TlsConfig, server_context
from thyrocad.settings import Settings
from thyrocad.worker.app import create_app

logger = logging.getLogger(__name__)

# Periodic reconciliation re-reads files written this long before its previous pass.
RECONCILE_MARGIN_SECONDS = 10.0
#: The file in the spool's root whose modification time is the spool's clock.
CLOCK_FILE = ".reconcile-clock"


def check_ports_free(settings: Settings, *, embedded: bool = False) -> None:
    """PortInUse, naming the setting to change, when a port this serve will listen on is
    taken (another thyrocad, a storescp); checked before anything starts."""
    ports = [(settings.port, "--port / THYROCAD_PORT")]
    if settings.metrics_port:
        # Embedded: each process serves its metrics on the next port (see Supervisor).
        count = 4 if embedded else 1
        ports += [(settings.metrics_port + i, "THYROCAD_METRICS_PORT") for i in range(count)]
    for port, setting in ports:
        host = settings.metrics_host if setting.startswith("THYROCAD_M") else settings.host
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(
                        f"port {port} on {host} is already in use by another process: stop "
                        f"it, or choose another port with {setting}"
                    ) from exc
                if exc.errno == errno.EACCES:
                    raise PortInUse(
                        f"not allowed to listen on port {port} (ports below 1024 need root): "
                        f"choose another with {setting}"
                    ) from exc
                raise


def listener_spool(settings: Settings) -> Spool:
    """The spool instances are received into, named by its absolute path.

    Workers read each instance at the path recorded here, on their own machine and from
    their own working directory: a relative ``THYROCAD_DATA_DIR`` (the default,
    ``./thyrocad-data``) would record paths that mean something only where the listener
    runs. Symbolic links are kept, so the path is the one other machines mount.
    """
    return Spool(settings.spool_dir.absolute(), settings.spool_min_free_mb * 2**20)


def publisher(app: Celery) -> Callable[[list[int]], None]:
    """Publish an inference task for instance ids; fail fast when the broker is down."""

    def publish(instance_ids: list[int]) -> None:
        app.send_task(
            "thyrocad.infer",
            args=[instance_ids],
            queue="inference",
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0.2, "interval_step": 0.2},
        )

    return publish


@dataclass
class ListenerService:
    """A running listener; :meth:`stop` shuts it down cleanly."""

    settings: Settings
    spool: Spool
    sessions: sessionmaker[Session]
    intake: Intake
    publish: Callable[[list[int]], None]
    servers: list[Any]  # the listening port, and a plaintext one beside TLS if opened
    _stop: threading.Event
    _reconciler: threading.Thread

    def stop(self) -> None:
        self._stop.set()
        for server in self.servers:
            server.shutdown()
        self.intake.stop()
        if self._reconciler.is_alive():  # only the first of several listeners runs one
            self._reconciler.join(5)

    def reconcile_now(self) -> int:
        """Register whatever the spool holds that the database does not know."""
        return reconcile_spool(self.spool, self.sessions, self.publish)


def start_service(
    settings: Settings, observer: Observer | None = None, *, index: int | None = None
) -> ListenerService:
    """Start intake, listener and the periodic spool reconciler in this process.

    ``index`` marks one of several listener processes sharing the port
    (:func:`run_listener_processes`); only the first reconciles the spool.
    """
    sessions = make_session_factory(make_engine(settings.db_url))
    app = create_app(settings)
    publish = publisher(app)
    spool = listener_spool(settings)
    kwargs = {"observer": observer} if observer else {}
    intake = Intake(sessions, publish, **kwargs)  # type: ignore[arg-type]
    intake.start()
    stop = threading.Event()

    reconciler = threading.Thread(
        target=reconcile_forever,
        args=(spool, sessions, publish, settings.reconcile_interval_seconds, stop),
        name="thyrocad-reconcile",
        daemon=True,
    )
    if not index:
        reconciler.start()
    config = ListenerConfig(
        ae_title=settings.ae_title,
        host=settings.host,
        port=settings.port,
        allowed_aets=tuple(settings.allowed_aets),
        max_associations=settings.max_associations,
        max_pdu_size=settings.max_pdu_size,
        acse_timeout=settings.acse_timeout_seconds,
        network_timeout=settings.network_timeout_seconds,
        require_called_aet=settings.require_called_aet,
        share_port=index is not None,
        tls=listener_tls(settings),
    )
    servers = [start_listener(config, spool, intake)]
    if config.tls is not None and settings.tls_also_plain_port:
        # Opened on purpose: a modality that cannot do TLS, on a port of its own.
        plain = replace(config, port=settings.tls_also_plain_port, tls=None)
        servers.append(start_listener(plain, spool, intake))
    if observer is not None:
        threading.Thread(
            target=_count_associations,
            args=(servers, observer, stop),
            name="thyrocad-associations",
            daemon=True,
        ).start()
    return ListenerService(settings, spool, sessions, intake, publish, servers, stop, reconciler)


def spool_clock(spool: Spool) -> float:
    """Now, on the clock that stamps the spool's files (seconds since the epoch).

    On shared storage (NFS) the file server sets modification times, by its own clock,
    which may be minutes off this host's; the reconciler compares those times with the
    start of its previous pass, so it takes that start from the same clock: the
    modification time of a file it touches in the spool (``Spool.entries`` skips it).
    """
    probe = spool.root / CLOCK_FILE
    try:
        probe.touch()
        return probe.stat().st_mtime
    except OSError:  # the pass itself will say what is wrong with the spool
        return time.time()


def reconcile_forever(
    spool: Spool,
    sessions: sessionmaker[Session],
    publish: Callable[[list[int]], None],
    interval: float,
    stop: threading.Event,
) -> None:
    """Register what the spool holds and the database does not, every ``interval`` s."""
    since: float | None = None  # the first pass, at start-up, reads every file
    clock_offset = spool_clock(spool) - time.monotonic()
    while True:
        started = spool_clock(spool)
        if started - time.monotonic() < clock_offset - 1.0:
            since = None  # the spool's clock went back: modification times mislead
        clock_offset = started - time.monotonic()
        try:
            reconcile_spool(spool, sessions, publish, modified_since=since)
            # Every file written before this pass began is now registered with its
            # bytes; the margin covers a file written just before the pass and
            # renamed into place after its folder was listed.
            since = started - RECONCILE_MARGIN_SECONDS
        except Exception:
            logger.exception("spool reconciliation failed; retrying later")
        if stop.wait(interval):
            return


def listener_tls(settings: Settings) -> ssl.SSLContext | None:
    """The listener's TLS context when THYROCAD_TLS_CERT and _KEY are set."""
    if settings.tls_cert is None:
        return None
    return server_context(TlsConfig(*settings.tls_files))


def open_associations(servers: list[Any]) -> int:
    """The established associations of these servers: a connection still before its
    A-ASSOCIATE-RQ (or one being refused) has an association thread but is not one."""
    return sum(
        1 for server in servers for assoc in server.active_associations if assoc.is_established
    )


def _count_associations(servers: list[Any], observer: Observer, stop: threading.Event) -> None:
    """Report the open associations every second (a gauge each listener process sets)."""
    while not stop.wait(1.0):
        observer("associations_open", {"count": open_associations(servers)})


def run_listener_processes(settings: Settings) -> int:
    """``THYROCAD_LISTENER_PROCESSES`` > 1: that many listener processes share the port,
    restarted when one dies; this process serves their metrics and health.

    pynetdicom decodes PDUs in Python under one interpreter lock per process, so one
    listener process uses about one core however many associations are open.
    """
    from thyrocad.embedded import Supervisor, cli_command
    from thyrocad.health import listener_collectors, start_health_server

    if settings.metrics_port:
        # Before prometheus_client is imported; the children inherit the folder.
        metrics.prepare_multiprocess(settings.metrics_multiproc_dir)
    commands = {
        f"listener-{i}": [
            *cli_command(),
            "serve",
            f"--listener-index={i}",
            f"--supervisor-pid={os.getpid()}",
        ]
        for i in range(settings.listener_processes)
    }
    supervisor = Supervisor(settings, commands=commands, own_metrics_port=False)
    supervisor.start()
    spool = listener_spool(settings)
    health = start_health_server(settings, "listener", listener_collectors(settings, spool))
    try:
        return supervisor.wait()
    finally:
        if health is not None:
            health.stop()
