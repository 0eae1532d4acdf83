"""What a modality can send, and the answer each gets: one pipeline (listener, workers,
beat on PostgreSQL and Redis) receives every case, sent byte for byte with pynetdicom or
with dcmtk's ``storescu``; then each case is checked for its DIMSE status and its stored
outcome: predicted, rejected by a worker with a reason, or refused at C-STORE with a
reason in ``rejections``. Last, the processes are still alive and answering.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from pydicom.dataset import Dataset

from pacs.dicom_files import PatientInfo, StudyInfo, uid_from, ultrasound_dataset
from tests.db_fixtures import fresh_postgres_url, postgres_unavailable_reason
from tests.integration.conftest import cli
from tests.integration.site import Pipeline
from tests.procs import free_port, redis_server, wait_for
from thyrocad.metrics import reason_class

pytestmark = pytest.mark.integration

US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
US_MULTIFRAME_RETIRED = "1.2.840.10008.5.1.4.1.1.3"


def _data_store() -> Path:
    try:
        import data_store  # the pydicom-data package
    except ImportError as exc:  # pragma: no cover - deploy/setup.sh installs it
        raise RuntimeError("pydicom-data is required: pip install pydicom-data") from exc
    return Path(data_store.__file__).parent / "data"


# --------------------------------------------------------------------------- the cases


@dataclass
class Case:
    """One instance as a modality sends it, and the answer it must get.

    ``outcome``: ``predicted``; ``rejected`` (acknowledged, then refused by a worker
    with ``reason``); or ``refused`` (answered ``status`` at C-STORE, ``reason`` stored
    in ``rejections``). ``reason`` is a regular expression, ``reason_class`` the label of
    ``thyrocad_instances_unreadable_total`` / ``thyrocad_instances_received_total``.
    ``check`` gets the stored row of a predicted instance.
    """

    name: str
    path: Path
    sop_instance_uid: str
    outcome: str
    status: int = 0x0000
    reason: str = ""
    reason_class: str = ""
    sender: str = "pynetdicom"
    check: Callable[[dict[str, Any]], None] | None = None


def _uids(name: str) -> dict[str, str]:
    return {part: uid_from(f"edge/{name}/{part}") for part in ("study", "series", "sop")}


def _base(name: str, pixels: np.ndarray | None = None, **patient: str) -> Dataset:
    """A synthetic scanner screen of its own patient, study, series and instance."""
    uids = _uids(name)
    if pixels is None:
        rng = np.random.default_rng(len(name))
        pixels = np.clip(rng.rayleigh(40, (96, 128)), 1, 250).astype(np.uint8)
    return ultrasound_dataset(
        pixels,
        patient=PatientInfo(
            patient_id=patient.get("patient_id", f"EDGE-{name}"[:64]),
            patient_name=patient.get("patient_name", "Edge^Case"),
            birth_date="19800101",
            sex="F",
        ),
        study=StudyInfo(
            study_instance_uid=uids["study"],
            study_date="20250102",
            study_time="101500",
            accession_number=f"E{abs(hash(name)) % 10**8}",
        ),
        series_instance_uid=uids["series"],
        sop_instance_uid=uids["sop"],
        instance_number=1,
    )


def _with_new_uid(source: Path, out: Path, name: str, sop_class: str | None = None) -> str:
    """A real file with its own SOP Instance UID (and, if given, SOP class); else unchanged."""
    ds = pydicom.dcmread(source)
    uid = _uids(name)["sop"]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    if sop_class:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.save_as(out, enforce_file_format=True)
    return uid


def retired_class_cases(folder: Path) -> list[Case]:
    """Real files of the retired ultrasound classes, with current ones, for dcmtk."""
    store = _data_store()
    cases = []
    # color-pl.dcm and color-px.dcm are both Ultrasound Image Storage (Retired) and share
    # one SOP Instance UID: the first goes as it is, the second with a UID of its own.
    pl = store / "color-pl.dcm"
    cases.append(Case("retired_us_image", pl, str(pydicom.dcmread(pl).SOPInstanceUID), "predicted"))
    px = folder / "retired_us_image_2.dcm"
    cases.append(
        Case("retired_us_image_2", px, _with_new_uid(store / "color-px.dcm", px, "px"), "predicted")
    )
    # pydicom-data has no file of the retired multi-frame class: a real two-frame file
    # relabelled as one.
    mf = folder / "retired_us_multiframe.dcm"
    uid = _with_new_uid(store / "OBXXXX1A_2frame.dcm", mf, "mf", US_MULTIFRAME_RETIRED)
    cases.append(Case("retired_us_multiframe", mf, uid, "predicted"))
    for real in ("US1_UNCR.dcm", "OBXXXX1A.dcm"):  # storescu converts to Explicit LE
        path = store / real
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        cases.append(Case(f"current_{real.split('.')[0]}", path, uid, "predicted"))
    for case in cases:
        case.sender = "storescu"
    return cases


def all_cases(folder: Path) -> list[Case]:
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bad cases make pydicom warn, on purpose
        cases = retired_class_cases(folder)
    names = [c.name for c in cases]
    assert len(set(names)) == len(names)
    uids = [c.sop_instance_uid for c in cases]
    assert len(set(uids)) == len(uids)
    return cases


# --------------------------------------------------------------------------- sending


def send_with_pynetdicom(paths: list[Path], port: int) -> list[int]:
    """C-STORE files byte for byte in one association; the presentation contexts come
    from each file's meta (Media Storage SOP Class, Transfer Syntax)."""
    from pynetdicom import AE, _config
    from pynetdicom.presentation import build_context

    pairs: dict[tuple[str, str], None] = {}
    for path in paths:
        meta = pydicom.filereader.read_file_meta_info(path)
        pairs[(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))] = None
    ae = AE(ae_title="EDGESCU")
    ae.requested_contexts = [build_context(sop, [syntax]) for sop, syntax in pairs]
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="THYROCAD")
        assert assoc.is_established, "the listener refused the association"
        try:
            return [int(assoc.send_c_store(path).Status) for path in paths]
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked


def send_with_storescu(paths: list[Path], port: int) -> list[int]:
    """dcmtk's storescu, one association, proposing exactly the files' SOP classes (-R)."""
    storescu = shutil.which("storescu", path="/usr/bin")
    assert storescu, "dcmtk is required (deploy/setup.sh installs it)"
    done = subprocess.run(
        [storescu, "-v", "-R", "-aec", "THYROCAD", "-aet", "DCMTK", "127.0.0.1", str(port)]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert "Aborted" not in output and "abort" not in output.lower(), output[-3000:]
    assert output.count("Requesting Association") == 1, "one association for every file"
    # storescu prints one "Received Store Response (Success)" or "(<status name>)" per file.
    statuses = []
    for answer in re.findall(r"Received Store Response \(([^)]*)\)", output):
        statuses.append(0x0000 if answer == "Success" else -1)
    assert done.returncode == 0 or -1 in statuses, output[-3000:]
    return statuses


# --------------------------------------------------------------------------- the pipeline


@dataclass
class Site:
    pipeline: Pipeline
    cases: dict[str, Case]
    statuses: dict[str, int] = field(default_factory=dict)

    def stored(self, case: Case) -> dict[str, Any] | None:
        with self.pipeline.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT i.state, i.reason, i.sop_class_uid, i.number_of_frames, "
                    "p.patient_name, p.birth_date, s.description AS study_description, "
                    "s.study_date FROM instances i JOIN studies s ON s.id = i.study_id "
                    "JOIN patients p ON p.id = s.patient_id WHERE i.sop_instance_uid = :uid"
                ),
                {"uid": case.sop_instance_uid},
            ).mappings()
            found = row.first()
            return dict(found) if found else None

    def rejections(self, case: Case) -> list[dict[str, Any]]:
        with self.pipeline.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT reason, dimse_status, sop_instance_uid FROM rejections "
                    "WHERE sop_instance_uid = :uid"
                ),
                {"uid": case.sop_instance_uid},
            ).mappings()
            return [dict(r) for r in rows]


def _settled(site: Site) -> bool:
    for case in site.cases.values():
        if case.outcome == "refused":
            if not site.rejections(case):
                return False
            continue
        row = site.stored(case)
        if row is None or row["state"] not in ("predicted", "rejected", "failed"):
            return False
    return True


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[Path, str]) -> Iterator[Site]:
    problem = postgres_unavailable_reason()
    if problem:
        pytest.fail(f"PostgreSQL is required for integration tests: {problem}")
    tmp_path = tmp_path_factory.mktemp("intake-edges")
    registry, version = tiny_model
    with fresh_postgres_url() as pg_url, redis_server(tmp_path) as (redis_port, _, _):
        port = free_port()
        env = {
            "THYROCAD_DATA_DIR": str(tmp_path / "data"),
            "DATABASE_URL": pg_url,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "THYROCAD_PORT": str(port),
            "THYROCAD_STUDY_IDLE_SECONDS": "1",
            "THYROCAD_REQUEUE_INTERVAL_SECONDS": "2",
            "THYROCAD_REQUEUE_STALE_SECONDS": "5",
            "THYROCAD_BATCH_MAX": "8",
        }
        cli("db", "upgrade", env=env)
        cli("models", "promote", version, "--registry", str(registry), env=env)
        pipeline = Pipeline(env, port, tmp_path, sa.create_engine(pg_url))
        cases = all_cases(tmp_path / "cases")
        result = Site(pipeline, {c.name: c for c in cases})
        try:
            pipeline.start()
            for sender, send in (
                ("pynetdicom", send_with_pynetdicom),
                ("storescu", send_with_storescu),
            ):
                group = [c for c in cases if c.sender == sender]
                if group:
                    statuses = send([c.path for c in group], port)
                    assert len(statuses) == len(group), (sender, statuses)
                    result.statuses.update(zip([c.name for c in group], statuses, strict=True))
            wait_for(
                lambda: _settled(result),
                300,
                lambda: f"every case settled\n{pipeline.logs()}",
            )
            yield result
        finally:
            for name in list(pipeline.procs):
                pipeline.kill(name)
            pipeline.engine.dispose()


# --------------------------------------------------------------------------- the checks


def _case_names() -> list[str]:
    # The cases are built in the fixture (they need files); their names are fixed here.
    return [
        "retired_us_image",
        "retired_us_image_2",
        "retired_us_multiframe",
        "current_US1_UNCR",
        "current_OBXXXX1A",
    ]


def test_the_case_list_is_complete(site: Site) -> None:
    assert sorted(site.cases) == sorted(_case_names())


@pytest.mark.parametrize("name", _case_names())
def test_each_case_gets_its_status_and_stored_answer(site: Site, name: str) -> None:
    case = site.cases[name]
    assert site.statuses[name] == case.status, f"{name}: status {site.statuses[name]:#06x}"
    if case.outcome == "refused":
        rows = site.rejections(case)
        assert len(rows) == 1, rows
        assert rows[0]["dimse_status"] == case.status
        assert re.search(case.reason, rows[0]["reason"]), rows[0]["reason"]
        assert reason_class(rows[0]["reason"], case.status) == case.reason_class
        return
    row = site.stored(case)
    assert row is not None, f"{name} was acknowledged but never registered"
    assert not site.rejections(case)
    if case.outcome == "predicted":
        assert row["state"] == "predicted", row
        assert row["reason"] is None
    else:
        assert row["state"] == "rejected", row
        assert re.search(case.reason, row["reason"] or ""), row["reason"]
        assert reason_class(row["reason"]) == case.reason_class
    if case.check is not None:
        case.check(row)


def test_retired_classes_are_stored_under_their_own_class(site: Site) -> None:
    assert site.stored(site.cases["retired_us_image"])["sop_class_uid"] == US_RETIRED  # type: ignore[index]
    multiframe = site.stored(site.cases["retired_us_multiframe"])
    assert multiframe is not None
    assert (multiframe["sop_class_uid"], multiframe["number_of_frames"]) == (
        US_MULTIFRAME_RETIRED,
        2,
    )
    listener_log = (site.pipeline.data_dir / "listener.log").read_text(errors="replace")
    assert "No supported service class" not in listener_log
    assert "Aborting Association" not in listener_log
