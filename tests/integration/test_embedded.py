"""The embedded default (SQLite + the serverless filesystem broker) passes the same end to end.

``thyrocad serve --embedded`` runs listener, workers and beat as local processes;
Ctrl-C stops them all.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.integration.conftest import cli
from tests.procs import free_port, port_open, thyrocad, wait_for
from thyrocad.pacs.sender import Peer, send_files
from thyrocad.synthetic import write_synthetic_set

pytestmark = pytest.mark.integration


def child_pid(parent: int, marker: str) -> int | None:
    """The pid of the child of ``parent`` whose command line contains ``marker``."""
    found = subprocess.run(
        ["pgrep", "-P", str(parent), "-f", marker], capture_output=True, text=True
    )
    pids = [int(p) for p in found.stdout.split()]
    return pids[0] if pids else None


def test_embedded_default_end_to_end(tmp_path: Path, tiny_model: tuple[Path, str]) -> None:
    registry, version = tiny_model
    port = free_port()
    env = {
        "THYROCAD_DATA_DIR": str(tmp_path / "data"),
        "THYROCAD_PORT": str(port),
        "THYROCAD_STUDY_IDLE_SECONDS": "1",
        "DATABASE_URL": "",
        "CELERY_BROKER_URL": "",
        # a killed worker's claims are taken over quickly
        "THYROCAD_CLAIM_LEASE_SECONDS": "5",
        "THYROCAD_REQUEUE_INTERVAL_SECONDS": "2",
        "THYROCAD_REQUEUE_STALE_SECONDS": "3",
    }
    cli("models", "promote", version, "--registry", str(registry), env=env)
    proc = thyrocad("serve", "--embedded", env=env, log=tmp_path / "embedded.log")
    try:
        wait_for(lambda: port_open(port), 60, "the embedded listener")
        studies = write_synthetic_set(tmp_path / "studies", 3, seed=51, size=64, id_prefix="EMB")
        files = [path for p in studies for path in p.paths]
        assert send_files(files[:10], Peer("127.0.0.1", port, "THYROCAD"), "MODALITY1").ok
        # A worker dying mid-way is restarted by the supervisor; nothing is lost.
        inference = child_pid(proc.pid, "queues inference")
        os.kill(inference, signal.SIGKILL)
        wait_for(
            lambda: child_pid(proc.pid, "queues inference") not in (None, inference),
            30,
            "the supervisor to restart the inference worker",
        )
        storescu = shutil.which("storescu", path="/usr/bin")
        assert storescu, "dcmtk is required (deploy/setup.sh installs it)"
        sent = subprocess.run(
            [storescu, "-aec", "THYROCAD", "127.0.0.1", str(port), *map(str, files[10:])],
            capture_output=True,
            text=True,
        )
        assert sent.returncode == 0, sent.stderr
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'thyrocad.sqlite'}")

        def count(sql: str) -> int:
            with engine.connect() as conn:
                return int(conn.execute(sa.text(sql)).scalar() or 0)

        wait_for(
            lambda: count("SELECT count(*) FROM study_results_latest") == 3,
            120,
            lambda: f"3 study results; log:\n{(tmp_path / 'embedded.log').read_text()[-4000:]}",
        )
        assert count("SELECT count(*) FROM instances WHERE state = 'predicted'") == len(files)
        assert count("SELECT count(*) FROM patient_results_latest") == 3
        engine.dispose()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0
    assert not port_open(port), "Ctrl-C must stop the listener with the rest"
