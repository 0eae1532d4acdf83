"""Claims are stamped and judged on the database's clock, so a worker host whose clock
is wrong neither loses its claims early nor keeps a dead worker's claims alive."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.db_fixtures import fresh_postgres_url, instance_rec, migrated_engine, register_all
from thyrocad.db import repository
from thyrocad.db.engine import make_session_factory
from thyrocad.pacs.pixels import FramePolicy
from thyrocad.pacs.spool import Spool
from thyrocad.settings import load_settings
from thyrocad.worker import inference
from thyrocad.worker.claims import ClaimBook
from thyrocad.worker.context import WorkerContext
from thyrocad.worker.model_holder import ModelHolder

pytestmark = pytest.mark.integration


def _two_hours_ahead() -> dt.datetime:
    """This worker host's clock, two hours ahead of everyone else's."""
    return dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)


def test_a_claim_is_stamped_on_the_database_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fresh_postgres_url() as url, migrated_engine(url) as engine:
        sessions = make_session_factory(engine)
        settings = load_settings(data_dir=tmp_path, batch_wait_seconds=0.0)
        ctx = WorkerContext(
            settings=settings,
            engine=engine,
            sessions=sessions,
            spool=Spool(settings.spool_dir),
            frame_policy=FramePolicy.parse("middle"),
            models=ModelHolder(),
            claims=ClaimBook("skewed/0"),
        )
        register_all(sessions, [instance_rec("1.2.3.1"), instance_rec("1.2.3.2")])
        monkeypatch.setattr(inference, "utcnow", _two_hours_ahead)

        claimed = inference.claim(ctx, 1, "skewed-token")
        assert len(claimed) == 1
        with engine.connect() as connection:
            lag = connection.execute(
                text("SELECT clock_timestamp() - claimed_at FROM instances WHERE claim_token = :t"),
                {"t": "skewed-token"},
            ).scalar_one()
        assert dt.timedelta(0) <= lag < dt.timedelta(seconds=30)

        # Another worker, its clock right, does not take over a claim that is one second old.
        with sessions.begin() as session:
            again = repository.claim_instances(
                session,
                limit=5,
                token="other",
                now=repository.database_now(session),
                lease_seconds=60,
                worker="right/0",
            )
        assert [c.sop_instance_uid for c in again] == ["1.2.3.2"]


def test_database_now_is_the_servers_clock() -> None:
    with fresh_postgres_url() as url, migrated_engine(url) as engine:
        with make_session_factory(engine).begin() as session:
            now = repository.database_now(session)
            server = session.execute(text("SELECT clock_timestamp()")).scalar_one()
        assert now.tzinfo is not None and now.utcoffset() == dt.timedelta(0)
        assert abs(server - now) < dt.timedelta(seconds=5)
