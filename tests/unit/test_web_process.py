"""The web page as a process of the embedded pipeline."""

from __future__ import annotations

import logging
import signal
import sys

import pytest

from thyrocad.embedded import Supervisor, process_commands, settings_env
from thyrocad.settings import load_settings


def test_the_embedded_pipeline_runs_the_web_page_last() -> None:
    commands = process_commands()
    assert list(commands)[-1] == "web"
    assert commands["web"][-1] == "web"
    # The other processes keep the metrics ports they had (THYROCAD_METRICS_PORT + index).
    assert list(commands)[:4] == ["listener", "inference", "control", "beat"]


def test_children_get_the_web_address(tmp_path) -> None:
    env = settings_env(load_settings(data_dir=tmp_path, web_host="0.0.0.0", web_port=8181))
    assert env["THYROCAD_WEB_HOST"] == "0.0.0.0" and env["THYROCAD_WEB_PORT"] == "8181"


def test_a_web_page_that_cannot_start_does_not_stop_the_pipeline(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="thyrocad.embedded")
    supervisor = Supervisor(
        load_settings(data_dir=tmp_path),
        commands={
            "listener": [sys.executable, "-c", "import time; time.sleep(60)"],
            "web": [sys.executable, "-c", "import sys; sys.exit(1)"],
        },
        max_restarts=2,
    )

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(4)
    try:
        supervisor.start()
        assert supervisor.wait() == 0  # ended by the alarm (Ctrl-C), not by the web page
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert "web" not in supervisor.processes
    assert "web keeps exiting; the pipeline goes on without it" in caplog.text
    assert supervisor.processes["listener"].returncode is not None  # stopped by wait()
    assert "stopping the pipeline" not in caplog.text
