"""Structured Reports: content, identity per revision, reading back, sending and its statuses."""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ComprehensiveSRStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage as ComprehensiveSRClass  # type: ignore

from tests.db_fixtures import at, fresh_sqlite_url, instance_rec, migrated_engine, model_rec
from tests.procs import free_port
from thyrocad.db import repository as repo
from thyrocad.db.engine import make_session_factory
from thyrocad.pacs.sender import Peer
from thyrocad.pacs.structured_report import (
    FINDING_CODES,
    STATEMENT,
    ImageFinding,
    ReportContent,
    StudyHeader,
    build_report,
    read_report,
    report_uids,
    store_report,
)
from thyrocad.settings import load_settings

US = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
STUDY = "1.2.826.0.1.3680043.10.1"
CREATED = dt.datetime(2026, 3, 1, 9, 30, tzinfo=dt.UTC)


def content(**changes: Any) -> ReportContent:
    images = (
        ImageFinding(US, f"{STUDY}.1.1", f"{STUDY}.1", "autoimmune", 0.912345678901234),
        ImageFinding(US, f"{STUDY}.1.2", f"{STUDY}.1", "normal", 0.25),
        ImageFinding(US_MULTIFRAME, f"{STUDY}.2.1", f"{STUDY}.2", "autoimmune", 0.7, 12),
    )
    base = ReportContent(
        study=StudyHeader(
            STUDY,
            patient_id="PAT-7",
            patient_name="Doe^Jane",
            patient_birth_date="19700102",
            patient_sex="F",
            study_date="20260227",
            accession_number="ACC7",
        ),
        label="autoimmune",
        probability=0.6207818930041152,
        positive_class="autoimmune",
        images=images,
        model_name="thyrocad vgg19",
        model_version="vgg19-20260301-abcdef",
        rule="mean",
        revision=1,
        result_created_at=CREATED,
    )
    return replace(base, **changes)


def roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def test_the_report_says_finding_probability_images_and_algorithm() -> None:
    ds = roundtrip(build_report(content()))
    parsed = read_report(ds)
    assert ds.SOPClassUID == ComprehensiveSRStorage
    assert ds.Modality == "SR"
    assert ds.StudyInstanceUID == STUDY  # the same study as the images
    assert (ds.PatientID, str(ds.PatientName), ds.AccessionNumber) == ("PAT-7", "Doe^Jane", "ACC7")
    assert parsed.finding == "Autoimmune thyroiditis"
    assert parsed.probability == pytest.approx(0.6207818930041152, abs=1e-12)
    assert [(i.sop_class_uid, i.sop_instance_uid) for i in parsed.images] == [
        (US, f"{STUDY}.1.1"),
        (US, f"{STUDY}.1.2"),
        (US_MULTIFRAME, f"{STUDY}.2.1"),
    ]
    assert [i.finding for i in parsed.images] == [
        "Autoimmune thyroiditis",
        "Normal",
        "Autoimmune thyroiditis",
    ]
    assert [i.probability for i in parsed.images] == pytest.approx([0.912345678901234, 0.25, 0.7])
    assert [i.frame_numbers for i in parsed.images] == [(), (), (12,)]
    assert (parsed.algorithm_name, parsed.algorithm_version) == (
        "thyrocad vgg19",
        "vgg19-20260301-abcdef",
    )
    # Every referenced image is listed as evidence of this study.
    evidence = {
        str(sop.ReferencedSOPInstanceUID)
        for item in ds.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert evidence == {i.sop_instance_uid for i in content().images}


def test_the_report_says_it_is_computer_generated_and_not_reviewed() -> None:
    ds = roundtrip(build_report(content()))
    parsed = read_report(ds)
    assert parsed.statements == (STATEMENT,)
    assert "not reviewed" in STATEMENT.lower() and "computer-generated" in STATEMENT.lower()
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.PreliminaryFlag == "PRELIMINARY"
    assert ds.CompletionFlag == "COMPLETE"
    assert "not reviewed" in ds.SeriesDescription


def test_highdicom_reads_it_as_a_measurement_report() -> None:
    buffer = io.BytesIO()
    build_report(content()).save_as(buffer, enforce_file_format=True)
    sr = hd.sr.srread(io.BytesIO(buffer.getvalue()))
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 4  # the study and its three images
    values = sorted(g.get_measurements()[0].value for g in groups)
    assert values == pytest.approx(sorted([0.6207818930041152, 0.912345678901234, 0.25, 0.7]))


def test_findings_use_snomed_codes_for_the_known_classes() -> None:
    assert (FINDING_CODES["autoimmune"].value, FINDING_CODES["autoimmune"].scheme_designator) == (
        "21983002",
        "SCT",
    )
    assert FINDING_CODES["normal"].value == "17621005"
    ds = build_report(
        content(
            label="other", images=(ImageFinding(US, f"{STUDY}.1.1", f"{STUDY}.1", "other", 0.1),)
        )
    )
    assert read_report(ds).finding == "other"  # a private code, meaning kept


def test_each_revision_is_a_new_instance_in_the_same_series_and_study() -> None:
    first = build_report(content())
    again = build_report(content())
    later = CREATED + dt.timedelta(minutes=5)
    second = build_report(
        content(revision=2, result_created_at=later, previous_reports=(first.SOPInstanceUID,))
    )
    assert again.SOPInstanceUID == first.SOPInstanceUID  # re-sending a revision is idempotent
    assert second.SOPInstanceUID != first.SOPInstanceUID  # never an overwrite
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert second.StudyInstanceUID == first.StudyInstanceUID == STUDY
    assert (first.InstanceNumber, second.InstanceNumber) == (1, 2)
    assert read_report(second).predecessors == (first.SOPInstanceUID,)
    assert report_uids(STUDY, 2, later) == (second.SeriesInstanceUID, second.SOPInstanceUID)


def test_patient_and_study_modules_come_from_the_source_header(tmp_path: Path) -> None:
    source = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm"), stop_before_pixels=True)
    study = str(source.StudyInstanceUID)
    image = ImageFinding(
        US, str(source.SOPInstanceUID), str(source.SeriesInstanceUID), "normal", 0.2
    )
    report = build_report(
        content(
            study=StudyHeader(study),
            images=(image,),
            header_path=get_testdata_file("US1_UNCR.dcm"),
        )
    )
    assert report.StudyInstanceUID == study
    assert report.PatientID == source.PatientID
    assert report.PatientName == source.PatientName
    assert report.StudyDate == source.StudyDate
    # An unreadable or foreign header falls back to the stored attributes.
    fallback = build_report(content(header_path=str(tmp_path / "missing.dcm")))
    assert fallback.PatientID == "PAT-7"


def test_a_report_needs_images() -> None:
    with pytest.raises(ValueError, match="at least one"):
        build_report(content(images=()))


# --------------------------------------------------------------------------- sending


@pytest.fixture
def scp() -> Iterator[dict[str, Any]]:
    """An in-process SR store SCP whose answer the test sets."""
    state: dict[str, Any] = {"status": 0x0000, "received": []}

    def on_store(event: Any) -> int:
        state["received"].append(event.dataset)
        return int(state["status"])

    ae = AE("PACS")
    ae.add_supported_context(ComprehensiveSRClass)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    state["peer"] = Peer("127.0.0.1", port, "PACS")
    try:
        yield state
    finally:
        server.shutdown()


def test_only_success_is_sent(scp: dict[str, Any]) -> None:
    report = build_report(content())
    ok = store_report(report, scp["peer"], "THYROCAD", timeout=10)
    assert ok.sent and ok.status == 0 and ok.reason is None
    assert scp["received"][0].SOPInstanceUID == report.SOPInstanceUID

    scp["status"] = 0xB000
    warned = store_report(report, scp["peer"], "THYROCAD", timeout=10)
    assert not warned.sent and not warned.transient
    assert "warning 0xB000" in str(warned.reason) and "not counted as sent" in str(warned.reason)

    scp["status"] = 0xA700
    busy = store_report(report, scp["peer"], "THYROCAD", timeout=10)
    assert not busy.sent and busy.transient and "0xA700" in str(busy.reason)

    scp["status"] = 0xC000
    refused = store_report(report, scp["peer"], "THYROCAD", timeout=10)
    assert not refused.sent and not refused.transient


def test_nobody_listening_is_transient() -> None:
    answer = store_report(build_report(content()), Peer("127.0.0.1", free_port(), "PACS"), "T", 5)
    assert answer.status is None and answer.transient
    assert "association" in str(answer.reason)


# --------------------------------------------------------------------------- the task's core


@pytest.fixture
def worker_ctx(tmp_path: Path, scp: dict[str, Any]) -> Iterator[Any]:
    from thyrocad.worker.context import WorkerContext

    url = fresh_sqlite_url(tmp_path)
    peer = scp["peer"]
    settings = load_settings(
        data_dir=tmp_path,
        database_url=url,
        sr_destination=f"{peer.ae_title}@{peer.host}:{peer.port}",
        positive_class="thyroiditis",
        classes=["normal", "thyroiditis"],
    )
    with migrated_engine(url) as engine:
        ctx = WorkerContext.from_settings(settings)
        ctx.engine.dispose()
        ctx.engine, ctx.sessions = engine, make_session_factory(engine)
        yield ctx


def _study_result(ctx: Any, probability: float, when: dt.datetime) -> int:
    """Two instances (new bytes each time) predicted at ``probability``; their study
    result's id (a new revision whenever the probability changes)."""
    from sqlalchemy import select

    from tests.db_fixtures import predict_all
    from thyrocad.db.schema import Study

    sha = f"{round(probability * 100):02d}".ljust(64, "0")
    with ctx.sessions.begin() as session:
        repo.upsert_model_version(session, model_rec("v1"))
        ids = [
            repo.register_instance(
                session, instance_rec(f"{STUDY}.9.{n}", study=STUDY, sha=sha), now=when
            ).instance_id
            for n in (1, 2)
        ]
    predict_all(ctx.sessions, ids, probability, when)
    with ctx.sessions.begin() as session:
        study_id = session.execute(
            select(Study.id).where(Study.study_instance_uid == STUDY)
        ).scalar_one()
        result = repo.save_study_result(
            session,
            study_id=study_id,
            model_version="v1",
            rule="mean",
            label="thyroiditis" if probability >= 0.5 else "normal",
            probability=probability,
            probabilities={"normal": 1 - probability, "thyroiditis": probability},
            image_count=2,
            now=when,
        )
    return result.id


def test_dispatch_records_sent_then_skips_and_a_new_revision_is_a_new_report(
    worker_ctx: Any, scp: dict[str, Any]
) -> None:
    from thyrocad.worker.archive_tasks import dispatch_report

    dest = worker_ctx.settings.sr_destination
    first = _study_result(worker_ctx, 0.8, at(10))
    assert dispatch_report(worker_ctx, first, dest) == "sent"
    assert dispatch_report(worker_ctx, first, dest) == "already sent"
    assert len(scp["received"]) == 1
    with worker_ctx.sessions() as session:
        sent = repo.sr_dispatch(session, first, dest)
    assert sent is not None and sent.status == "sent" and sent.dimse_status == 0
    assert sent.sent_at is not None and sent.sop_instance_uid == scp["received"][0].SOPInstanceUID

    second = _study_result(worker_ctx, 0.3, at(20))
    assert second != first
    assert dispatch_report(worker_ctx, first, dest) == "already sent"
    assert dispatch_report(worker_ctx, second, dest) == "sent"
    one, two = scp["received"]
    assert two.SOPInstanceUID != one.SOPInstanceUID and two.StudyInstanceUID == STUDY
    parsed = read_report(two)
    assert parsed.probability == pytest.approx(0.3)
    assert parsed.predecessors == (one.SOPInstanceUID,)


def test_dispatch_failures_are_stored_with_their_reason(
    worker_ctx: Any, scp: dict[str, Any]
) -> None:
    from thyrocad.worker.archive_tasks import dispatch_report

    dest = worker_ctx.settings.sr_destination
    result = _study_result(worker_ctx, 0.8, at(10))
    scp["status"] = 0xA700
    assert dispatch_report(worker_ctx, result, dest, final_attempt=False) == "retry"
    with worker_ctx.sessions() as session:
        pending = repo.sr_dispatch(session, result, dest)
    assert pending is not None and pending.status == "pending" and "0xA700" in str(pending.reason)
    scp["status"] = 0xB000
    assert dispatch_report(worker_ctx, result, dest) == "failed"
    with worker_ctx.sessions() as session:
        failed = repo.sr_dispatch(session, result, dest)
        rows = repo.sr_dispatches(session, [result])[result]
    assert failed is not None and failed.status == "failed" and failed.dimse_status == 0xB000
    assert len(rows) == 1  # one row per result and destination, updated in place
    scp["status"] = 0x0000
    assert dispatch_report(worker_ctx, result, dest) == "sent"  # a failed one may be re-sent
