"""The migrations and the repository on a temporary SQLite file (the embedded default)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tests.db_fixtures import (
    RepositoryContract,
    fresh_sqlite_url,
    instance_rec,
    register_all,
)
from thyrocad.db import repository as repo
from thyrocad.db.engine import SQLITE_BUSY_TIMEOUT_MS, is_sqlite
from thyrocad.db.errors import UnsupportedDatabase
from thyrocad.db.roles import create_readonly_role


class TestSqliteRepository(RepositoryContract):
    """Everything the repository promises, on SQLite."""

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:  # type: ignore[override]
        return fresh_sqlite_url(tmp_path)

    def test_connections_use_wal_foreign_keys_and_a_busy_timeout(self, engine: Engine) -> None:
        with engine.connect() as connection:
            pragma = connection.exec_driver_sql
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA foreign_keys").scalar() == 1
            assert pragma("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS

    def test_a_second_writer_waits_for_the_lock(self, sessions: sessionmaker[Session]) -> None:
        (iid,) = register_all(sessions, [instance_rec("20.1")])
        got: list[int] = []

        def claim() -> None:
            with sessions.begin() as session:
                got.extend(c.instance_id for c in repo.claim_instances(session, 5, "w2"))

        with sessions.begin() as holder:
            assert [c.instance_id for c in repo.claim_instances(holder, 5, "w1")] == [iid]
            waiter = threading.Thread(target=claim)
            waiter.start()
            time.sleep(0.3)
            assert waiter.is_alive()  # blocked on the write lock, not failed
        waiter.join(timeout=30)
        assert got == []  # it saw the committed claim

    def test_readonly_role_needs_postgresql(self, engine: Engine) -> None:
        assert is_sqlite(str(engine.url))
        with pytest.raises(UnsupportedDatabase, match="PostgreSQL"):
            create_readonly_role(engine)
