"""The SQL of continuous learning on SQLite (the embedded default): runs, labels, rescore."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from tests.db_fixtures import (
    at,
    fresh_sqlite_url,
    instance_rec,
    migrated_engine,
    model_rec,
    prediction,
    register_all,
)
from thyrocad.db import repository as repo
from thyrocad.db.engine import make_session_factory
from thyrocad.worker import learning_store as store


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    with migrated_engine(fresh_sqlite_url(tmp_path)) as engine:
        yield make_session_factory(engine)


def test_one_running_run_at_a_time(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        first = store.start_run(session, {"label_watermark": 3}, at(0))
    with pytest.raises(IntegrityError), sessions.begin() as session:
        store.start_run(session, {}, at(1))
    with sessions.begin() as session:
        assert [r.id for r in store.running_runs(session)] == [first]
        assert store.finish_run(session, first, "candidate", "not better", at(5), duration_s=5.0)
        assert not store.finish_run(session, first, "failed", "late", at(6))  # closed already
        second = store.start_run(session, {"label_watermark": 7}, at(7))
        assert store.last_completed_watermark(session) == 3
    with sessions.begin() as session:
        store.finish_run(session, second, "failed", "boom", at(8))
        # A failed run trained on nothing: the watermark stays at the last model.
        assert store.last_completed_watermark(session) == 3
        runs = store.training_runs(session)
    assert [(r.id, r.outcome, r.reason) for r in runs] == [
        (second, "failed", "boom"),
        (first, "candidate", "not better"),
    ]


def test_refit_decisions_queue_up_on_sqlite(sessions: sessionmaker[Session]) -> None:
    seen: list[int] = []

    def second_decider() -> None:
        with sessions.begin() as session:
            store.lock_refit_decisions(session)
            seen.append(len(store.running_runs(session)))

    with sessions.begin() as first:
        store.lock_refit_decisions(first)
        waiter = threading.Thread(target=second_decider)
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive()  # waits for the first decision, does not fail
        store.start_run(first, {}, at(0))
    waiter.join(timeout=30)
    assert seen == [1]  # it saw the run the first decider started


def test_stale_running_run_is_closed_as_failed(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        run = store.start_run(session, {}, at(0))
    with sessions.begin() as session:
        assert store.close_stale_runs(session, at(0) + timedelta(seconds=50), 100) == []
        closed = store.close_stale_runs(session, at(0) + timedelta(seconds=150), 100)
    assert [r.id for r in closed] == [run]
    with sessions.begin() as session:
        (record,) = store.training_runs(session)
        assert record.outcome == "failed"
        assert "abandoned" in (record.reason or "")
        store.start_run(session, {}, at(200))  # the field is free again


def test_labelled_images_follow_the_label_in_force(sessions: sessionmaker[Session]) -> None:
    ids = register_all(
        sessions,
        [
            instance_rec("5.1", study="1.1", patient="P1"),
            instance_rec("5.2", study="1.1", patient="P1"),
            instance_rec("5.3", study="1.2", patient="P1"),
            instance_rec("5.4", study="2.1", patient="P2"),
            instance_rec("5.5", study="3.1", patient="P3"),
        ],
    )
    with sessions.begin() as session:
        repo.mark_rejected(session, ids[1], "undecodable")
        first = repo.add_label(
            session, patient_key="P1", diagnosis="normal", labelled_by="a", source="t", now=at(10)
        )
        # The study's own label wins over its patient's.
        repo.add_label(
            session, study_uid="1.2", diagnosis="autoimmune", labelled_by="a", source="t"
        )
        repo.add_label(
            session, study_uid="2.1", diagnosis="normal", labelled_by="b", source="t", now=at(12)
        )
        images = store.labelled_images(session)
        assert store.label_watermark(session) == first + 2
        assert store.patients_labelled_after(session, 0) == {"P1", "P2"}
        assert store.patients_labelled_after(session, first) == {"P1", "P2"}
        assert store.patients_labelled_after(session, first + 1) == {"P2"}
    assert [(i.instance_id, i.patient_key, i.study_uid, i.diagnosis) for i in images] == [
        (ids[0], "P1", "1.1", "normal"),  # 5.2 is rejected: not trainable
        (ids[2], "P1", "1.2", "autoimmune"),
        (ids[3], "P2", "2.1", "normal"),
    ]


def test_rescore_marks_and_tracks_progress(sessions: sessionmaker[Session]) -> None:
    ids = register_all(
        sessions,
        [
            instance_rec("6.1", study="7.1", patient="P1"),
            instance_rec("6.2", study="7.1", patient="P1"),
            instance_rec("6.3", study="7.2", patient="P2"),
        ],
    )
    with sessions.begin() as session:
        repo.upsert_model_version(session, model_rec("v1"))
        repo.upsert_model_version(session, model_rec("v2"))
        repo.set_active_model(session, "v1", at(0))
        claimed = repo.claim_instances(session, 10, "w", at(1))
        assert len(claimed) == 3
        repo.save_predictions(session, [prediction(i, version="v1") for i in ids], "w", at(2))
        for study_id in {c.study_id for c in claimed}:
            repo.save_study_result(session, study_id, "v1", "mean", "x", 0.8, {"x": 0.8}, 2)
        repo.set_active_model(session, "v2", at(3))
        # Study 7.1 only: received at t=0 and t=1; 7.2 at t=2.
        assert store.studies_to_rescore(session, None, "7.1") == [claimed[0].study_id]
        assert len(store.studies_to_rescore(session, at(0), None)) == 2
        assert store.studies_to_rescore(session, at(3), None) == []
        studies = store.studies_to_rescore(session, at(0), None)
        queued = store.mark_for_rescore(session, studies, "v2", at(4))
    assert queued == sorted(ids)
    with sessions.begin() as session:
        assert repo.instance_counts(session)["queued"] == 3
        again = store.mark_for_rescore(session, studies, "v2", at(5))
        assert again == []  # already queued: nothing more to send
        state = store.rescore_progress(session, studies, "v2")
        assert (state.instances_done, state.studies_done) == (0, 0)
        repo.claim_instances(session, 10, "w2", at(6))
        repo.save_predictions(session, [prediction(i, version="v2") for i in ids], "w2", at(7))
        state = store.rescore_progress(session, studies, "v2")
        assert (state.instances_total, state.instances_done, state.studies_done) == (3, 3, 0)
        for study_id in studies:
            repo.save_study_result(session, study_id, "v2", "mean", "x", 0.6, {"x": 0.6}, 2)
        state = store.rescore_progress(session, studies, "v2")
        assert (state.studies_total, state.studies_done) == (2, 2)
        # Instances predicted by v2 already are not sent again.
        assert store.mark_for_rescore(session, studies, "v2", at(8)) == []
