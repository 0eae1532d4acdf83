"""The archive without a network: filters, status reasons, rate limit, backfill bookkeeping.

The backfill runs against a scripted archive that "sends" by registering
instances in SQLite, as the listener would; the real archive is in
tests/integration/test_archive.py.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.db_fixtures import at, fresh_sqlite_url, instance_rec, migrated_engine, predict_all
from thyrocad.db import repository as repo
from thyrocad.db.engine import make_session_factory
from thyrocad.db.errors import RepositoryError
from thyrocad.db.schema import Study
from thyrocad.pacs.archive import (
    FoundStudy,
    RateLimiter,
    RetrieveOutcome,
    StudyFilter,
    date_windows,
    destination_hint,
    status_reason,
    wildcard_match,
)
from thyrocad.pacs.backfill import Backfill, BackfillOptions, BackfillReport
from thyrocad.pacs.sender import Peer

# --------------------------------------------------------------------------- pure helpers


def test_date_windows_cover_the_range_once() -> None:
    windows = list(date_windows(dt.date(2020, 1, 1), dt.date(2020, 3, 10), days=31))
    assert windows[0] == (dt.date(2020, 1, 1), dt.date(2020, 1, 31))
    assert windows[-1][1] == dt.date(2020, 3, 10)
    days = sum((end - start).days + 1 for start, end in windows)
    assert days == (dt.date(2020, 3, 10) - dt.date(2020, 1, 1)).days + 1
    assert list(date_windows(dt.date(2020, 1, 2), dt.date(2020, 1, 1))) == []


def test_wildcards_are_dicom_ones_and_case_insensitive() -> None:
    assert wildcard_match("*THYROID*", "US Thyroid left")
    assert wildcard_match("us ?hyroid", "US THYROID")
    assert not wildcard_match("*THYROID", "thyroid left")
    assert wildcard_match("[a]*", "[A] thyroid")  # brackets are plain characters


@pytest.mark.parametrize(
    ("status", "counts", "expected"),
    [
        (0x0000, (5, 0, 0), None),
        (0x0000, (4, 1, 0), "partial: 4 sent, 1 failed"),
        (0x0000, (0, 0, 0), "sent no instance"),
        (0xB000, (3, 2, 0), "warning 0xB000"),
        (0xA801, (0, 0, 0), "does not know the move destination 'THYROCAD'"),
        (0xA702, (0, 0, 0), "out of resources"),
        (0xC001, (0, 0, 0), "0xC001: archive unable to process"),
        (0xFE00, (2, 0, 0), "cancelled"),
        (None, (2, 0, 0), "no final response from the archive within 30 s"),
    ],
)
def test_status_reasons_say_what_happened(
    status: int | None, counts: tuple[int, int, int], expected: str | None
) -> None:
    reason = status_reason("C-MOVE", status, *counts, destination="THYROCAD", timeout=30)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


def test_a_move_refused_before_any_instance_hints_at_an_unknown_destination() -> None:
    hint = destination_hint(0xC000, 0, 0, "THYROCAD")
    assert hint is not None and "move destination 'THYROCAD'" in hint and "--get" in hint
    assert destination_hint(0xC000, 2, 1, "THYROCAD") is None  # it did reach us
    assert destination_hint(0xC000, 0, 0, None) is None  # C-GET
    outcome = RetrieveOutcome("1.2", status=0xC000, reason="C-MOVE failed", hint=hint)
    assert outcome.explained == f"C-MOVE failed; {hint}"


def test_rate_limiter_spaces_requests_and_stops() -> None:
    limiter, stop = RateLimiter(20.0), threading.Event()
    start = time.monotonic()
    for _ in range(5):
        assert limiter.wait(stop)
    assert time.monotonic() - start >= 0.19
    stop.set()
    assert not RateLimiter(0.1).wait(stop)


# --------------------------------------------------------------------------- repository


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    with migrated_engine(fresh_sqlite_url(tmp_path)) as engine:
        yield make_session_factory(engine)


def test_backfill_items_are_upserted_and_keep_their_state(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as s:
        item = repo.upsert_backfill_item(s, "ARCH", "1.2.3", 5, now=at(0))
        assert (item.state, item.expected_count, item.received_count) == ("found", 5, 0)
        repo.set_backfill_state(s, "ARCH", "1.2.3", "failed", reason="refused", now=at(1))
        again = repo.upsert_backfill_item(s, "ARCH", "1.2.3", None, now=at(2))
        assert (again.state, again.reason, again.expected_count) == ("failed", "refused", 5)
        repo.upsert_backfill_item(s, "OTHER", "1.2.3", 2, now=at(2))
        assert [i.source_aet for i in repo.backfill_items(s, "ARCH")] == ["ARCH"]
        with pytest.raises(RepositoryError):
            repo.set_backfill_state(s, "ARCH", "1.2.3", "bogus")


def test_study_progress_tells_registered_and_classified(sessions: sessionmaker[Session]) -> None:
    study = "1.2.826.0.1.55"
    with sessions.begin() as s:
        ids = [
            repo.register_instance(
                s, instance_rec(f"{study}.{n}", study=study), now=at(n)
            ).instance_id
            for n in (1, 2)
        ]
        p = repo.study_progress(s, [study, "9.9.9"])
    assert set(p) == {study}
    assert (p[study].registered, p[study].unsettled, p[study].classified) == (2, 2, False)
    predict_all(sessions, ids, 0.7, at(5))
    with sessions.begin() as s:
        assert not repo.study_progress(s, [study])[study].classified  # no result yet
        _save_result(s, study, 0.7)
        done = repo.study_progress(s, [study])[study]
    assert done.classified and done.predicted == 2 and done.result_revision == 1


def _save_result(s: Session, study: str, probability: float) -> int:
    study_id = s.execute(select(Study.id).where(Study.study_instance_uid == study)).scalar_one()
    return repo.save_study_result(
        s,
        study_id=study_id,
        model_version="v1",
        rule="mean",
        label="thyroiditis",
        probability=probability,
        probabilities={"normal": 1 - probability, "thyroiditis": probability},
        image_count=2,
        now=at(10),
    ).id


def test_pending_reports_of_old_results_are_found_for_requeueing(
    sessions: sessionmaker[Session],
) -> None:
    study = "1.2.826.0.1.56"
    with sessions.begin() as s:
        ids = [
            repo.register_instance(
                s, instance_rec(f"{study}.1", study=study), now=at(1)
            ).instance_id
        ]
    predict_all(sessions, ids, 0.7, at(5))
    with sessions.begin() as s:
        result_id = _save_result(s, study, 0.7)  # created at(10)
        repo.save_sr_dispatch(s, result_id, "PACS@h:104", "1.2.3.4", "pending", reason="queued")
    with sessions() as s:
        assert repo.pending_sr_dispatches(s, at(5)) == []  # the result is too recent
        found = repo.pending_sr_dispatches(s, at(20))
    assert [(d.study_result_id, d.status) for d in found] == [(result_id, "pending")]
    with sessions.begin() as s:
        repo.save_sr_dispatch(s, result_id, "PACS@h:104", "1.2.3.4", "sent", dimse_status=0)
    with sessions() as s:
        assert repo.pending_sr_dispatches(s, at(20)) == []


# --------------------------------------------------------------------------- backfill


class ScriptedArchive:
    """Lists ``studies``; a retrieve registers their instances as the listener would,
    or fails as scripted (``fail``: nothing sent; ``partial``: one instance short)."""

    peer = Peer("127.0.0.1", 104, "ARCH")
    name = "ARCH@127.0.0.1:104"

    def __init__(self, sessions: sessionmaker[Session], studies: list[FoundStudy]) -> None:
        self.sessions = sessions
        self.studies = studies
        self.script: dict[str, str] = {}
        self.requested: list[str] = []

    def find_studies(self, flt: StudyFilter) -> list[FoundStudy]:
        return [s for s in self.studies if s.study_date and flt.since <= s.study_date]

    def move_study(self, study: FoundStudy, destination: str) -> RetrieveOutcome:
        uid = study.study_instance_uid
        self.requested.append(uid)
        mode = self.script.get(uid, "ok")
        if mode == "fail":
            return RetrieveOutcome(uid, reason="C-MOVE failed 0xA801: unknown destination")
        count = (study.instance_count or 0) - (1 if mode in ("partial", "aborted") else 0)
        with self.sessions.begin() as s:
            for n in range(count):
                repo.register_instance(s, instance_rec(f"{uid}.{n}", study=uid))
        if mode == "partial":
            return RetrieveOutcome(uid, count, 1, 0, 0xB000, "C-MOVE warning 0xB000: 1 failed")
        if mode == "aborted":  # a failure whose final response counts nothing (Orthanc)
            return RetrieveOutcome(uid, status=0xC000, reason="C-MOVE failed 0xC000", hint="h")
        return RetrieveOutcome(uid, count, 0, 0, 0x0000, None)

    def abort_all(self) -> None:
        pass


def found(n: int, count: int = 2) -> FoundStudy:
    return FoundStudy(f"1.2.826.0.1.7{n}", dt.date(2025, 1, n), ("US",), count)


def run(
    archive: ScriptedArchive, sessions: sessionmaker[Session], **options: object
) -> tuple[Backfill, BackfillReport]:
    opts = BackfillOptions(
        destination_aet="THYROCAD",
        rate=0,
        concurrency=2,
        wait_classified=False,
        wait_seconds=5,
        poll_seconds=0.05,
    )
    job = Backfill(archive, sessions, replace(opts, **options))  # type: ignore[arg-type]
    return job, job.run(StudyFilter(dt.date(2025, 1, 1)))


def test_backfill_requests_what_is_missing_and_a_rerun_requests_nothing(
    sessions: sessionmaker[Session],
) -> None:
    archive = ScriptedArchive(sessions, [found(1), found(2), found(3)])
    _, report = run(archive, sessions)
    assert sorted(archive.requested) == [s.study_instance_uid for s in archive.studies]
    assert report.counts.requested == 3 and report.counts.received == 3
    with sessions() as s:
        assert {i.state for i in repo.backfill_items(s, "ARCH")} == {"received"}

    archive.requested.clear()
    _, again = run(archive, sessions)
    assert archive.requested == []
    assert again.counts.present == 3 and again.counts.requested == 0


def test_a_study_already_classified_is_skipped(sessions: sessionmaker[Session]) -> None:
    study = found(1)
    with sessions.begin() as s:
        ids = [
            repo.register_instance(
                s, instance_rec(f"{study.study_instance_uid}.{n}", study=study.study_instance_uid)
            ).instance_id
            for n in range(2)
        ]
    predict_all(sessions, ids, 0.9, at(1))
    with sessions.begin() as s:
        _save_result(s, study.study_instance_uid, 0.9)
    archive = ScriptedArchive(sessions, [study, found(2)])
    _, report = run(archive, sessions, wait_classified=True, wait_seconds=0.3)
    assert archive.requested == [found(2).study_instance_uid]
    lines = {line.study_instance_uid: line for line in report.studies}
    assert lines[study.study_instance_uid].action == "skipped"
    assert lines[study.study_instance_uid].state == "classified"
    # The other one arrived but no worker classifies it here: it says so.
    waiting = lines[found(2).study_instance_uid]
    assert waiting.state == "received" and "not classified within" in str(waiting.reason)
    assert report.timed_out


def test_failures_are_recorded_per_study_and_the_rest_goes_on(
    sessions: sessionmaker[Session],
) -> None:
    archive = ScriptedArchive(sessions, [found(1), found(2), found(3, count=3), found(4, count=3)])
    archive.script = {
        found(1).study_instance_uid: "fail",
        found(3).study_instance_uid: "partial",
        found(4).study_instance_uid: "aborted",
    }
    _, report = run(archive, sessions)
    with sessions() as s:
        items = {i.study_instance_uid: i for i in repo.backfill_items(s, "ARCH")}
    assert items[found(1).study_instance_uid].state == "failed"
    assert "0xA801" in str(items[found(1).study_instance_uid].reason)
    assert items[found(2).study_instance_uid].state == "received"
    assert items[found(3).study_instance_uid].state == "partial"
    assert "0xB000" in str(items[found(3).study_instance_uid].reason)
    # Failed, but two of its three instances came: partial, without the destination hint.
    aborted = items[found(4).study_instance_uid]
    assert aborted.state == "partial" and aborted.received_count == 2
    assert aborted.reason == "C-MOVE failed 0xC000 (after 2 arrived)"
    assert report.counts.failed == 3
    # The next run asks again for the failed and the partial studies only.
    archive.script, archive.requested = {}, []
    run(archive, sessions)
    assert sorted(archive.requested) == sorted(
        [found(1).study_instance_uid, found(3).study_instance_uid, found(4).study_instance_uid]
    )


def test_a_dry_run_changes_nothing(sessions: sessionmaker[Session]) -> None:
    archive = ScriptedArchive(sessions, [found(1), found(2)])
    _, report = run(archive, sessions, dry_run=True)
    assert archive.requested == []
    assert report.counts.found == 2
    with sessions() as s:
        assert repo.backfill_items(s, "ARCH") == []
