"""The audit trail on a real PostgreSQL: the application's own role, which owns the
database and ran the migrations, cannot change or remove audit rows."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from db import repository as repo
from db.engine import head_revision, make_engine, make_session_factory, upgrade
from tests.db_fixtures import postgres_admin_url

pytestmark = pytest.mark.integration


@pytest.fixture
def app_role_url(pg_url: str) -> Iterator[str]:
    """The URL of a fresh database owned by a new non-superuser login role, as that role."""
    role = f"thyrocad_app_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_admin_url(), isolation_level="AUTOCOMMIT")
    database = make_url(pg_url).database
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOCREATEROLE')
        with create_engine(pg_url, isolation_level="AUTOCOMMIT").connect() as connection:
            connection.exec_driver_sql(f'ALTER DATABASE "{database}" OWNER TO "{role}"')
        yield make_url(pg_url).set(username=role).render_as_string(hide_password=False)
    finally:
        # Its database first (it owns objects there), then the role; pg_url's own drop
        # afterwards finds nothing to do.
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            connection.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
        admin.dispose()


def test_the_application_role_cannot_update_delete_or_truncate_audit_rows(
    app_role_url: str, pg_url: str
) -> None:
    upgrade(app_role_url)  # the application's role runs the migrations and owns the tables
    engine = make_engine(app_role_url)
    try:
        with engine.connect() as connection:
            user, superuser = connection.execute(
                text("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")
            ).one()
            owner = connection.execute(
                text("SELECT tableowner FROM pg_tables WHERE tablename = 'audit_events'")
            ).scalar_one()
            revision = connection.execute(text("SELECT version_num FROM alembic_version"))
            assert revision.scalar_one() == head_revision()
        assert user.startswith("thyrocad_app_") and superuser is False and owner == user
        sessions = make_session_factory(engine)
        with sessions.begin() as session:  # it may append and read
            repo.record_audit_event(session, "refit", actor="worker", details={"runs": 1})
        refusals = (
            "UPDATE audit_events SET actor = 'someone else'",
            "DELETE FROM audit_events",
            "TRUNCATE audit_events",
            "DELETE FROM audit_events WHERE id < 0",  # refused even when nothing matches
        )
        for statement in refusals:
            with engine.connect() as connection, pytest.raises(DBAPIError) as refused:
                connection.execute(text(statement))
            assert "append-only" in str(refused.value) or "permission denied" in str(
                refused.value
            ), statement
        # The owner can give itself the privileges back; the triggers still refuse.
        with engine.begin() as connection:
            connection.execute(
                text("GRANT UPDATE, DELETE, TRUNCATE ON audit_events TO CURRENT_USER")
            )
        for statement in refusals:
            with engine.connect() as connection, pytest.raises(DBAPIError, match="append-only"):
                connection.execute(text(statement))
        with sessions() as session:
            (event,) = repo.audit_events(session)
            assert (event.actor, event.details) == ("worker", {"runs": 1})
    finally:
        engine.dispose()
    # Not even a superuser gets past the triggers.
    superuser_engine = make_engine(pg_url)
    try:
        with (
            superuser_engine.connect() as connection,
            pytest.raises(DBAPIError, match="append-only"),
        ):
            connection.execute(text("DELETE FROM audit_events"))
    finally:
        superuser_engine.dispose()
