"""The audit trail on a real PostgreSQL: the application's own role, which owns the
database and ran the migrations, cannot change or remove audit rows; the listener
audits every association and what it stored."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from tests.db_fixtures import postgres_admin_url
from tests.integration.site import US_IMAGE_STORAGE
from tests.procs import free_port, wait_for
from thyrocad.db import repository as repo
from thyrocad.db.engine import head_revision, make_engine, make_session_factory, upgrade
from thyrocad.pacs.intake import Intake
from thyrocad.pacs.listener import ListenerConfig, start_listener
from thyrocad.pacs.sender import Peer, send_files
from thyrocad.pacs.spool import Spool
from thyrocad.synthetic import write_synthetic_set

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


def test_listener_audits_associations_and_their_instance_counts(
    tmp_path: Path, pg_url: str
) -> None:
    upgrade(pg_url)
    engine = make_engine(pg_url)
    sessions = make_session_factory(engine)
    intake = Intake(sessions, lambda ids: None)
    intake.start()
    port = free_port()
    config = ListenerConfig(host="127.0.0.1", port=port, allowed_aets=("MODALITY1", "MODALITY2"))
    server = start_listener(config, Spool(tmp_path / "spool"), intake)
    files = write_synthetic_set(tmp_path / "s", 1, seed=81, size=48)[0].paths
    nopix = pydicom.dcmread(files[0])
    del nopix.PixelData

    def counted() -> int:
        with sessions() as session:
            return len(repo.audit_events(session, kind="instances_received"))

    try:
        assert send_files(files, Peer("127.0.0.1", port, "THYROCAD"), "MODALITY1").ok
        intruder = AE("INTRUDER")
        intruder.add_requested_context(US_IMAGE_STORAGE)
        assert intruder.associate("127.0.0.1", port, ae_title="THYROCAD").is_rejected
        modality = AE("MODALITY2")
        modality.add_requested_context(US_IMAGE_STORAGE)
        assoc = modality.associate("127.0.0.1", port, ae_title="THYROCAD")
        assert assoc.is_established
        assert assoc.send_c_store(pydicom.dcmread(files[1])).Status == 0
        assert assoc.send_c_store(nopix).Status != 0
        assoc.abort()
        wait_for(lambda: counted() == 2, 20, "two associations' instance counts")
    finally:
        server.shutdown()
        intake.stop()
    with sessions() as session:
        events = repo.audit_events(session)
    engine.dispose()
    associations = [(e.actor, e.outcome) for e in events if e.kind == "association"]
    assert sorted(associations) == [
        ("INTRUDER", "refused"),
        ("MODALITY1", "success"),
        ("MODALITY2", "success"),
    ]
    (refused,) = [e for e in events if e.outcome == "refused"]
    assert refused.details["reason"] == "calling AE title not allowed"
    assert refused.details["address"].startswith("127.0.0.1:")
    ends = {e.actor: e for e in events if e.kind == "instances_received"}
    assert ends["MODALITY1"].details | {"association": None, "address": None} == {
        "association": None,
        "address": None,
        "calling_aet": "MODALITY1",
        "called_aet": "THYROCAD",
        "stored": len(files),
        "refused": 0,
        "ended": "released",
    }
    assert ends["MODALITY1"].outcome == "success"
    second = ends["MODALITY2"]
    assert (second.outcome, second.details["ended"]) == ("failure", "aborted")
    assert (second.details["stored"], second.details["refused"]) == (1, 1)
    # The association's two events share its number.
    opened = [e for e in events if e.kind == "association" and e.actor == "MODALITY2"]
    assert opened[0].details["association"] == second.details["association"]
