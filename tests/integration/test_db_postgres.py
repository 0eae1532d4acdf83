"""The migrations and the repository on a real PostgreSQL, one fresh database per test.

Skipped only when PostgreSQL cannot be reached, and never under CI (``CI``
set), where an unreachable database is a failure.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from tests.db_fixtures import (
    RepositoryContract,
    at,
    fresh_postgres_url,
    instance_rec,
    model_rec,
    postgres_admin_url,
    postgres_unavailable_reason,
    register_all,
)
from thyrocad.db import repository as repo
from thyrocad.db.roles import create_readonly_role
from thyrocad.db.views import VIEW_NAMES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def postgres() -> None:
    reason = postgres_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


class TestPostgresRepository(RepositoryContract):
    """Everything the repository promises, on PostgreSQL, plus its locking."""

    @pytest.fixture
    def url(self, postgres: None) -> Iterator[str]:  # type: ignore[override]
        with fresh_postgres_url() as url:
            yield url

    def test_skip_locked_two_open_transactions_take_different_rows(
        self, sessions: sessionmaker[Session]
    ) -> None:
        ids = register_all(sessions, [instance_rec(f"30.{n}") for n in range(6)])
        with sessions() as first:
            mine = repo.claim_instances(first, 3, "w1", now=at(10))
            # The first worker has not committed: its rows stay locked.
            with sessions() as second:
                theirs = repo.claim_instances(second, 5, "w2", now=at(10))
                second.commit()
            first.commit()
        assert [c.instance_id for c in mine] == ids[:3]
        assert [c.instance_id for c in theirs] == ids[3:]

    def test_concurrent_registration_of_one_uid(self, sessions: sessionmaker[Session]) -> None:
        rec = instance_rec("31.1")
        outcomes: list[str] = []

        def register() -> None:
            with sessions.begin() as session:
                outcomes.append(repo.register_instance(session, rec).outcome)

        with sessions.begin() as session:
            assert repo.register_instance(session, rec).outcome == "new"
            other = threading.Thread(target=register)
            other.start()
            time.sleep(0.3)
            assert other.is_alive()  # waits for the first insert to commit
        other.join(timeout=30)
        assert outcomes == ["duplicate"]

    def test_concurrent_promotions_queue_up(self, sessions: sessionmaker[Session]) -> None:
        with sessions.begin() as session:
            for version in ("v1", "v2", "v3"):
                repo.upsert_model_version(session, model_rec(version))
            repo.set_active_model(session, "v1")
        errors: list[BaseException] = []

        def promote() -> None:
            try:
                with sessions.begin() as session:
                    repo.set_active_model(session, "v3")
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)

        with sessions.begin() as session:
            repo.set_active_model(session, "v2")
            other = threading.Thread(target=promote)
            other.start()
            time.sleep(0.3)
            assert other.is_alive()
        other.join(timeout=30)
        assert errors == []
        with sessions() as session:
            assert {m.version: m.status for m in repo.list_model_versions(session)} == {
                "v1": "retired",
                "v2": "retired",
                "v3": "active",
            }

    def test_readonly_role_reads_views_only(
        self, url: str, engine: Engine, sessions: sessionmaker[Session]
    ) -> None:
        register_all(sessions, [instance_rec("32.1")])
        role = f"thyrocad_reader_{uuid.uuid4().hex[:8]}"
        try:
            executed = create_readonly_role(engine, role, password="s3cret%")
            assert executed[0] == f"CREATE ROLE {role} LOGIN PASSWORD '***'"
            assert all("s3cret" not in statement for statement in executed)
            assert create_readonly_role(engine, role)[0] == f"ALTER ROLE {role} LOGIN"
            reader = create_engine(make_url(url).set(username=role, password="s3cret%"))
            try:
                with reader.connect() as connection:
                    for view in VIEW_NAMES:
                        connection.execute(text(f"SELECT * FROM {view}")).all()
                for statement in (
                    "SELECT * FROM patients",
                    "SELECT * FROM instances",
                    "INSERT INTO labels (patient_id, diagnosis, labelled_by) VALUES (1, 'x', 'y')",
                    "DELETE FROM study_results",
                ):
                    with reader.connect() as connection, pytest.raises(ProgrammingError):
                        connection.execute(text(statement))
            finally:
                reader.dispose()
        finally:
            engine.dispose()
            _drop_role(url, role)


def _drop_role(url: str, role: str) -> None:
    # The role's grants live in the test database; drop them there, then the role.
    for target in (url, postgres_admin_url()):
        admin = create_engine(target, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                if target == url:
                    connection.exec_driver_sql(f'DROP OWNED BY "{role}"')
                else:
                    connection.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
        finally:
            admin.dispose()
