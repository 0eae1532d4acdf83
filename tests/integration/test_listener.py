"""Acknowledged ⇒ durable: the spool keeps every acknowledged instance through a
database outage and a listener killed with SIGKILL; the reconciler registers them."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import sqlalchemy as sa

from pacs.sender import Peer, send_files
from tests.integration.conftest import cli
from tests.procs import free_port, port_open, stop, thyrocad, wait_for
from thyrocad.synthetic import write_synthetic_set

pytestmark = pytest.mark.integration


def _count(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM instances")).scalar() or 0)
    finally:
        engine.dispose()


def test_database_outage_and_sigkill_lose_nothing(tmp_path: Path, pg_url: str) -> None:
    port = free_port()
    base = {
        "THYROCAD_DATA_DIR": str(tmp_path / "data"),
        "THYROCAD_PORT": str(port),
        # nothing is queued anywhere in this test: a broker that is never reached
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        "THYROCAD_RECONCILE_INTERVAL_SECONDS": "2",
    }
    cli("db", "upgrade", env={**base, "DATABASE_URL": pg_url})
    studies = write_synthetic_set(tmp_path / "s", 2, seed=61, size=64, id_prefix="DUR")
    files = [p for s in studies for p in s.paths]
    peer = Peer("127.0.0.1", port, "THYROCAD")

    # 1. The database is unreachable: the listener still acknowledges (the spool has them).
    down = {**base, "DATABASE_URL": f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/x"}
    listener = thyrocad("serve", env=down, log=tmp_path / "down.log")
    try:
        wait_for(lambda: port_open(port), 60, "the listener")
        assert send_files(files[:5], peer, "MODALITY1").ok
    finally:
        # 2. ... and then it dies without any chance to clean up.
        listener.send_signal(signal.SIGKILL)
        listener.wait()
    spooled = list((tmp_path / "data" / "spool").rglob("*.dcm"))
    assert len(spooled) == 5

    # 3. With the database back, the restarted listener's reconciler registers them.
    up = {**base, "DATABASE_URL": pg_url}
    listener = thyrocad("serve", env=up, log=tmp_path / "up.log")
    try:
        wait_for(lambda: port_open(port), 60, "the listener")
        assert send_files(files[5:], peer, "MODALITY1").ok
        wait_for(
            lambda: _count(pg_url) == len(files),
            60,
            lambda: (
                f"{len(files)} registered, got {_count(pg_url)}:\n"
                + (tmp_path / "up.log").read_text()[-3000:]
            ),
        )
    finally:
        stop(listener)


def test_full_spool_answers_out_of_resources(tmp_path: Path, pg_url: str) -> None:
    port = free_port()
    env = {
        "THYROCAD_DATA_DIR": str(tmp_path / "data"),
        "THYROCAD_PORT": str(port),
        "DATABASE_URL": pg_url,
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        # more free space than any disk has: every write is refused
        "THYROCAD_SPOOL_MIN_FREE_MB": str(2**40),
    }
    cli("db", "upgrade", env=env)
    files = write_synthetic_set(tmp_path / "s", 1, seed=62, size=64)[0].paths
    listener = thyrocad("serve", env=env, log=tmp_path / "full.log")
    try:
        wait_for(lambda: port_open(port), 60, "the listener")
        report = send_files(list(files[:2]), Peer("127.0.0.1", port, "THYROCAD"), "MODALITY1")
        assert len(report.failed) == 2
        assert all(reason.startswith("status 0xA700") for _, reason in report.failed)
        engine = sa.create_engine(pg_url)
        with engine.connect() as conn:
            wait_for(
                lambda: conn.execute(sa.text("SELECT count(*) FROM rejections")).scalar() == 2,
                30,
                "two stored rejections",
            )
            reason = conn.execute(sa.text("SELECT min(reason) FROM rejections")).scalar()
        engine.dispose()
        assert "free" in str(reason)
    finally:
        stop(listener)
