"""The archive against a real PACS: Debian's Orthanc on loopback, thyrocad's real processes.

Orthanc holds real ultrasound (pydicom-data's US1, uncompressed and JPEG 2000)
and synthetic studies, plus studies the filters must leave out. thyrocad
backfills a date range from it by C-MOVE to its listener, is killed mid-way
and resumes, classifies every study, and sends one Structured Report per study
result revision back into the same study in Orthanc, where we read them back.
Failures (unknown move destination, an instance our listener refuses, so a
partial retrieve) are reported per study while the backfill goes on; C-GET
fetches without the archive connecting to us; dcmtk's findscu checks Orthanc
as a second, independent peer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
import sqlalchemy as sa
from pydicom.data import get_testdata_file

from tests.integration.conftest import cli
from tests.integration.site import Pipeline
from tests.procs import free_port, port_open, redis_server, stop, thyrocad, wait_for
from thyrocad.pacs.dicom_files import uid_from
from thyrocad.pacs.sender import Peer, send_files
from thyrocad.pacs.structured_report import STATEMENT, read_report
from thyrocad.synthetic import write_synthetic_set

pytestmark = pytest.mark.integration

US1 = ("US1_UNCR.dcm", "US1_J2KR.dcm", "US1_J2KI.dcm")  # one real study, three syntaxes
US1_STUDY = "1.3.6.1.4.1.5962.1.2.13.20040826185059.5457"  # 2004-08-26


# --------------------------------------------------------------------------- Orthanc


@dataclass
class Orthanc:
    """A private Orthanc: DICOM on ``dicom_port``, REST on ``http_port`` (loopback only)."""

    dicom_port: int
    http_port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def peer(self) -> str:
        return f"ORTHANC@127.0.0.1:{self.dicom_port}"

    def start(self, modalities: dict[str, list[Any]]) -> None:
        config = {
            "Name": "thyrocad-test-archive",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "DicomAet": "ORTHANC",
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            # A misconfigured calling AE title must reach the per-study C-MOVE answer.
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomModalities": modalities,
            "DicomScuTimeout": 10,
            "Plugins": [],
            "SaveJobs": False,
            "HttpDescribeErrors": True,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        exe = shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
        assert exe, "Debian's orthanc package is required for the archive tests"
        self.process = subprocess.Popen(
            [exe, str(path)],
            stdout=open(self.folder / "orthanc.log", "ab"),  # noqa: SIM115 - the process owns it
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: port_open(self.dicom_port) and port_open(self.http_port), 30, "Orthanc")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, 10)

    def rest(self, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=body,
            method="POST" if body is not None else "GET",
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            data = answer.read()
        return data if path.endswith("/file") else json.loads(data)

    def upload(self, files: list[Path]) -> None:
        for path in files:
            assert self.rest("/instances", path.read_bytes())["Status"] == "Success"

    def study_files(self, study_uid: str, modality: str) -> list[pydicom.Dataset]:
        """The instances of one modality in a study, parsed."""
        query = {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
        found = self.rest("/tools/find", json.dumps(query).encode())
        if not found:
            return []
        out = []
        for series in self.rest(f"/studies/{found[0]}/series"):
            if series["MainDicomTags"].get("Modality") != modality:
                continue
            for instance in series["Instances"]:
                data = self.rest(f"/instances/{instance}/file")
                out.append(pydicom.dcmread(_bytes_io(data)))
        return out


def _bytes_io(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    archive = Orthanc(free_port(), free_port(), tmp_path / "orthanc")
    archive.folder.mkdir()
    try:
        yield archive
    finally:
        archive.stop()


def synthetic(tmp_path: Path, patients: int, seed: int) -> tuple[list[Path], list[str]]:
    """Synthetic studies (64 px): files, study UIDs; study dates 2026-01-05 + index."""
    written = write_synthetic_set(
        tmp_path / f"syn-{seed}", patients, seed=seed, size=64, id_prefix=f"A{seed}"
    )
    return [p for w in written for p in w.paths], [w.study_instance_uid for w in written]


def real_ultrasound() -> list[Path]:
    return [Path(get_testdata_file(name)) for name in US1]


def backfill_args(orthanc: Orthanc, *more: str) -> list[str]:
    return ["backfill", "--from", orthanc.peer, "--since", "2004-01-01", *more]


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"no JSON summary:\n{result.stdout}\n{result.stderr}") from exc


def registered_per_study(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT s.study_instance_uid, count(i.id) FROM studies s "
                "JOIN instances i ON i.study_id = s.id GROUP BY s.study_instance_uid"
            )
        )
        return {uid: int(n) for uid, n in rows}


# --------------------------------------------------------------------------- the full path


@pytest.fixture
def pipeline(
    tmp_path: Path, pg_url: str, tiny_model: tuple[Path, str], orthanc: Orthanc
) -> Iterator[Pipeline]:
    registry, version = tiny_model
    with redis_server(tmp_path) as (redis_port, _, _):
        port = free_port()
        env = {
            "THYROCAD_DATA_DIR": str(tmp_path / "data"),
            "DATABASE_URL": pg_url,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "THYROCAD_PORT": str(port),
            "THYROCAD_AE_TITLE": "THYROCAD",
            "THYROCAD_STUDY_IDLE_SECONDS": "1",
            "THYROCAD_BATCH_MAX": "8",
            "THYROCAD_SR_DESTINATION": orthanc.peer,
            "THYROCAD_BACKFILL_WAIT_SECONDS": "150",
            "THYROCAD_RETRIEVE_TIMEOUT_SECONDS": "30",
        }
        cli("db", "upgrade", env=env)
        cli("models", "promote", version, "--registry", str(registry), env=env)
        orthanc.start({"thyrocad": ["THYROCAD", "127.0.0.1", port]})
        p = Pipeline(env, port, tmp_path, sa.create_engine(pg_url))
        try:
            yield p
        finally:
            for name in list(p.procs):
                p.kill(name)
            p.engine.dispose()


def test_backfill_classifies_every_study_resumes_after_a_crash_and_reports_back(
    pipeline: Pipeline, orthanc: Orthanc, tmp_path: Path, tiny_model: tuple[Path, str]
) -> None:
    files, synthetic_studies = synthetic(tmp_path, 4, seed=31)
    orthanc.upload(real_ultrasound() + files + [Path(get_testdata_file("SC_rgb.dcm"))])
    # In range: US1 (2004) and the first three synthetic studies (2026-01-05..07). Out: the
    # fourth (2026-01-08) by date, SC_rgb (OT, 2017) by modality.
    wanted = sorted([US1_STUDY, *synthetic_studies[:3]])
    args = backfill_args(orthanc, "--until", "2026-01-07", "--modality", "US", "--json")
    env = pipeline.env

    dry = summary(cli(*args, "--dry-run", env=env))
    assert sorted(s["study_instance_uid"] for s in dry["studies"]) == wanted
    assert {s["expected"] for s in dry["studies"]} == {3, 5}
    assert pipeline.scalar("SELECT count(*) FROM backfill_items") == 0  # a dry run writes nothing

    pipeline.start()
    # A crash after the first study: one request every 4 s, killed once it has arrived.
    crashing = thyrocad(
        *args, "--rate", "0.25", "--concurrency", "1", env=env, log=tmp_path / "crash.log"
    )
    expected = {s["study_instance_uid"]: s["expected"] for s in dry["studies"]}

    def first_arrived() -> bool:
        got = registered_per_study(pipeline.engine)
        return any(got.get(uid, 0) >= n for uid, n in expected.items())

    wait_for(first_arrived, 90, lambda: f"a first study\n{pipeline.logs()}")
    crashing.kill()
    crashing.wait()
    got = registered_per_study(pipeline.engine)
    missing = sorted(uid for uid, n in expected.items() if got.get(uid, 0) < n)
    assert 1 <= len(missing) < len(wanted), got

    resumed = cli(*args, "--rate", "0", env=env, check=False)
    report = summary(resumed)
    assert resumed.returncode == 0, f"{resumed.stdout}\n{resumed.stderr}\n{pipeline.logs()}"
    assert report["counts"]["requested"] == len(missing)  # only the rest was asked for
    assert (
        sorted(s["study_instance_uid"] for s in report["studies"] if s["action"] == "requested")
        == missing
    )
    assert report["counts"]["classified"] == len(wanted)
    assert {s["state"] for s in report["studies"]} == {"classified"}
    with pipeline.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT study_instance_uid, state FROM backfill_items"))
        states = dict(rows.all())
    assert states == dict.fromkeys(wanted, "classified")
    assert sorted(latest_results(pipeline)) == wanted  # every study classified, nothing else

    # A Structured Report per study result revision, sent into the same study. (A study
    # finalised before its last instance registered has two revisions, so two reports.)
    wait_for(
        lambda: all_latest_sent(pipeline),
        90,
        lambda: f"reports of every latest result\n{_dispatches(pipeline)}\n{pipeline.logs()}",
    )
    _, version = tiny_model
    for uid, result_id in latest_results(pipeline).items():
        reports = orthanc.study_files(uid, "SR")
        sent = sent_reports(pipeline, uid)
        assert sorted(r.SOPInstanceUID for r in reports) == sorted(sent.values()), uid
        (newest,) = [r for r in reports if r.SOPInstanceUID == sent[result_id]]
        _check_report(pipeline, newest, uid, result_id, version)

    # Idempotent: nothing more to do, although every study now also holds an SR series.
    again = summary(cli(*args, env=env))
    assert again["counts"]["requested"] == 0 and again["counts"]["skipped"] == len(wanted)
    shown = json.loads(cli("results", "--study", US1_STUDY, "--json", env=env).stdout)
    assert [r["status"] for r in shown[0]["reports"]] == ["sent"]

    # A late image makes a new revision, and that a new report: never an overwrite.
    late = _late_image(files[0], tmp_path)
    assert send_files([late], Peer("127.0.0.1", pipeline.port, "THYROCAD"), "MODALITY").ok
    study = synthetic_studies[0]
    before = len(orthanc.study_files(study, "SR"))
    wait_for(
        lambda: len(orthanc.study_files(study, "SR")) == before + 1,
        90,
        lambda: _dispatches(pipeline),
    )
    *_, first, second = sorted(
        orthanc.study_files(study, "SR"), key=lambda d: int(d.InstanceNumber)
    )
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.SOPInstanceUID in read_report(second).predecessors
    assert len(read_report(second).images) == len(read_report(first).images) + 1

    # dcmtk as a second peer: Orthanc lists the SR series in that study.
    findscu = shutil.which("findscu", path="/usr/bin")
    assert findscu, "dcmtk is required"
    found = subprocess.run(
        [
            findscu, "-S", "-aet", "DCMTK", "-aec", "ORTHANC",
            "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}",
            "-k", "Modality", "-k", "SeriesInstanceUID",
            "127.0.0.1", str(orthanc.dicom_port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert (
        "[SR]" in found.stderr + found.stdout
        and first.SeriesInstanceUID in found.stderr + found.stdout
    )


def latest_results(pipeline: Pipeline) -> dict[str, int]:
    """Study UID → id of its latest study result revision."""
    with pipeline.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT s.study_instance_uid, r.id FROM study_results r "
                "JOIN studies s ON s.id = r.study_id WHERE r.revision = "
                "(SELECT max(revision) FROM study_results x WHERE x.study_id = r.study_id)"
            )
        )
        return dict(rows.all())


def sent_reports(pipeline: Pipeline, study_uid: str) -> dict[int, str]:
    """Study result id → SOP Instance UID of its report sent, for one study."""
    with pipeline.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT d.study_result_id, d.sop_instance_uid FROM sr_dispatches d "
                "JOIN study_results r ON r.id = d.study_result_id "
                "JOIN studies s ON s.id = r.study_id "
                "WHERE s.study_instance_uid = :uid AND d.status = 'sent'"
            ),
            {"uid": study_uid},
        )
        return dict(rows.all())


def all_latest_sent(pipeline: Pipeline) -> bool:
    latest = latest_results(pipeline)
    return all(rid in sent_reports(pipeline, uid) for uid, rid in latest.items())


def _dispatches(pipeline: Pipeline) -> str:
    with pipeline.engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT study_result_id, status, dimse_status, reason FROM sr_dispatches")
        )
        return "\n".join(str(r) for r in rows)


def _check_report(
    pipeline: Pipeline, ds: pydicom.Dataset, study_uid: str, result_id: int, version: str
) -> None:
    """The report in Orthanc says what the database says, image by image."""
    parsed = read_report(ds)
    assert ds.StudyInstanceUID == study_uid and ds.Modality == "SR"
    with pipeline.engine.connect() as conn:
        probability, label = conn.execute(
            sa.text("SELECT probability, label FROM study_results WHERE id = :id"),
            {"id": result_id},
        ).one()
        images = conn.execute(
            sa.text(
                "SELECT i.sop_instance_uid, i.sop_class_uid, p.probability FROM predictions p "
                "JOIN instances i ON i.id = p.instance_id JOIN studies s ON s.id = i.study_id "
                "WHERE s.study_instance_uid = :uid AND i.state = 'predicted'"
            ),
            {"uid": study_uid},
        ).all()
        dispatch = conn.execute(
            sa.text(
                "SELECT sop_instance_uid, dimse_status FROM sr_dispatches "
                "WHERE study_result_id = :id"
            ),
            {"id": result_id},
        ).one()
    assert parsed.probability == pytest.approx(probability, abs=1e-12)
    assert parsed.finding == {"autoimmune": "Autoimmune thyroiditis", "normal": "Normal"}[label]
    assert {(i.sop_instance_uid, i.sop_class_uid) for i in parsed.images} == {
        (uid, cls) for uid, cls, _ in images
    }
    by_uid = {uid: p for uid, _, p in images}
    for image in parsed.images:
        assert image.probability == pytest.approx(by_uid[image.sop_instance_uid], abs=1e-12)
    assert parsed.algorithm_version == version and parsed.algorithm_name.startswith("thyrocad")
    assert parsed.statements == (STATEMENT,) and parsed.verification_flag == "UNVERIFIED"
    assert dispatch == (ds.SOPInstanceUID, 0)
    # highdicom reads it back as a TID 1500 measurement report.
    sr = hd.sr.srread(_bytes_io(_encode(ds)))
    assert len(sr.content.get_image_measurement_groups()) == len(parsed.images) + 1


def _encode(ds: pydicom.Dataset) -> bytes:
    buffer = _bytes_io(b"")
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _late_image(source: Path, tmp_path: Path) -> Path:
    """Another instance of ``source``'s study (a late image)."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = uid_from(f"late/{ds.SOPInstanceUID}")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 99
    path = tmp_path / "late.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- failures, C-GET


@pytest.fixture
def archive_only(tmp_path: Path, pg_url: str) -> dict[str, str]:
    """Settings for thyrocad with PostgreSQL and no workers (the embedded broker)."""
    env = {
        "THYROCAD_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": pg_url,
        "THYROCAD_RETRIEVE_TIMEOUT_SECONDS": "30",
        "THYROCAD_BACKFILL_WAIT_SECONDS": "60",
    }
    cli("db", "upgrade", env=env)
    return env


def _truncated(source: Path, tmp_path: Path) -> Path:
    """An instance of ``source``'s study whose pixel data is too short: our listener refuses it."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = uid_from(f"truncated/{ds.SOPInstanceUID}")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PixelData = ds.PixelData[:256]
    path = tmp_path / "truncated.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_archive_failures_are_reported_per_study_and_the_backfill_goes_on(
    orthanc: Orthanc, archive_only: dict[str, str], pg_url: str, tmp_path: Path
) -> None:
    port = free_port()
    orthanc.start({"thyrocad": ["THYROCAD", "127.0.0.1", port]})
    files, studies = synthetic(tmp_path, 3, seed=41)
    bad_study = studies[2]
    # Orthanc sends the most recently stored instance first: stored first, this one goes
    # last, after the five good ones; Orthanc then stops with 0xC000 and no counts.
    orthanc.upload([_truncated(files[-1], tmp_path), *files])
    args = backfill_args(orthanc, "--json", "--rate", "0", "--no-wait")

    # Our AE title unknown to the archive: each study fails with the reason, none is skipped.
    wrong = cli(*args, env={**archive_only, "THYROCAD_AE_TITLE": "NOWHERE"}, check=False)
    report = summary(wrong)
    assert wrong.returncode == 1
    assert report["counts"]["requested"] == 3 and report["counts"]["failed"] == 3
    for study in report["studies"]:
        assert study["state"] == "failed"
        assert "move destination 'NOWHERE'" in study["reason"], study["reason"]

    # The listener refuses the truncated instance: that study is partial, the others arrive.
    listener = thyrocad(
        "serve", env={**archive_only, "THYROCAD_PORT": str(port)}, log=tmp_path / "listener.log"
    )
    try:
        wait_for(lambda: port_open(port), 60, "the listener")
        right = cli(*args, env=archive_only, check=False)
    finally:
        stop(listener)
    report = summary(right)
    assert right.returncode == 1, right.stderr
    states = {s["study_instance_uid"]: s for s in report["studies"]}
    assert {uid: s["state"] for uid, s in states.items()} == {
        studies[0]: "received",
        studies[1]: "received",
        bad_study: "partial",
    }
    reason = states[bad_study]["reason"]
    assert states[bad_study]["registered"] == 5
    assert reason.startswith("C-MOVE failed 0xC000") and reason.endswith("(after 5 arrived)")
    assert "move destination" not in reason  # it did reach us
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT study_instance_uid, reason FROM backfill_items"))
            stored = dict(rows.all())
            refused = conn.execute(sa.text("SELECT reason FROM rejections")).scalars().all()
    finally:
        engine.dispose()
    assert stored[bad_study] == reason and stored[studies[0]] is None
    assert any("truncated pixel data" in r for r in refused)


def test_get_fetches_without_the_archive_connecting_to_us(
    orthanc: Orthanc, archive_only: dict[str, str], pg_url: str, tmp_path: Path
) -> None:
    orthanc.start({})  # the archive knows no destination: only C-GET can work
    orthanc.upload(real_ultrasound())
    result = cli(
        *backfill_args(orthanc, "--get", "--no-wait", "--json"), env=archive_only, check=False
    )
    report = summary(result)
    assert result.returncode == 0, result.stderr
    assert [(s["study_instance_uid"], s["state"], s["registered"]) for s in report["studies"]] == [
        (US1_STUDY, "received", 3)
    ]
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT sop_instance_uid, transfer_syntax_uid, spool_path FROM instances")
            ).all()
    finally:
        engine.dispose()
    originals = {str(pydicom.dcmread(p).SOPInstanceUID) for p in real_ultrasound()}
    assert {r[0] for r in rows} == originals
    # Each arrived as stored (JPEG 2000 included), spooled by the listener's own handler.
    assert {r[1] for r in rows} == {
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
    }
    assert all(Path(r[2]).is_file() for r in rows)
