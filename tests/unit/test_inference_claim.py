"""How long an inference drain waits to fill a batch."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import Engine

from tests.db_fixtures import fresh_sqlite_url, instance_rec, migrated_engine, register_all
from thyrocad.db.engine import make_session_factory
from thyrocad.pacs.pixels import FramePolicy
from thyrocad.pacs.spool import Spool
from thyrocad.settings import load_settings
from thyrocad.worker.claims import ClaimBook
from thyrocad.worker.context import WorkerContext
from thyrocad.worker.inference import claim
from thyrocad.worker.model_holder import ModelHolder


def _context(tmp_path: Path, engine: Engine, wait: float) -> WorkerContext:
    settings = load_settings(data_dir=tmp_path, batch_wait_seconds=wait)
    return WorkerContext(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        spool=Spool(settings.spool_dir),
        frame_policy=FramePolicy.parse("middle"),
        models=ModelHolder(),
        claims=ClaimBook("test/0"),
    )


def test_a_drain_with_nothing_to_claim_returns_at_once(tmp_path: Path) -> None:
    with migrated_engine(fresh_sqlite_url(tmp_path)) as engine:
        ctx = _context(tmp_path, engine, wait=1.0)
        started = time.monotonic()
        assert claim(ctx, 8, "t1") == []
        assert time.monotonic() - started < 0.5

        # One instance: the drain waits for more to fill its batch, then takes what it has.
        register_all(ctx.sessions, [instance_rec("1.2.3.1")])
        started = time.monotonic()
        claimed = claim(ctx, 8, "t2")
        assert [c.sop_instance_uid for c in claimed] == ["1.2.3.1"]
        assert time.monotonic() - started >= 0.9
