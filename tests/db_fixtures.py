"""Throw-away databases for tests, migrated with the real Alembic migrations.

Reusable by every test suite::

    from tests.db_fixtures import fresh_postgres_url, fresh_sqlite_url, migrated_engine

    with fresh_postgres_url() as url, migrated_engine(url) as engine:
        ...

PostgreSQL is reached through ``THYROCAD_TEST_PG`` (default
``postgresql+psycopg2://postgres@127.0.0.1:5432/test``), a maintenance
database on a server where that user may CREATE DATABASE. Each
``fresh_postgres_url()`` creates a database with a random name on that
server and drops it afterwards, so tests may commit freely and run in
parallel with other suites.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, func, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from thyrocad.db import repository as repo
from thyrocad.db.engine import (
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    make_session_factory,
    upgrade,
)
from thyrocad.db.errors import RepositoryError
from thyrocad.db.records import (
    InstanceRecord,
    ModelVersionRecord,
    PredictionRecord,
    RegisterOutcome,
)
from thyrocad.db.schema import (
    UNKNOWN_PATIENT_PREFIX,
    Base,
    Instance,
    Patient,
    Prediction,
    Rejection,
    Series,
    Study,
    StudyResultRow,
)
from thyrocad.db.views import VIEW_NAMES

DEFAULT_POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def postgres_admin_url() -> str:
    """The URL of the maintenance database fresh databases are created from."""
    return os.environ.get("THYROCAD_TEST_PG", DEFAULT_POSTGRES_URL)


def postgres_unavailable_reason() -> str | None:
    """None when PostgreSQL answers; otherwise why not, for ``pytest.skip``."""
    url = make_url(postgres_admin_url())
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means "not reachable" for a skip reason
        where = url.render_as_string(hide_password=True)
        return f"PostgreSQL not reachable at {where} ({type(exc).__name__}); set THYROCAD_TEST_PG"
    finally:
        engine.dispose()
    return None


def _admin_engine() -> Engine:
    # CREATE/DROP DATABASE cannot run inside a transaction.
    return create_engine(postgres_admin_url(), isolation_level="AUTOCOMMIT")


@contextmanager
def fresh_postgres_url(prefix: str = "thyrocad_t") -> Iterator[str]:
    """Create an empty database, yield its URL, drop it (closing stray sessions)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine()
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield (
                make_url(postgres_admin_url())
                .set(database=name)
                .render_as_string(hide_password=False)
            )
        finally:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def fresh_sqlite_url(tmp_path: Path) -> str:
    """The URL of a new SQLite file under ``tmp_path`` (created on first connect)."""
    return f"sqlite:///{tmp_path / f'thyrocad-{uuid.uuid4().hex[:8]}.sqlite'}"


@contextmanager
def migrated_engine(url: str) -> Iterator[Engine]:
    """Run the migrations to head on ``url``, yield an engine for it, dispose it."""
    upgrade(url)
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- contract
# The repository behaviour every backend must show. tests/unit/test_db_sqlite.py
# and tests/integration/test_db_postgres.py subclass it and provide ``url``.

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
SHA_A = "a" * 64
SHA_B = "b" * 64
CLASSES = ("normal", "thyroiditis")


def at(seconds: float) -> datetime:
    """``T0`` plus some seconds: test clocks are explicit."""
    return T0 + timedelta(seconds=seconds)


def instance_rec(
    sop: str,
    *,
    study: str = "1.2.826.0.1.100",
    series: str | None = None,
    patient: str = "PAT-1",
    sha: str = SHA_A,
    **changes: Any,
) -> InstanceRecord:
    """A small valid InstanceRecord; keyword arguments override any field."""
    rec = InstanceRecord(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
        study_instance_uid=study,
        series_instance_uid=series or f"{study}.1",
        spool_path=f"/spool/{sop}-{sha[:4]}.dcm",
        sha256=sha,
        size_bytes=1234,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        patient_key=patient,
        patient_name="Doe^Jane",
        patient_birth_date=date(1970, 1, 2),
        patient_sex="F",
        study_date=date(2025, 2, 28),
        accession_number="ACC1",
        modality="US",
    )
    return replace(rec, **changes)


def prediction(
    instance_id: int, probability: float = 0.8, *, frame: int = 0, version: str = "v1"
) -> PredictionRecord:
    """A prediction of the positive class ``thyroiditis`` with ``probability``."""
    label = "thyroiditis" if probability >= 0.5 else "normal"
    return PredictionRecord(
        instance_id=instance_id,
        frame_index=frame,
        model_version=version,
        label=label,
        probability=probability,
        probabilities={"normal": 1 - probability, "thyroiditis": probability},
        latency_ms=12.5,
    )


def model_rec(version: str, **changes: Any) -> ModelVersionRecord:
    """A candidate model version record."""
    rec = ModelVersionRecord(
        version=version,
        architecture="vgg19",
        classes=CLASSES,
        input_size=224,
        artifact_path=f"/models/{version}",
        metrics={"auc": 0.9},
        data_fingerprint="fp",
    )
    return replace(rec, **changes)


def register_all(sessions: sessionmaker[Session], recs: list[InstanceRecord]) -> list[int]:
    """Register records one second apart from ``T0``; return their ids."""
    with sessions.begin() as session:
        return [
            repo.register_instance(session, rec, now=at(i)).instance_id
            for i, rec in enumerate(recs)
        ]


def predict_all(
    sessions: sessionmaker[Session], ids: list[int], probability: float, when: datetime
) -> None:
    """Claim and predict the given instances (one frame each, version v1)."""
    with sessions.begin() as session:
        claimed = repo.claim_instances(session, len(ids), "t", now=when, only_ids=ids)
        assert {c.instance_id for c in claimed} == set(ids)
        repo.save_predictions(session, [prediction(i, probability) for i in ids], "t", now=when)


def claim_until_empty(sessions: sessionmaker[Session], token: str, batch: int) -> list[int]:
    """Claim in small committed batches until nothing is left; return every id taken."""
    taken: list[int] = []
    while True:
        with sessions.begin() as session:
            claimed = repo.claim_instances(session, batch, token)
        if not claimed:
            return taken
        taken += [c.instance_id for c in claimed]


def run_upgrade_processes(url: str, count: int = 2) -> None:
    """Upgrade ``url`` from ``count`` processes at once, as services do at start-up."""
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    code = "import sys; from thyrocad.db.engine import upgrade; upgrade(sys.argv[1])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, url], cwd=root, env=env, stderr=subprocess.PIPE, text=True
        )
        for _ in range(count)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err


class RepositoryContract:
    """Backend-independent tests of the migrations and the repository."""

    @pytest.fixture
    def url(self) -> Iterator[str]:
        raise NotImplementedError("subclasses provide a fresh database URL")

    @pytest.fixture
    def engine(self, url: str) -> Iterator[Engine]:
        with migrated_engine(url) as engine:
            yield engine

    @pytest.fixture
    def sessions(self, engine: Engine) -> sessionmaker[Session]:
        return make_session_factory(engine)

    # ------------------------------------------------------------- migrations

    def test_upgrade_reaches_head_and_matches_the_orm(self, url: str, engine: Engine) -> None:
        assert current_revision(url) == head_revision()
        assert set(VIEW_NAMES) <= set(inspect(engine).get_view_names())
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []

    def test_downgrade_to_base_and_upgrade_again(self, url: str, engine: Engine) -> None:
        engine.dispose()
        downgrade(url, "base")
        assert current_revision(url) is None
        assert inspect(engine).get_view_names() == []
        upgrade(url)
        assert current_revision(url) == head_revision()

    def test_concurrent_upgrades_at_start_up(self, url: str) -> None:
        run_upgrade_processes(url)
        assert current_revision(url) == head_revision()

    # ------------------------------------------------------------- registering

    def test_register_new_duplicate_replaced(self, sessions: sessionmaker[Session]) -> None:
        rec = instance_rec("1.1")
        with sessions.begin() as session:
            first = repo.register_instance(session, rec, now=at(0))
        assert first.outcome == "new"
        assert first.state == "received"

        with sessions.begin() as session:
            repo.mark_queued(session, [first.instance_id], now=at(1))
            again = repo.register_instance(session, rec, now=at(2))
        assert again == RegisterOutcome(first.instance_id, "duplicate", "queued")

        with sessions.begin() as session:
            repo.claim_instances(session, 5, "w1", now=at(3))
            changed = replace(rec, sha256=SHA_B, spool_path="/spool/new.dcm")
            replaced = repo.register_instance(session, changed, now=at(4))
        assert replaced == RegisterOutcome(first.instance_id, "replaced", "received")

        with sessions() as session:
            row = session.get_one(Instance, first.instance_id)
            assert (row.received_count, row.sha256, row.spool_path) == (3, SHA_B, "/spool/new.dcm")
            assert (row.claim_token, row.claimed_at, row.attempts) == (None, None, 0)
            assert row.received_at == at(4)
            assert repo.known_instance(session, "1.1") == (first.instance_id, SHA_B, "received")
            assert repo.known_instance(session, "9.9") is None
            for table in (Patient, Study, Series, Instance):
                assert session.scalar(select(func.count()).select_from(table)) == 1

    def test_batch_registration_equals_one_by_one(self, sessions: sessionmaker[Session]) -> None:
        def scenario(p: str) -> tuple[list[InstanceRecord], list[InstanceRecord]]:
            def rec(sop: str, study: str, patient: str, **changes: Any) -> InstanceRecord:
                return instance_rec(
                    f"{p}{sop}", study=f"{p}{study}", patient=f"{p}{patient}", **changes
                )

            before = [rec("old1", "S0", "P0"), rec("old2", "S0", "P0")]
            batch = [
                rec("new1", "S1", "P1", patient_name=None, accession_number=None),
                rec("new2", "S1", "P1", patient_name="Roe^Ann", accession_number="ACC2"),
                rec("old1", "S0", "P0"),  # duplicate of a registered instance
                rec("old2", "S0", "P0", sha256=SHA_B),  # replaced
                rec("new1", "S1", "P1"),  # duplicate within the batch
                rec("new3", "S0", "P2"),  # a known study keeps its first patient
                rec("new4", "S2", "P0", patient_sex="M"),  # a known patient's refresh
            ]
            return before, batch

        def snapshot(session: Session, p: str) -> list[tuple[Any, ...]]:
            def strip(value: Any) -> Any:
                return value.removeprefix(p) if isinstance(value, str) else value

            queries = [
                select(Patient.patient_key, Patient.patient_name, Patient.sex, Patient.birth_date),
                select(
                    Study.study_instance_uid,
                    Patient.patient_key,
                    Study.accession_number,
                    Study.first_received_at,
                    Study.last_received_at,
                ).join(Patient, Patient.id == Study.patient_id),
                select(Series.series_instance_uid, Study.study_instance_uid).join(
                    Study, Study.id == Series.study_id
                ),
                select(
                    Instance.sop_instance_uid,
                    Instance.state,
                    Instance.received_count,
                    Instance.sha256,
                    Series.series_instance_uid,
                ).join(Series, Series.id == Instance.series_id),
            ]
            rows = [row for q in queries for row in session.execute(q) if row[0].startswith(p)]
            return sorted((tuple(map(strip, row)) for row in rows), key=repr)

        one_before, one_batch = scenario("A.")
        many_before, many_batch = scenario("B.")
        with sessions.begin() as session:
            for rec in one_before + many_before:
                repo.register_instance(session, rec, now=at(0))
        with sessions.begin() as session:
            singly = [repo.register_instance(session, rec, now=at(5)) for rec in one_batch]
            batched = repo.register_instances(session, many_batch, now=at(5))
        assert [(o.outcome, o.state) for o in batched] == [(o.outcome, o.state) for o in singly]
        assert [o.outcome for o in batched] == [
            "new",
            "new",
            "duplicate",
            "replaced",
            "duplicate",
            "new",
            "new",
        ]
        assert batched[4].instance_id == batched[0].instance_id
        with sessions() as session:
            assert snapshot(session, "B.") == snapshot(session, "A.")
            assert len(snapshot(session, "A.")) == 3 + 3 + 3 + 6, snapshot(session, "A.")

    def test_patients_studies_and_demographics(self, sessions: sessionmaker[Session]) -> None:
        recs = [
            instance_rec("2.1", study="S1", patient=""),
            instance_rec("2.2", study="S2", patient="  "),
            instance_rec("2.3", study="S3", patient="P9", patient_name=None),
            instance_rec("2.4", study="S3", patient="P9", patient_name="Roe^Ann"),
        ]
        register_all(sessions, recs)
        with sessions() as session:
            keys = set(session.scalars(select(Patient.patient_key)))
            assert keys == {f"{UNKNOWN_PATIENT_PREFIX}S1", f"{UNKNOWN_PATIENT_PREFIX}S2", "P9"}
            p9 = session.scalars(select(Patient).where(Patient.patient_key == "P9")).one()
            assert p9.patient_name == "Roe^Ann"
            s3 = session.scalars(select(Study).where(Study.study_instance_uid == "S3")).one()
            assert (s3.first_received_at, s3.last_received_at) == (at(2), at(3))
            assert s3.needs_finalise is False

    def test_times_are_stored_in_utc_and_naive_ones_refused(
        self, sessions: sessionmaker[Session]
    ) -> None:
        paris = timezone(timedelta(hours=1))
        with sessions.begin() as session:
            out = repo.register_instance(
                session, instance_rec("3.1"), now=datetime(2025, 3, 1, 9, 0, tzinfo=paris)
            )
        with sessions() as session:
            received = session.get_one(Instance, out.instance_id).received_at
            assert received == T0
            assert received.utcoffset() == timedelta(0)
            with pytest.raises(ValueError, match="aware"):
                repo.register_instance(session, instance_rec("3.2"), now=datetime(2025, 3, 1))

    def test_rejections_are_stored_and_counted(self, sessions: sessionmaker[Session]) -> None:
        with sessions.begin() as session:
            repo.record_rejection(session, None, "MODALITY1", "not DICOM", 0xC000, now=at(0))
            repo.record_rejection(session, "4.1", "MODALITY1", "wrong SOP class", 0xA900)
            rid = repo.record_rejection(session, "4.2", "PACS", "not DICOM", 0xC000)
        with sessions() as session:
            assert repo.rejection_counts(session) == {"not DICOM": 2, "wrong SOP class": 1}
            row = session.get_one(Rejection, rid)
            assert (row.sop_instance_uid, row.calling_ae_title, row.dimse_status) == (
                "4.2",
                "PACS",
                0xC000,
            )

    # ------------------------------------------------------------- claiming

    def test_claim_oldest_first_lease_expiry_and_late_results(
        self, sessions: sessionmaker[Session]
    ) -> None:
        ids = register_all(sessions, [instance_rec(f"5.{n}") for n in range(3)])
        with sessions.begin() as session:
            first = repo.claim_instances(session, 2, "w1", now=at(10), lease_seconds=60)
        assert [c.instance_id for c in first] == ids[:2]
        assert all(c.attempts == 1 and c.spool_path.startswith("/spool/") for c in first)
        with sessions.begin() as session:
            second = repo.claim_instances(session, 5, "w2", now=at(20), lease_seconds=60)
            assert [c.instance_id for c in second] == ids[2:]
            assert repo.claim_instances(session, 5, "w3", now=at(30), lease_seconds=60) == []
        # w1 died: its lease ran out at 70 s, w2's only runs out at 80 s.
        with sessions.begin() as session:
            third = repo.claim_instances(session, 5, "w3", now=at(71), lease_seconds=60)
        assert [(c.instance_id, c.attempts) for c in third] == [(ids[0], 2), (ids[1], 2)]
        with sessions.begin() as session:
            late = repo.save_predictions(session, [prediction(ids[0])], "w1", now=at(72))
            assert late == 0
            assert repo.save_predictions(session, [prediction(ids[0])], "w3", now=at(72)) == 1
        with sessions() as session:
            assert repo.instance_counts(session) == {
                "received": 0,
                "queued": 0,
                "processing": 2,
                "predicted": 1,
                "rejected": 0,
                "failed": 0,
            }

    def test_claim_only_ids_and_max_attempts(self, sessions: sessionmaker[Session]) -> None:
        ids = register_all(sessions, [instance_rec(f"6.{n}") for n in range(3)])
        with sessions.begin() as session:
            assert repo.claim_instances(session, 5, "w", now=at(5), only_ids=[]) == []
            got = repo.claim_instances(session, 5, "w", now=at(5), only_ids=[ids[1]])
            assert [c.instance_id for c in got] == [ids[1]]
        with sessions.begin() as session:
            # ids[1] has used its one attempt and its worker vanished: give up on it.
            got = repo.claim_instances(
                session, 5, "w2", now=at(500), lease_seconds=60, max_attempts=1
            )
            assert [c.instance_id for c in got] == [ids[0], ids[2]]
        with sessions() as session:
            row = session.get_one(Instance, ids[1])
            assert row.state == "failed"
            assert row.reason is not None and "1 attempts" in row.reason

    def test_concurrent_workers_never_share_an_instance(
        self, sessions: sessionmaker[Session]
    ) -> None:
        ids = register_all(sessions, [instance_rec(f"7.{n}") for n in range(40)])
        with ThreadPoolExecutor(max_workers=4) as pool:
            runs = [pool.submit(claim_until_empty, sessions, f"w{n}", 3) for n in range(4)]
            taken = [i for run in runs for i in run.result(timeout=120)]
        assert sorted(taken) == sorted(ids)

    def test_release_fail_reject_respect_the_claim(self, sessions: sessionmaker[Session]) -> None:
        a, b, c = register_all(sessions, [instance_rec(f"8.{n}") for n in range(3)])
        with sessions.begin() as session:
            repo.claim_instances(session, 2, "w", now=at(10))
            assert repo.release_claim(session, [a], "other", now=at(11)) == 0
            assert repo.release_claim(session, [a], "w", now=at(11), reason="broker down") == 1
            assert (
                repo.mark_failed(session, b, "decoder crashed", now=at(11), token="other") is False
            )
            assert repo.mark_rejected(session, b, "undecodable pixels", now=at(11), token="w")
            assert repo.mark_failed(session, c, "spool file missing", now=at(12))
        with sessions() as session:
            states = {i: session.get_one(Instance, i) for i in (a, b, c)}
            assert (states[a].state, states[a].reason, states[a].claim_token) == (
                "queued",
                "broker down",
                None,
            )
            assert (states[b].state, states[b].reason) == ("rejected", "undecodable pixels")
            assert (states[c].state, states[c].reason) == ("failed", "spool file missing")

    def test_instances_to_requeue(self, sessions: sessionmaker[Session]) -> None:
        stale, fresh, dead = register_all(sessions, [instance_rec(f"9.{n}") for n in range(3)])
        with sessions.begin() as session:
            repo.claim_instances(session, 1, "w", now=at(5), only_ids=[dead])
            assert repo.mark_queued(session, [fresh, dead], now=at(50)) == 1
        with sessions() as session:
            assert repo.instances_to_requeue(session, now=at(100), stale_seconds=60) == [
                stale,
                dead,
            ]
            assert repo.instances_to_requeue(
                session, now=at(100), stale_seconds=60, lease_seconds=120
            ) == [stale]

    # ------------------------------------------------------------- predictions

    def test_prediction_upsert_is_idempotent(self, sessions: sessionmaker[Session]) -> None:
        (iid,) = register_all(sessions, [instance_rec("10.1", number_of_frames=2)])
        frames = [prediction(iid, 0.6, frame=0), prediction(iid, 0.7, frame=1)]
        with sessions.begin() as session:
            repo.claim_instances(session, 1, "w", now=at(10))
            assert repo.save_predictions(session, frames, "w", now=at(11)) == 2
        with sessions.begin() as session:  # the task ran twice (acks_late)
            assert repo.save_predictions(session, frames, None, now=at(12)) == 2
            assert repo.save_predictions(session, frames[:1], None, now=at(13)) == 1
            repo.save_predictions(session, [prediction(iid, 0.1, version="v2")], None, now=at(14))

        def stored(session: Session) -> list[tuple[int, str, float]]:
            query = select(Prediction.frame_index, Prediction.model_version, Prediction.probability)
            return sorted(session.execute(query.where(Prediction.instance_id == iid)).tuples())

        with sessions() as session:
            assert stored(session) == [(0, "v1", 0.6), (0, "v2", 0.1)]
            study = session.scalars(select(Study)).one()
            assert (study.needs_finalise, study.prediction_epoch) == (True, 4)
            assert session.get_one(Instance, iid).state == "predicted"

        # New bytes under the same UID: predicted again, replacing the old row.
        with sessions.begin() as session:
            repo.register_instance(session, instance_rec("10.1", sha=SHA_B), now=at(20))
            assert session.get_one(Instance, iid).state == "received"
            assert repo.study_predictions(session, study.id, "v1").images == ()
            repo.claim_instances(session, 1, "w", now=at(21))
            repo.save_predictions(session, [prediction(iid, 0.9)], "w", now=at(22))
        with sessions() as session:
            assert stored(session) == [(0, "v1", 0.9), (0, "v2", 0.1)]

    # ------------------------------------------------------------- results

    def test_study_idle_counts_from_last_receipt(self, sessions: sessionmaker[Session]) -> None:
        # Received at 0 and 1, predicted only at 25 (a slow model): with 30 s
        # idle the study is due at 31 s after its last image, not 30 s after
        # its last prediction.
        ids = register_all(sessions, [instance_rec("12.1"), instance_rec("12.2")])
        predict_all(sessions, ids, 0.7, at(25))
        with sessions() as session:
            assert repo.studies_to_finalise(session, 30, now=at(30)) == []
            assert len(repo.studies_to_finalise(session, 30, now=at(32))) == 1

    def test_study_finalisation_and_revisions(self, sessions: sessionmaker[Session]) -> None:
        ids = register_all(
            sessions,
            [
                instance_rec("11.1", study="S1"),
                instance_rec("11.2", study="S1"),
                instance_rec("11.3", study="S2"),
                instance_rec("11.4", study="S2"),
            ],
        )
        predict_all(sessions, ids[:3], 0.8, at(10))  # 11.4 of S2 still waits
        with sessions() as session:
            assert repo.studies_to_finalise(session, 30, now=at(20)) == []
            (s1,) = repo.studies_to_finalise(session, 30, now=at(45))
            found = repo.study_predictions(session, s1)
        assert (found.study_instance_uid, found.model_version, found.epoch) == ("S1", "v1", 1)
        assert [p.instance_id for p in found.images] == ids[:2]
        assert found.images[0].probabilities == {"normal": pytest.approx(0.2), "thyroiditis": 0.8}

        args = ("v1", "mean", "thyroiditis", 0.8, {"normal": 0.2, "thyroiditis": 0.8}, 2)
        with sessions.begin() as session:
            first = repo.save_study_result(session, s1, *args, now=at(46), epoch=found.epoch)
            assert repo.studies_to_finalise(session, 30, now=at(100)) == []
            again = repo.save_study_result(session, s1, *args, now=at(47), epoch=found.epoch)
        assert (first.revision, first.key, first.level, first.patient_key) == (
            1,
            "S1",
            "study",
            "PAT-1",
        )
        assert again == first

        # A late image: a new prediction, and the result is recomputed as revision 2.
        (late,) = register_all(sessions, [instance_rec("11.5", study="S1")])
        predict_all(sessions, [late], 0.2, at(60))
        with sessions.begin() as session:
            assert repo.studies_to_finalise(session, 30, now=at(100)) == [s1]
            found = repo.study_predictions(session, s1)
            # Another prediction lands while this one is being aggregated.
            repo.save_predictions(session, [prediction(late, 0.3)], None, now=at(101))
            changed = (*args[:3], 0.6, {"normal": 0.4, "thyroiditis": 0.6}, 3)
            second = repo.save_study_result(session, s1, *changed, now=at(102), epoch=found.epoch)
        assert second.revision == 2
        with sessions() as session:
            assert session.get_one(Study, s1).needs_finalise is True  # not lost
            revisions = session.scalars(
                select(StudyResultRow.revision).where(StudyResultRow.study_id == s1)
            ).all()
            assert sorted(revisions) == [1, 2]
            with pytest.raises(RepositoryError):
                repo.save_study_result(session, 999_999, *args)

    def test_patient_results_and_result_queries(self, sessions: sessionmaker[Session]) -> None:
        ids = register_all(
            sessions,
            [
                instance_rec("12.1", study="S1", patient="P1"),
                instance_rec("12.2", study="S2", patient="P1", study_date=date(2025, 3, 1)),
                instance_rec("12.3", study="S3", patient="P2"),
            ],
        )
        predict_all(sessions, ids, 0.7, at(10))
        with sessions.begin() as session:
            p1 = session.scalars(select(Patient.id).where(Patient.patient_key == "P1")).one()
            found = repo.patient_predictions(session, p1)
            assert (found.patient_key, found.study_count, len(found.images)) == ("P1", 2, 2)
            probs = {"normal": 0.3, "thyroiditis": 0.7}
            first = repo.save_patient_result(
                session, p1, "v1", "mean", "thyroiditis", 0.7, probs, 2, 2, now=at(50)
            )
            same = repo.save_patient_result(
                session, p1, "v1", "mean", "thyroiditis", 0.7, probs, 2, 2, now=at(51)
            )
            other = repo.save_patient_result(
                session, p1, "v1", "max", "thyroiditis", 0.7, probs, 2, 2, now=at(52)
            )
            assert (first.revision, same.id, other.revision) == (1, first.id, 2)
            assert (other.level, other.key, other.study_count) == ("patient", "P1", 2)
            for study_uid in ("S1", "S2", "S3"):
                sid = session.scalars(
                    select(Study.id).where(Study.study_instance_uid == study_uid)
                ).one()
                repo.save_study_result(session, sid, "v1", "mean", "thyroiditis", 0.7, probs, 1)
            with pytest.raises(RepositoryError):
                repo.patient_predictions(session, 999_999)
        with sessions() as session:
            every = repo.results(session)
            assert [(r.level, r.key) for r in every] == [
                ("patient", "P1"),
                ("study", "S1"),
                ("study", "S2"),
                ("study", "S3"),
            ]
            assert every[0].revision == 2
            assert [r.key for r in repo.results(session, patient_key="P1")] == ["P1", "S1", "S2"]
            assert [r.key for r in repo.results(session, study_uid="S3")] == ["S3"]
            assert repo.results(session, patient_key="P2", study_uid="S1") == []

    # ------------------------------------------------------------- model versions

    def test_one_active_model(self, sessions: sessionmaker[Session]) -> None:
        with sessions.begin() as session:
            repo.upsert_model_version(session, model_rec("v1"), now=at(0))
            repo.upsert_model_version(session, model_rec("v2"), now=at(1))
            refreshed = repo.upsert_model_version(session, model_rec("v1", metrics={"auc": 0.95}))
            assert (refreshed.metrics, refreshed.status, refreshed.classes) == (
                {"auc": 0.95},
                "candidate",
                CLASSES,
            )
            assert repo.active_model(session) is None
            v1 = repo.set_active_model(session, "v1", now=at(5))
            assert (v1.status, v1.promoted_at) == ("active", at(5))
        with sessions.begin() as session:
            assert repo.set_active_model(session, "v2", now=at(6)).status == "active"
            assert repo.set_active_model(session, "v2", now=at(7)).promoted_at == at(6)
            active = repo.active_model(session)
            assert active is not None and active.version == "v2"
            assert [(m.version, m.status) for m in repo.list_model_versions(session)] == [
                ("v1", "retired"),
                ("v2", "active"),
            ]
            with pytest.raises(RepositoryError, match="unknown model version"):
                repo.set_active_model(session, "v9")
            with pytest.raises(RepositoryError):
                repo.upsert_model_version(session, model_rec("v3", status="active"))
            rejected = repo.set_model_status(session, "v1", "rejected", "AUC too low")
            assert (rejected.status, rejected.status_reason) == ("rejected", "AUC too low")
        with sessions() as session, pytest.raises(IntegrityError):  # the index, not the code
            session.execute(text("UPDATE model_versions SET status = 'active'"))
            session.flush()

    def test_study_predictions_default_to_the_active_model(
        self, sessions: sessionmaker[Session]
    ) -> None:
        (iid,) = register_all(sessions, [instance_rec("13.1")])
        with sessions.begin() as session:
            repo.claim_instances(session, 1, "w", now=at(1))
            repo.save_predictions(session, [prediction(iid, 0.9, version="v1")], "w", now=at(2))
            repo.save_predictions(session, [prediction(iid, 0.4, version="v2")], None, now=at(3))
            study_id = session.scalars(select(Study.id)).one()
            assert repo.study_predictions(session, study_id).model_version == "v2"
            repo.upsert_model_version(session, model_rec("v1"))
            repo.set_active_model(session, "v1")
            found = repo.study_predictions(session, study_id)
            assert (found.model_version, found.images[0].probability) == ("v1", 0.9)
            with pytest.raises(RepositoryError):
                repo.study_predictions(session, 999_999)

    # ------------------------------------------------------------- labels, hold-out

    def test_labels_keep_history_and_latest_wins(self, sessions: sessionmaker[Session]) -> None:
        register_all(sessions, [instance_rec("14.1", study="S1", patient="P1")])
        common = {"labelled_by": "dr-a", "source": "cli"}
        with sessions.begin() as session:
            repo.add_label(session, study_uid="S1", diagnosis="normal", now=at(1), **common)
            repo.add_label(session, study_uid="S1", diagnosis="thyroiditis", now=at(2), **common)
            repo.add_label(session, patient_key="P1", diagnosis="normal", now=at(3), **common)
            repo.add_label(
                session,
                study_uid="S1",
                diagnosis="thyroiditis",
                note="biopsy",
                now=at(4),
                allowed_diagnoses=CLASSES,
                **common,
            )
        with sessions() as session:
            latest = repo.latest_labels(session)
            assert [(r.level, r.key, r.diagnosis, r.note) for r in latest] == [
                ("patient", "P1", "normal", None),
                ("study", "S1", "thyroiditis", "biopsy"),
            ]
            assert [r.diagnosis for r in repo.label_history(session, study_uid="S1")] == [
                "normal",
                "thyroiditis",
                "thyroiditis",
            ]
            assert len(repo.label_history(session, patient_key="P1")) == 4
            bad: list[dict[str, Any]] = [
                {"study_uid": "nope", "diagnosis": "normal"},
                {"patient_key": "nobody", "diagnosis": "normal"},
                {"study_uid": "S1", "patient_key": "P1", "diagnosis": "normal"},
                {"diagnosis": "normal"},
                {"study_uid": "S1", "diagnosis": "goitre", "allowed_diagnoses": CLASSES},
            ]
            for kwargs in bad:
                with pytest.raises(RepositoryError):
                    repo.add_label(session, labelled_by="x", source="cli", **kwargs)

        # A radiologist's plain SQL insert works and, being the newest, wins.
        with sessions.begin() as session:
            sid = session.scalars(select(Study.id)).one()
            session.execute(
                text(
                    "INSERT INTO labels (study_id, diagnosis, labelled_by) "
                    "VALUES (:sid, 'normal', 'dr-b')"
                ),
                {"sid": sid},
            )
        with sessions() as session:
            newest = [r for r in repo.latest_labels(session) if r.level == "study"][0]
            assert (newest.diagnosis, newest.labelled_by, newest.source) == (
                "normal",
                "dr-b",
                "sql",
            )
            with pytest.raises(IntegrityError):  # neither a study nor a patient
                session.execute(
                    text("INSERT INTO labels (diagnosis, labelled_by) VALUES ('normal', 'x')")
                )

    def test_holdout_is_decided_once(self, sessions: sessionmaker[Session]) -> None:
        register_all(sessions, [instance_rec("15.1", patient="P1")])
        with sessions.begin() as session:
            assert repo.decide_holdout(session, "P1", True, now=at(1)) is True
            assert repo.decide_holdout(session, "P1", False, now=at(2)) is True
            with pytest.raises(RepositoryError):
                repo.decide_holdout(session, "P404", True)

    # ------------------------------------------------------------- views

    def test_views_return_rows(self, sessions: sessionmaker[Session]) -> None:
        ids = register_all(
            sessions,
            [
                instance_rec("16.1", study="S1", patient="P1"),
                instance_rec("16.2", study="S1", patient="P1"),
            ],
        )
        predict_all(sessions, ids, 0.9, at(10))
        probs = {"normal": 0.1, "thyroiditis": 0.9}
        with sessions.begin() as session:
            sid = session.scalars(select(Study.id)).one()
            pid = session.scalars(select(Patient.id)).one()
            repo.save_study_result(session, sid, "v1", "mean", "thyroiditis", 0.8, probs, 2)
            repo.save_study_result(session, sid, "v1", "mean", "thyroiditis", 0.9, probs, 2)
            repo.save_patient_result(session, pid, "v1", "mean", "thyroiditis", 0.9, probs, 2, 1)
            repo.add_label(
                session, patient_key="P1", diagnosis="normal", labelled_by="dr", source="csv"
            )
        with sessions() as session:

            def view(name: str) -> list[dict[str, Any]]:
                rows = session.execute(text(f"SELECT * FROM {name}")).mappings().all()
                return [dict(row) for row in rows]

            images = view("image_results")
            assert sorted(r["sop_instance_uid"] for r in images) == ["16.1", "16.2"]
            assert {(r["patient_key"], r["diagnosis"], r["model_version"]) for r in images} == {
                ("P1", "thyroiditis", "v1")
            }
            assert images[0]["accession_number"] == "ACC1"
            (study,) = view("study_results_latest")
            assert (study["study_instance_uid"], study["revision"], study["probability"]) == (
                "S1",
                2,
                0.9,
            )
            (patient,) = view("patient_results_latest")
            assert (patient["patient_key"], patient["study_count"]) == ("P1", 1)
            (label,) = view("study_labels_latest")
            assert (label["study_instance_uid"], label["diagnosis"], label["label_level"]) == (
                "S1",
                "normal",
                "patient",
            )
