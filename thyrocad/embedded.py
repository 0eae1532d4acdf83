"""Run the whole pipeline on one machine as local processes, stopped together.

listener · inference worker · control worker (aggregation, maintenance,
training) · beat · web page. Child processes read the same settings from the
environment.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from thyrocad.settings import Settings

logger = logging.getLogger(__name__)


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that reproduce ``settings`` in a child process."""
    env = {
        "THYROCAD_DATA_DIR": str(settings.data_dir.resolve()),
        "THYROCAD_AE_TITLE": settings.ae_title,
        "THYROCAD_HOST": settings.host,
        "THYROCAD_PORT": str(settings.port),
        "THYROCAD_ALLOWED_AETS": ",".join(settings.allowed_aets),
        "THYROCAD_STUDY_IDLE_SECONDS": str(settings.study_idle_seconds),
        "THYROCAD_CLASSES": ",".join(settings.classes),
        "THYROCAD_POSITIVE_CLASS": settings.positive_class,
        "THYROCAD_BATCH_MAX": str(settings.batch_max),
        "THYROCAD_BATCH_WAIT_SECONDS": str(settings.batch_wait_seconds),
        "THYROCAD_CLAIM_LEASE_SECONDS": str(settings.claim_lease_seconds),
        "THYROCAD_FRAME_POLICY": settings.frame_policy,
        "THYROCAD_METRICS_PORT": str(settings.metrics_port),
        "THYROCAD_LOG_JSON": "1" if settings.log_json else "0",
        "THYROCAD_LOG_LEVEL": settings.log_level,
        "THYROCAD_WEB_HOST": settings.web_host,
        "THYROCAD_WEB_PORT": str(settings.web_port),
        "DATABASE_URL": settings.db_url,
        "CELERY_BROKER_URL": settings.broker_url,
    }
    return env


def cli_command() -> list[str]:
    """How a child process runs the thyrocad CLI with this interpreter."""
    return [sys.executable, "-m", "thyrocad"]


def process_commands() -> dict[str, list[str]]:
    """The command line of each embedded process (no Celery banners: one terminal shows
    them all, and the pipeline's own start-up lines say what runs)."""
    cli = cli_command()
    return {
        "listener": [*cli, "serve"],
        "inference": [
            *cli,
            "worker",
            "--queues",
            "inference",
            "--pool",
            "solo",
            "--name",
            "inference",
            "--no-banner",
        ],
        "control": [
            *cli,
            "worker",
            "--queues",
            "aggregation,maintenance,training",
            "--pool",
            "threads",
            "--concurrency",
            "2",
            "--name",
            "control",
            "--no-banner",
        ],
        "beat": [*cli, "beat", "--no-banner"],
        # Last: the others keep their metrics ports (THYROCAD_METRICS_PORT + position);
        # the web page serves its /metrics on its own port.
        "web": [*cli, "web"],
    }


@dataclass
class Supervisor:
    """Starts processes (the embedded pipeline's unless ``commands`` is given), restarts
    one that dies, stops them all on Ctrl-C or SIGTERM.

    A process that keeps dying (``max_restarts`` within ``restart_window`` seconds)
    stops them all: something is wrong that a restart will not mend. Only an
    ``optional`` one (the web page) is given up on alone: a page that cannot start
    (its port taken, say) must not stop the DICOM pipeline.
    """

    settings: Settings
    commands: Mapping[str, list[str]] = field(default_factory=process_commands)
    # Each process serves metrics on its own port (the settings' port + its position);
    # False when the supervising process serves theirs (multiprocess metrics).
    own_metrics_port: bool = True
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # When set, each process writes to <log_dir>/<name>.log instead of the terminal.
    log_dir: Path | None = None
    max_restarts: int = 5
    restart_window: float = 60.0
    optional: frozenset[str] = frozenset({"web"})
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: dict[str, list[float]] = field(default_factory=dict)

    def _env(self, offset: int) -> dict[str, str]:
        env = {**os.environ, **settings_env(self.settings), **self.extra_env}
        # Each process would otherwise bind the same metrics port.
        if self.settings.metrics_port and self.own_metrics_port:
            env["THYROCAD_METRICS_PORT"] = str(self.settings.metrics_port + offset)
        return env

    def _launch(self, name: str) -> None:
        commands = self.commands
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        self.processes[name] = subprocess.Popen(
            commands[name],
            env=self._env(list(commands).index(name)),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
        )
        logger.info("started %s", name, extra={"pid": self.processes[name].pid})

    def start(self) -> None:
        for name in self.commands:
            self._launch(name)

    def poll(self) -> str | None:
        """The name of a process that has exited, if any."""
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                return name
        return None

    def restart(self, name: str) -> bool:
        """Start ``name`` again; False when it died too often to keep trying."""
        now = time.monotonic()
        recent = [t for t in self.restarts.get(name, []) if now - t < self.restart_window]
        if len(recent) >= self.max_restarts:
            return False
        self.restarts[name] = [*recent, now]
        logger.error("%s exited with %s; restarting it", name, self.processes[name].returncode)
        self._launch(name)
        return True

    def wait(self) -> int:
        """Block until Ctrl-C or SIGTERM (0) or a process that keeps dying (1); then stop
        everything."""

        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
        try:
            while True:
                ended = self.poll()
                if ended is not None and not self.restart(ended):
                    if ended in self.optional:
                        logger.error("%s keeps exiting; the pipeline goes on without it", ended)
                        del self.processes[ended]
                        continue
                    logger.error("%s keeps exiting; stopping the pipeline", ended)
                    return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            return 0
        finally:
            self.stop()

    def stop(self, timeout: float = 15.0) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
