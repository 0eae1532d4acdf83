"""The audit trail on SQLite: recording and listing, append-only triggers, the events
the repository writes itself, and the RFC 5424 syslog copy received on loopback UDP."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from tests.db_fixtures import T0, at, fresh_sqlite_url, instance_rec, migrated_engine, model_rec
from tests.db_fixtures import register_all as register
from thyrocad.audit_log import configure_audit_syslog, parse_target
from thyrocad.db import repository as repo
from thyrocad.db.engine import make_session_factory
from thyrocad.db.errors import RepositoryError
from thyrocad.db.records import AuditEvent
from thyrocad.settings import load_settings


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with migrated_engine(fresh_sqlite_url(tmp_path)) as engine:
        yield engine


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


def kinds(sessions: sessionmaker[Session], **filters: object) -> list[str]:
    with sessions() as session:
        return [e.kind for e in repo.audit_events(session, **filters)]  # type: ignore[arg-type]


def test_record_and_list_by_time_kind_and_limit(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        first = repo.record_audit_event(
            session, "association", actor="MODALITY1", details={"address": "10.0.0.5:4000"}, now=T0
        )
        repo.record_audit_events(
            session,
            [
                AuditEvent("instances_received", "MODALITY1", "success", {"stored": 5}, at(10)),
                AuditEvent("association", "EVIL", "refused", {"reason": "not allowed"}, at(20)),
                AuditEvent("results_read", "alice", details={"rows": 3}),
            ],
            now=at(30),
        )
    assert (first.at, first.kind, first.actor, first.outcome) == (
        T0,
        "association",
        "MODALITY1",
        "success",
    )
    with sessions() as session:
        every = repo.audit_events(session)
        assert [(e.kind, e.at) for e in every] == [
            ("association", T0),
            ("instances_received", at(10)),
            ("association", at(20)),
            ("results_read", at(30)),
        ]
        assert every[1].details == {"stored": 5}
        assert every[2].outcome == "refused"
    assert kinds(sessions, kind="association") == ["association", "association"]
    assert kinds(sessions, since=at(10)) == ["instances_received", "association", "results_read"]
    # The newest N, still oldest first.
    assert kinds(sessions, limit=2) == ["association", "results_read"]
    assert kinds(sessions, since=at(31)) == []


def test_bad_events_are_refused(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        for bad in (
            AuditEvent("association", "X", "maybe"),  # type: ignore[arg-type]
            AuditEvent("", "X"),
            AuditEvent("label_written", ""),
            AuditEvent("results_read", "alice", details={"patient_key": "P1"}),
            AuditEvent("results_read", "alice", details={"PatientName": "Doe"}),
        ):
            with pytest.raises(RepositoryError):
                repo.record_audit_events(session, [bad])
        with pytest.raises(RepositoryError):
            repo.audit_events(session, limit=0)
    assert kinds(sessions) == []


def test_audit_rows_cannot_be_changed_or_deleted(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        repo.record_audit_event(session, "refit", actor="worker", now=T0)
    for statement in (
        "UPDATE audit_events SET actor = 'someone else'",
        "DELETE FROM audit_events",
    ):
        with engine.connect() as connection, pytest.raises(DBAPIError, match="append-only"):
            connection.execute(text(statement))
    with sessions() as session:
        (event,) = repo.audit_events(session)
        assert event.actor == "worker"


def test_repository_writes_audit_events_in_the_callers_transaction(
    sessions: sessionmaker[Session],
) -> None:
    register(sessions, [instance_rec("40.1", study="S1", patient="PAT-AUDIT-77")])
    with sessions.begin() as session:
        repo.upsert_model_version(session, model_rec("v1"))
        repo.upsert_model_version(session, model_rec("v2"))
        repo.set_active_model(session, "v1", actor="ml-owner", now=at(1))
        repo.set_active_model(session, "v2", actor="ml-owner", now=at(2))
        repo.set_active_model(session, "v1", actor="ml-owner", now=at(3), rollback=True)
        repo.set_model_status(session, "v2", "rejected", "rolled back", actor="ml-owner")
        repo.add_label(
            session,
            patient_key="PAT-AUDIT-77",
            diagnosis="normal",
            labelled_by="dr-a",
            source="cli",
            now=at(4),
        )
        repo.upsert_backfill_item(session, "ARCHIVE", "S9", 3)
        repo.set_backfill_state(session, "ARCHIVE", "S9", "requested", requested_at=at(5))
        repo.set_backfill_state(session, "ARCHIVE", "S9", "received", received_count=3)
    # A transaction that rolls back takes its audit events with it.
    with sessions() as session:
        repo.add_label(session, study_uid="S1", diagnosis="x", labelled_by="dr-b", source="cli")
        session.rollback()
    with sessions() as session:
        events = sorted(repo.audit_events(session), key=lambda e: e.id)
    assert [(e.kind, e.actor) for e in events[:5]] == [
        ("model_promoted", "ml-owner"),
        ("model_promoted", "ml-owner"),
        ("model_rolled_back", "ml-owner"),
        ("model_status", "ml-owner"),
        ("label_written", "dr-a"),
    ]
    assert events[1].details == {"version": "v2", "previous": "v1", "changed": True}
    assert events[2].details == {"version": "v1", "previous": "v2", "changed": True}
    assert events[3].details == {"version": "v2", "status": "rejected", "reason": "rolled back"}
    assert events[4].details["level"] == "patient"
    (retrieve,) = [e for e in events if e.kind == "backfill_retrieve"]
    assert retrieve.details["source_aet"] == "ARCHIVE"
    assert retrieve.actor == repo.default_actor()  # nobody named: the OS user
    assert len(events) == 6, events  # a state change without a request is no event
    assert "PAT-AUDIT-77" not in repr(events) and "S9" not in repr(events)


def test_sr_dispatch_sent_or_failed_is_audited(sessions: sessionmaker[Session]) -> None:
    (iid,) = register(sessions, [instance_rec("41.1", study="S1")])
    with sessions.begin() as session:
        study_id = session.execute(text("SELECT id FROM studies")).scalar_one()
        result = repo.save_study_result(
            session, study_id, "v1", "mean", "normal", 0.2, {"normal": 0.8}, 1
        )
        repo.save_sr_dispatch(session, result.id, "PACS", "1.2.3", "pending")
        repo.save_sr_dispatch(session, result.id, "PACS", "1.2.3", "failed", reason="refused")
        repo.save_sr_dispatch(
            session, result.id, "PACS", "1.2.3", "sent", dimse_status=0, actor="worker@node"
        )
    with sessions() as session:
        events = repo.audit_events(session, kind="sr_sent")
    assert [(e.outcome, e.details["reason"]) for e in events] == [
        ("failure", "refused"),
        ("success", None),
    ]
    assert events[1].actor == "worker@node"
    assert events[1].details["destination"] == "PACS" and iid


# --------------------------------------------------------------------------- syslog

_RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) "
    r"(?P<msgid>\S+) (?P<sd>(?:\[[^ \]]+(?: [^=]+=\"(?:[^\"\\\]]|\\.)*\")*\])+) "
    "\ufeff(?P<msg>.*)$"
)
_SD_ELEMENT = re.compile(r"\[(?P<id>[^ \]]+)(?P<params>(?: [^=]+=\"(?:[^\"\\\]]|\\.)*\")*)\]")
_SD_PARAM = re.compile(r" (?P<name>[^=]+)=\"(?P<value>(?:[^\"\\\]]|\\.)*)\"")


def parse_rfc5424(datagram: bytes) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """The header fields and the structured data ({SD-ID: {name: value}}) of a message."""
    match = _RFC5424.match(datagram.decode("utf-8"))
    assert match, datagram
    elements = {}
    for element in _SD_ELEMENT.finditer(match["sd"]):
        elements[element["id"]] = {
            p["name"]: re.sub(r"\\(.)", r"\1", p["value"])
            for p in _SD_PARAM.finditer(element["params"])
        }
    return match.groupdict(), elements


@pytest.fixture
def syslog_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    handler = configure_audit_syslog(f"udp://127.0.0.1:{sock.getsockname()[1]}", hostname="h1")
    assert handler is not None
    try:
        yield sock
    finally:
        configure_audit_syslog(None)
        sock.close()


def test_committed_events_go_to_syslog_in_rfc5424(
    sessions: sessionmaker[Session], syslog_socket: socket.socket
) -> None:
    with sessions() as session:
        repo.record_audit_event(session, "label_written", actor="dr-rolled-back")
        session.rollback()  # never committed: never sent
    with sessions.begin() as session:
        recorded = repo.record_audit_event(
            session,
            "association",
            actor="MODALITY 1",
            outcome="refused",
            details={"reason": 'called "X" ] \\ not ours', "address": "10.0.0.5:4000", "n": 2},
            now=T0 + timedelta(microseconds=123456),
        )
        repo.record_audit_event(session, "refit", actor="worker", details={"m": {"auc": 0.9}})
    header, sd = parse_rfc5424(syslog_socket.recv(65535))
    # authpriv (10) * 8 + warning (4): a refusal is a warning.
    assert header["pri"] == "84"
    assert header["ts"] == "2025-03-01T08:00:00.123456Z"
    assert (header["host"], header["app"], header["msgid"]) == ("h1", "thyrocad", "association")
    assert header["procid"].isdigit()
    assert sd["audit@32473"] == {
        "id": str(recorded.id),
        "kind": "association",
        "actor": "MODALITY 1",
        "outcome": "refused",
    }
    assert sd["details@32473"] == {
        "reason": 'called "X" ] \\ not ours',
        "address": "10.0.0.5:4000",
        "n": "2",
    }
    assert header["msg"] == "association refused by MODALITY 1"
    header, sd = parse_rfc5424(syslog_socket.recv(65535))
    assert (header["pri"], header["msgid"]) == ("86", "refit")  # info
    assert sd["details@32473"] == {"m": '{"auc":0.9}'}
    syslog_socket.settimeout(0.3)
    with pytest.raises(TimeoutError):  # the rolled-back label never went out
        syslog_socket.recv(65535)


def test_syslog_targets() -> None:
    assert parse_target("udp://siem.example:5514") == ("siem.example", 5514)
    assert parse_target("udp://[::1]") == ("::1", 514)
    assert parse_target("unix:///dev/log") == "/dev/log"
    assert parse_target("/run/syslog.sock") == "/run/syslog.sock"
    for bad in ("tcp://siem:514", "siem:514", "udp://"):
        with pytest.raises(ValueError, match="audit syslog"):
            parse_target(bad)
        with pytest.raises(ValidationError, match="THYROCAD_AUDIT_SYSLOG"):
            load_settings(audit_syslog=bad)
    assert load_settings(audit_syslog=" udp://[::1]:5514 ").audit_syslog == "udp://[::1]:5514"


def test_a_backfill_run_is_audited_from_start_to_end(sessions: sessionmaker[Session]) -> None:
    from tests.unit.test_backfill import ScriptedArchive, found
    from tests.unit.test_backfill import run as backfill

    archive = ScriptedArchive(sessions, [found(1), found(2)])
    archive.script[found(2).study_instance_uid] = "fail"
    _, report = backfill(archive, sessions)
    assert report.counts.failed == 1
    with sessions() as session:
        events = [e for e in repo.audit_events(session) if e.kind.startswith("backfill")]
    assert [e.kind for e in events] == [
        "backfill_started",
        "backfill_retrieve",
        "backfill_retrieve",
        "backfill_finished",
    ]
    started, finished = events[0], events[-1]
    assert started.details == {"source_aet": "ARCH", "found": 2, "to_retrieve": 2}
    assert finished.outcome == "failure"
    assert (finished.details["requested"], finished.details["failed"]) == (2, 1)
    assert finished.details["interrupted"] is False
    assert not any(s.study_instance_uid in repr(events) for s in archive.studies)


# --------------------------------------------------------------------------- the command


def test_audit_command_lists_filters_and_says_when_empty(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from thyrocad.cli import app
    from thyrocad.db.engine import make_engine, upgrade

    url = f"sqlite:///{tmp_path / 'thyrocad.sqlite'}"
    upgrade(url)

    def audit(*args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(
            app,
            ["audit", *args],
            env={"THYROCAD_DATA_DIR": str(tmp_path), "DATABASE_URL": ""},
            catch_exceptions=False,
        )
        return result.exit_code, result.stdout, result.stderr

    assert audit()[:2] == (0, "no audit events\n")
    engine = make_engine(url)
    with make_session_factory(engine).begin() as session:
        repo.record_audit_event(session, "association", actor="MODALITY1", now=T0)
        repo.record_audit_event(
            session,
            "results_read",
            actor="alice",
            details={"query": "results", "rows": 3},
            now=at(60),
        )
    engine.dispose()
    code, out, err = audit()
    assert code == 0 and "database:" in err
    assert "2025-03-01 08:00:00" in out and "MODALITY1" in out
    assert "query=results, rows=3" in out
    _, out, _ = audit("--kind", "results_read", "--json")
    (only,) = json.loads(out)
    assert (only["actor"], only["details"]) == ("alice", {"query": "results", "rows": 3})
    _, out, _ = audit("--since", "2025-03-01T08:00:30", "--json")
    assert [e["kind"] for e in json.loads(out)] == ["results_read"]
    _, out, _ = audit("--since", "2025-03-02")
    assert out.startswith("no audit events")
    code, _, err = audit("--since", "yesterday")
    assert code == 1 and "--since 'yesterday'" in err


def test_a_closed_refit_is_audited_once(sessions: sessionmaker[Session]) -> None:
    from thyrocad.worker import learning_store as store

    with sessions.begin() as session:
        run_id = store.start_run(session, {"trigger": "test"}, T0)
        assert store.finish_run(session, run_id, "failed", "too few labels", at(2), duration_s=2.04)
        assert not store.finish_run(session, run_id, "failed", "again", at(3))  # not running
    with sessions() as session:
        (refit,) = repo.audit_events(session, kind="refit")
    assert (refit.outcome, refit.at) == ("failure", at(2))
    assert refit.details == {
        "training_run_id": run_id,
        "result": "failed",
        "candidate_version": None,
        "duration_s": 2.0,
        "reason": "too few labels",
    }
