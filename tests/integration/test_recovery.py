"""Recovery in seconds: faults during a send of a few hundred instances, with the real
processes (listener, solo inference worker, control worker, beat), PostgreSQL and Redis.

Each fault must lose nothing, predict every instance exactly once, and leave the last
study result stored within a minute of the fault's end (with the default 30 s claim
lease: a worker killed mid-batch gives its claims back when it restarts, and inference
resumes the moment the database answers again). The measured seconds are printed
(``pytest -s``); ``bench/bench_recovery.py`` measures every fault against a baseline.
"""

from __future__ import annotations

import math
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.db_fixtures import at, instance_rec, migrated_engine, model_rec, prediction, register_all
from tests.integration.conftest import cli
from tests.integration.site import Pipeline
from tests.integration.test_operations import private_postgres
from tests.procs import free_port, redis_server, wait_for
from thyrocad.db import repository as repo
from thyrocad.db.engine import make_session_factory
from thyrocad.db.records import NO_USABLE_IMAGES, RefusedStudy
from thyrocad.pacs.pixels import FramePolicy
from thyrocad.pacs.sender import SendReport, send_files
from thyrocad.pacs.spool import Spool
from thyrocad.settings import load_settings
from thyrocad.synthetic import write_synthetic_set
from thyrocad.worker.aggregation import finalise_due
from thyrocad.worker.claims import ClaimBook
from thyrocad.worker.context import WorkerContext
from thyrocad.worker.model_holder import ModelHolder

pytestmark = pytest.mark.integration

PATIENTS = 40  # five instances each: 200 instances, 40 studies
RECOVERY_BOUND_SECONDS = 60.0


def _env(tmp_path: Path, db_url: str, redis_port: int, port: int) -> dict[str, str]:
    # Production defaults for claims and requeue; only the idle time is short.
    return {
        "THYROCAD_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": db_url,
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "THYROCAD_PORT": str(port),
        "THYROCAD_STUDY_IDLE_SECONDS": "1",
        "THYROCAD_RECONCILE_INTERVAL_SECONDS": "5",
        "THYROCAD_BATCH_MAX": "8",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }


Site = tuple[Pipeline, Callable[[], None], Callable[[], None]]


@pytest.fixture
def site(tmp_path: Path, tiny_model: tuple[Path, str]) -> Iterator[Site]:
    """The pipeline on a private PostgreSQL (it may be stopped) and a private Redis;
    yields it with (stop_db, start_db)."""
    registry, version = tiny_model
    with (
        private_postgres() as (db_url, stop_db, start_db),
        redis_server(tmp_path) as (redis_port, stop_redis, start_redis),
    ):
        port = free_port()
        env = _env(tmp_path, db_url, redis_port, port)
        cli("db", "upgrade", env=env)
        cli("models", "promote", version, "--registry", str(registry), env=env)
        p = Pipeline(env, port, tmp_path, sa.create_engine(db_url, pool_pre_ping=True))
        p.redis = (stop_redis, start_redis)  # type: ignore[attr-defined]
        try:
            yield p, stop_db, start_db
        finally:
            for name in list(p.procs):
                p.kill(name)
            p.engine.dispose()


def _files(tmp_path: Path, seed: int) -> list[Path]:
    written = write_synthetic_set(
        tmp_path / f"studies-{seed}", PATIENTS, seed=seed, size=64, id_prefix=f"R{seed}"
    )
    return [path for p in written for path in p.paths]


def _send_in_background(pipeline: Pipeline, files: list[Path]) -> Callable[[], SendReport]:
    """Start sending over one association; returns a function that waits for the report."""
    box: dict[str, SendReport] = {}
    thread = threading.Thread(
        target=lambda: box.setdefault("r", send_files(files, pipeline.peer(), "MODALITY1"))
    )
    thread.start()

    def join() -> SendReport:
        thread.join(300)
        return box["r"]

    return join


def _settled_seconds(pipeline: Pipeline, files: list[Path], fault_end: float) -> float:
    """Wait for every prediction and every study result; seconds from ``fault_end`` (epoch)
    to the last study result stored. Asserts each instance was predicted exactly once."""
    total, studies = len(files), len(files) // 5

    def done() -> bool:
        try:
            predicted = pipeline.states().get("predicted", 0)
            results = pipeline.scalar("SELECT count(*) FROM study_results_latest")
        except sa.exc.OperationalError:
            return False
        return predicted == total and results == studies

    wait_for(
        done,
        RECOVERY_BOUND_SECONDS + 120,
        lambda: (
            f"{total} predictions and {studies} results ({pipeline.states()})\n" + pipeline.logs()
        ),
        interval=0.5,
    )
    assert pipeline.scalar("SELECT count(*) FROM predictions") == total
    assert pipeline.scalar("SELECT max(attempts) FROM instances") is not None
    last = pipeline.scalar("SELECT extract(epoch FROM max(created_at)) FROM study_results")
    return float(last) - fault_end  # type: ignore[arg-type]


def _report(record_property: Callable[[str, object], None], what: str, seconds: float) -> None:
    # In the JUnit XML (--junitxml) and, with -s, on the terminal.
    record_property(what, round(seconds, 1))
    sys.stderr.write(f"\n{what}: last study result {seconds:.1f} s after the fault's end\n")


def test_killed_worker_recovers_in_seconds(
    site: Site, tmp_path: Path, record_property: Callable
) -> None:
    pipeline, _, _ = site
    pipeline.start()
    files = _files(tmp_path, seed=41)
    join = _send_in_background(pipeline, files)
    wait_for(lambda: pipeline.states().get("predicted", 0) >= 16, 180, "predictions under way")
    wait_for(lambda: pipeline.states().get("processing", 0) > 0, 60, "a batch in flight")
    pipeline.kill("inference", signal.SIGKILL)
    held = pipeline.states().get("processing", 0)
    pipeline.start("inference")
    fault_end = time.time()
    report = join()
    assert report.ok, report.failed
    assert held > 0 and pipeline.states().get("predicted", 0) < len(files), "killed too late"
    seconds = _settled_seconds(pipeline, files, fault_end)
    _report(record_property, f"worker SIGKILL ({held} claims held)", seconds)
    assert seconds <= RECOVERY_BOUND_SECONDS
    log = (tmp_path / "inference.log").read_text(errors="replace")
    assert "claimed earlier" in log, "the restarted worker did not give its claims back"


def test_database_outage_recovers_in_seconds(
    site: Site, tmp_path: Path, record_property: Callable
) -> None:
    pipeline, stop_db, start_db = site
    pipeline.start()
    files = _files(tmp_path, seed=42)
    join = _send_in_background(pipeline, files)
    wait_for(lambda: pipeline.states().get("predicted", 0) >= 16, 180, "predictions under way")
    pipeline.engine.dispose()
    stop_db()
    time.sleep(20)
    start_db()
    fault_end = time.time()
    report = join()
    assert report.ok, report.failed
    seconds = _settled_seconds(pipeline, files, fault_end)
    _report(record_property, "PostgreSQL stopped 20 s", seconds)
    assert seconds <= RECOVERY_BOUND_SECONDS


def test_broker_outage_is_logged_once_not_per_instance(site: Site, tmp_path: Path) -> None:
    pipeline, _, _ = site
    stop_redis, start_redis = pipeline.redis  # type: ignore[attr-defined]
    pipeline.start("listener")
    first = _files(tmp_path, seed=43)
    stop_redis()
    assert send_files(first[:60], pipeline.peer(), "MODALITY1").ok
    wait_for(lambda: pipeline.scalar("SELECT count(*) FROM instances") == 60, 60, "registration")
    start_redis()
    assert send_files(first[60:70], pipeline.peer(), "MODALITY1").ok
    log = (tmp_path / "listener.log").read_text(errors="replace")
    wait_for(
        lambda: "broker available again" in (tmp_path / "listener.log").read_text(),
        30,
        "the broker's return in the log",
    )
    log = (tmp_path / "listener.log").read_text(errors="replace")
    assert len(re.findall(r"broker unavailable", log)) == 1, log[-3000:]
    back = re.findall(r"broker available again after (\d+) failed publishes", log)
    assert len(back) == 1 and int(back[0]) >= 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


# --------------------------------------------------------------------------- the pieces


def test_claims_are_renewed_and_given_back_by_their_worker(pg_url: str) -> None:
    with migrated_engine(pg_url) as engine:
        sessions = make_session_factory(engine)
        ids = register_all(sessions, [instance_rec(f"1.2.3.{n}") for n in range(4)])
        with sessions.begin() as session:
            working = repo.claim_instances(session, 2, "live", now=at(10), worker="inf@h/0")
            left = repo.claim_instances(session, 1, "dead", now=at(10), worker="inf@h/0")
            other = repo.claim_instances(session, 1, "other", now=at(10), worker="inf@h/1")
        with sessions.begin() as session:
            assert repo.renew_claims(session, ["live"], now=at(50)) == 2
            # Lease 30 s at t=55: the renewed batch stays, the rest is claimable again.
            stolen = repo.claim_instances(session, 4, "thief", now=at(55), lease_seconds=30)
        assert {c.instance_id for c in stolen} == {left[0].instance_id, other[0].instance_id}
        with sessions.begin() as session:
            assert repo.release_worker_claims(session, "inf@h/0", ["live"], now=at(60)) == []
            released = repo.release_worker_claims(session, "inf@h/0", [], now=at(61))
        assert sorted(released) == sorted(c.instance_id for c in working)
        with sessions() as session:
            assert repo.instance_counts(session)["queued"] == 2
        assert len(ids) == 4


def test_an_instance_never_queued_is_requeued_sooner(pg_url: str) -> None:
    with migrated_engine(pg_url) as engine:
        sessions = make_session_factory(engine)
        lost, queued = register_all(sessions, [instance_rec("1.2.4.1"), instance_rec("1.2.4.2")])
        with sessions.begin() as session:
            repo.mark_queued(session, [queued], now=at(1))
        with sessions() as session:
            found = repo.instances_to_requeue(session, at(15), 120, 30, received_seconds=10)
            assert found == [lost]  # its publish failed: no need to wait 120 s
            assert repo.instances_to_requeue(session, at(200), 120, 30, 10) == [lost, queued]


def test_a_study_whose_every_image_was_rejected_gets_a_result(pg_url: str) -> None:
    with migrated_engine(pg_url) as engine:
        sessions = make_session_factory(engine)
        with sessions.begin() as session:
            repo.upsert_model_version(session, model_rec("v1"))
            repo.set_active_model(session, "v1")
        bad = register_all(sessions, [instance_rec(f"1.2.9.{n}", study="1.2.9") for n in (1, 2)])
        good = register_all(sessions, [instance_rec("1.2.8.1", study="1.2.8", patient="PAT-2")])
        with sessions.begin() as session:
            repo.claim_instances(session, 3, "t", now=at(5))
            for instance_id in bad:
                assert repo.mark_rejected(session, instance_id, "undecodable", at(6), token="t")
            repo.save_predictions(session, [prediction(good[0], 0.9)], "t", now=at(6))
            # Refused by the listener: a study with nothing else, and one more image of a
            # study whose other image is usable.
            for uid, study in (("1.2.7.1", "1.2.7"), ("1.2.8.2", "1.2.8")):
                repo.record_rejection(
                    session, uid, "MOD", "no pixel data", 0xA900, at(5), study=RefusedStudy(study)
                )
        settings = load_settings(
            database_url=pg_url,
            study_idle_seconds=1.0,
            classes=["normal", "thyroiditis"],
            positive_class="thyroiditis",
        )
        ctx = WorkerContext(
            settings=settings,
            engine=engine,
            sessions=sessions,
            spool=Spool(settings.spool_dir),
            frame_policy=FramePolicy.parse("middle"),
            models=ModelHolder(),
            claims=ClaimBook("test/0"),
        )
        done = finalise_due(ctx, now=at(60))
        assert {f.study.key for f in done} == {"1.2.9", "1.2.8", "1.2.7"}
        with sessions() as session:
            (unusable,) = repo.results(session, study_uid="1.2.9")
            (usable,) = repo.results(session, study_uid="1.2.8")
            (refused,) = repo.results(session, study_uid="1.2.7")
        assert refused.reason == NO_USABLE_IMAGES and refused.image_count == 0
        assert unusable.reason == NO_USABLE_IMAGES and not unusable.has_finding
        assert unusable.label == NO_USABLE_IMAGES and math.isnan(unusable.probability)
        assert unusable.image_count == 0
        assert usable.has_finding and usable.probability == pytest.approx(0.9)
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT study_instance_uid, diagnosis, probability, reason "
                    "FROM study_results_latest ORDER BY study_instance_uid"
                )
            ).all()
        assert [tuple(r) for r in rows] == [
            ("1.2.7", None, None, NO_USABLE_IMAGES),
            ("1.2.8", "thyroiditis", pytest.approx(0.9), None),
            ("1.2.9", None, None, NO_USABLE_IMAGES),
        ]
        # Finalising again changes nothing: no new revision.
        assert finalise_due(ctx, now=at(70)) == []
