"""Acknowledged ⇒ durable: the spool keeps every acknowledged instance through a
database outage and a listener killed with SIGKILL; the reconciler registers them."""

from __future__ import annotations

import os
import signal
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.integration.conftest import cli
from tests.procs import free_port, port_open, stop, thyrocad, wait_for
from thyrocad.pacs.sender import Peer, send_files
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


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_listener_processes_share_the_port(tmp_path: Path, pg_url: str) -> None:
    port, metrics_port = free_port(), free_port()
    env = {
        "THYROCAD_DATA_DIR": str(tmp_path / "data"),
        "THYROCAD_PORT": str(port),
        "THYROCAD_METRICS_PORT": str(metrics_port),
        "THYROCAD_LISTENER_PROCESSES": "2",
        "DATABASE_URL": pg_url,
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    cli("db", "upgrade", env=env)
    studies = write_synthetic_set(tmp_path / "s", 4, seed=63, size=64, id_prefix="SHR")
    peer = Peer("127.0.0.1", port, "THYROCAD")
    listener = thyrocad("serve", env=env, log=tmp_path / "serve.log")
    log = lambda: (tmp_path / "serve.log").read_text()[-3000:]  # noqa: E731
    try:
        wait_for(lambda: port_open(port) and len(_children(listener.pid)) == 2, 60, log)
        # Eight associations at once; the kernel deals them to both processes.
        with ThreadPoolExecutor(8) as pool:
            reports = list(
                pool.map(
                    lambda paths: send_files(paths, peer, "MODALITY1"),
                    [s.paths[:3] for s in studies] + [s.paths[3:] for s in studies],
                )
            )
        assert all(r.ok for r in reports)
        wait_for(lambda: _count(pg_url) == 20, 60, log)

        # The supervising process serves every listener process's counters.
        def received() -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
            for line in text.decode().splitlines():
                if line.startswith('thyrocad_instances_received_total{outcome="accepted"}'):
                    return float(line.split()[-1])
            return -1.0

        wait_for(lambda: received() == 20.0, 30, lambda: f"received {received()}")

        # A listener process that dies is replaced; the port keeps answering.
        first = _children(listener.pid)
        os.kill(first[0], signal.SIGKILL)
        wait_for(
            lambda: (
                len(set(_children(listener.pid)) - set(first)) == 1
                and len(_children(listener.pid)) == 2
            ),
            30,
            log,
        )
        extra = write_synthetic_set(tmp_path / "x", 1, seed=64, size=64, id_prefix="SHX")
        assert send_files(extra[0].paths, peer, "MODALITY1").ok
        wait_for(lambda: _count(pg_url) == 25, 60, log)
        children = _children(listener.pid)
    finally:
        stop(listener)
    # SIGTERM to the supervising process stops its listener processes too.
    assert listener.returncode == 0
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]


def test_listener_processes_stop_when_their_supervisor_dies(tmp_path: Path, pg_url: str) -> None:
    port = free_port()
    env = {
        "THYROCAD_DATA_DIR": str(tmp_path / "data"),
        "THYROCAD_PORT": str(port),
        "THYROCAD_LISTENER_PROCESSES": "2",
        "DATABASE_URL": pg_url,
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    cli("db", "upgrade", env=env)
    listener = thyrocad("serve", env=env, log=tmp_path / "serve.log")
    try:
        wait_for(lambda: port_open(port) and len(_children(listener.pid)) == 2, 60, "2 listeners")
        children = _children(listener.pid)
    finally:
        listener.send_signal(signal.SIGKILL)
        listener.wait()
    # Orphaned, they notice within a second or so and let the port go.
    wait_for(
        lambda: not [pid for pid in children if _alive(pid)] and not port_open(port),
        30,
        lambda: (tmp_path / "serve.log").read_text()[-3000:],
    )


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
