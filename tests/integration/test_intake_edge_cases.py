"""What a modality can send, and the answer each gets: one pipeline (listener, workers,
beat on PostgreSQL and Redis) receives every case, sent byte for byte with pynetdicom or
with dcmtk's ``storescu``; then each case is checked for its DIMSE status and its stored
outcome: predicted, rejected by a worker with a reason, or refused at C-STORE with a
reason in ``rejections``. Last, the processes are still alive and answering.
"""

from __future__ import annotations

import io
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
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import ImplicitVRLittleEndian, JPEGBaseline8Bit

from tests.db_fixtures import fresh_postgres_url, postgres_unavailable_reason
from tests.integration.conftest import cli
from tests.integration.site import Pipeline
from tests.procs import free_port, redis_server, wait_for
from thyrocad.db.records import NO_USABLE_IMAGES
from thyrocad.metrics import reason_class
from thyrocad.pacs.dicom_files import PatientInfo, StudyInfo, uid_from, ultrasound_dataset

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


def _save(
    ds: Dataset, folder: Path, name: str, *, implicit: bool = False, as_is: bool = False
) -> Path:
    """Write a case file; ``as_is`` keeps a file meta that disagrees with the data set
    (pydicom would otherwise make them agree)."""
    path = folder / f"{name}.dcm"
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    if as_is:
        ds.preamble = bytes(128)
    ds.save_as(path, enforce_file_format=not as_is)
    return path


def _jpeg(grey: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _as_jpeg(ds: Dataset, frame: bytes) -> Dataset:
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    return ds


def _scan_start(jpeg: bytes) -> int:
    """Offset of the entropy-coded data: after the Start of Scan segment."""
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")


def _refused(name: str, path: Path, uid: str, status: int, reason: str, label: str) -> Case:
    return Case(name, path, uid, "refused", status, reason, label)


def bad_instance_cases(folder: Path) -> list[Case]:
    """Every class of bad instance the README lists, plus the corrupt and odd ones."""
    cases: list[Case] = []

    def base(name: str, **patient: str) -> tuple[Dataset, str]:
        ds = _base(name, **patient)
        return ds, str(ds.SOPInstanceUID)

    # 0xC000: a valid file meta header, then garbage.
    ds, uid = base("not_dicom")
    path = _save(ds, folder, "not_dicom")
    raw = path.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    path.write_bytes(raw[:meta_end] + np.random.default_rng(1).bytes(3000))
    cases.append(_refused("not_dicom", path, uid, 0xC000, "not a DICOM dataset", "not_dicom"))

    # 0xA900: the UIDs thyrocad keys on. Without SOP Instance UID in the data set, the
    # C-STORE request still carries one (the file meta's): the rejection keeps it.
    ds, uid = base("missing_sop_instance_uid")
    del ds.SOPInstanceUID
    path = _save(ds, folder, "missing_sop_instance_uid")
    cases.append(
        _refused(
            "missing_sop_instance_uid", path, uid, 0xA900, "missing SOPInstanceUID", "missing_uid"
        )
    )
    ds, uid = base("missing_study_uid")
    del ds.StudyInstanceUID
    path = _save(ds, folder, "missing_study_uid")
    cases.append(
        _refused("missing_study_uid", path, uid, 0xA900, "missing StudyInstanceUID", "missing_uid")
    )
    ds, uid = base("invalid_series_uid")
    ds.SeriesInstanceUID = "not a uid!"
    path = _save(ds, folder, "invalid_series_uid")
    cases.append(
        _refused(
            "invalid_series_uid", path, uid, 0xA900, "invalid SeriesInstanceUID", "invalid_uid"
        )
    )

    # 0xA900: no, short or too long native pixel data.
    ds, uid = base("no_pixel_data")
    del ds.PixelData
    path = _save(ds, folder, "no_pixel_data")
    cases.append(_refused("no_pixel_data", path, uid, 0xA900, "no pixel data", "no_pixel_data"))
    ds, uid = base("truncated_pixel_data")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    path = _save(ds, folder, "truncated_pixel_data")
    cases.append(
        _refused(
            "truncated_pixel_data",
            path,
            uid,
            0xA900,
            r"truncated pixel data: expected \d+",
            "truncated",
        )
    )
    # Rows/Columns inconsistent with the pixel data, both ways.
    ds, uid = base("rows_larger_than_pixel_data")
    ds.Rows = ds.Rows * 2
    path = _save(ds, folder, "rows_larger_than_pixel_data")
    cases.append(
        _refused(
            "rows_larger_than_pixel_data",
            path,
            uid,
            0xA900,
            "truncated pixel data",
            "truncated",
        )
    )
    ds, uid = base("rows_smaller_than_pixel_data")
    ds.Rows = ds.Rows // 2
    del ds.SequenceOfUltrasoundRegions
    path = _save(ds, folder, "rows_smaller_than_pixel_data")
    cases.append(
        _refused(
            "rows_smaller_than_pixel_data",
            path,
            uid,
            0xA900,
            r"pixel data longer than Rows/Columns",
            "missing_dimensions",
        )
    )
    # An odd number of pixel bytes padded to even length by its one byte is fine.
    rng = np.random.default_rng(3)
    odd = np.clip(rng.rayleigh(40, (101, 151)), 1, 250).astype(np.uint8)
    ds = _base("odd_length_padded", odd)
    assert len(ds.PixelData) % 2 == 1, "the writer pads it"
    path = _save(ds, folder, "odd_length_padded")
    cases.append(Case("odd_length_padded", path, str(ds.SOPInstanceUID), "predicted"))

    # 0x0122: a CT image inside an ultrasound presentation context.
    ds, uid = base("wrong_sop_class")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    path = _save(ds, folder, "wrong_sop_class", as_is=True)
    cases.append(_refused("wrong_sop_class", path, uid, 0x0122, "not an ultrasound", "sop_class"))

    # JPEG Baseline: a good one, one with valid markers and a garbage scan, one cut in
    # half, one whose header says another size than the JPEG frame.
    ds, uid = base("jpeg_good")
    grey = ds.pixel_array
    good = _jpeg(grey)
    cases.append(
        Case("jpeg_good", _save(_as_jpeg(ds, good), folder, "jpeg_good"), uid, "predicted")
    )
    ds, uid = base("jpeg_garbage_scan")
    start = _scan_start(good)
    garbage = np.random.default_rng(4).bytes(len(good) - start - 2).replace(b"\xff", b"\x00")
    path = _save(_as_jpeg(ds, good[:start] + garbage + b"\xff\xd9"), folder, "jpeg_garbage")
    cases.append(
        Case("jpeg_garbage_scan", path, uid, "rejected", 0, "cannot decode", "undecodable")
    )
    ds, uid = base("jpeg_cut_in_half")
    path = _save(_as_jpeg(ds, good[: len(good) // 2]), folder, "jpeg_half")
    cases.append(Case("jpeg_cut_in_half", path, uid, "rejected", 0, "cannot decode", "undecodable"))
    ds, uid = base("jpeg_rows_columns_mismatch")
    ds.Rows, ds.Columns = ds.Rows * 2, ds.Columns * 2
    path = _save(_as_jpeg(ds, good), folder, "jpeg_mismatch")
    cases.append(
        Case("jpeg_rows_columns_mismatch", path, uid, "rejected", 0, "cannot decode", "undecodable")
    )

    # 16-bit MONOCHROME2 (12 bits stored).
    ds, uid = base("monochrome2_16_bit")
    wide = ds.pixel_array.astype(np.uint16) * 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = wide.tobytes()
    ds["PixelData"].VR = "OW"
    cases.append(Case("monochrome2_16_bit", _save(ds, folder, "mono16"), uid, "predicted"))

    # A cine loop: 150 frames of 480 x 640 RGB (138 MB), Ultrasound Multi-frame.
    rng = np.random.default_rng(5)
    tissue = np.clip(rng.rayleigh(40, (480 - 88, 640 - 144, 3)), 1, 250).astype(np.uint8)
    ds = _base("cine_150_rgb", tissue)
    frame = ds.pixel_array
    assert frame.shape == (480, 640, 3)
    frames = np.stack([np.roll(frame, k, axis=1) for k in range(150)])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"
    ds.NumberOfFrames = 150
    ds.FrameTime = 33.3
    ds.FrameIncrementPointer = 0x00181063
    ds.PixelData = frames.tobytes()
    del frames
    uid = str(ds.SOPInstanceUID)

    def is_cine(row: dict[str, Any]) -> None:
        assert row["number_of_frames"] == 150

    cases.append(Case("cine_150_rgb", _save(ds, folder, "cine"), uid, "predicted", check=is_cine))
    del ds

    # Patient names beyond ASCII, in three character sets.
    for name, charset, person in (
        ("name_utf8", "ISO_IR 192", "Müller^Jörg"),
        ("name_latin1", "ISO_IR 100", "Ørsted^Åse"),
        ("name_japanese", ["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ):
        ds, uid = base(name, patient_name=person)
        ds.SpecificCharacterSet = charset
        ds.ImageComments = "plain"

        def same_name(row: dict[str, Any], person: str = person) -> None:
            assert row["patient_name"] == person

        cases.append(Case(name, _save(ds, folder, name), uid, "predicted", check=same_name))

    # A 64 KB study description: in Implicit VR, and as VR UN in Explicit VR (the only way
    # an explicit LO holds more than 65,534 bytes; archives forward unknown VRs so).
    long_text = ("LONG DESCRIPTION " * 4000)[:65536]

    def full_description(row: dict[str, Any]) -> None:
        assert row["study_description"] == long_text.strip()

    ds, uid = base("description_64kb_implicit")
    ds.StudyDescription = long_text
    path = _save(ds, folder, "description_64kb_implicit", implicit=True)
    cases.append(Case("description_64kb_implicit", path, uid, "predicted", check=full_description))
    ds, uid = base("description_64kb_un")
    ds.add(DataElement(0x00081030, "UN", long_text.encode()))
    path = _save(ds, folder, "description_64kb_un")
    cases.append(Case("description_64kb_un", path, uid, "predicted", check=full_description))
    # Short text elements as UN: decoded as their dictionary VR.
    ds, uid = base("short_text_as_un", patient_name="Un^Known")
    ds.add(DataElement(0x00100010, "UN", "Dürr^Ute".encode()))
    ds.add(DataElement(0x00081030, "UN", b"THYROID UN "))

    def decoded(row: dict[str, Any]) -> None:
        assert (row["patient_name"], row["study_description"]) == ("Dürr^Ute", "THYROID UN")

    path = _save(ds, folder, "short_text_as_un")
    cases.append(Case("short_text_as_un", path, uid, "predicted", check=decoded))

    # Dates that are not dates: the instance is predicted, the dates are unknown.
    ds, uid = base("malformed_dates")
    ds.StudyDate = "2021-13-45"
    ds.PatientBirthDate = "19XX0101"
    ds.SeriesDate = "yesterday"
    ds.StudyTime = "25:61"

    def no_dates(row: dict[str, Any]) -> None:
        assert (row["study_date"], row["birth_date"]) == (None, None)

    path = _save(ds, folder, "malformed_dates")
    cases.append(Case("malformed_dates", path, uid, "predicted", check=no_dates))
    return cases


def all_cases(folder: Path) -> list[Case]:
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bad cases make pydicom warn, on purpose
        cases = retired_class_cases(folder) + bad_instance_cases(folder)
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


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in KiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


@dataclass
class Site:
    pipeline: Pipeline
    cases: dict[str, Case]
    statuses: dict[str, int] = field(default_factory=dict)
    listener_rss_before_kib: int = 0

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
    """Every acknowledged case in a final state, a rejection stored for every refusal."""
    refused = sum(1 for status in site.statuses.values() if status != 0x0000)
    if site.pipeline.scalar("SELECT count(*) FROM rejections") != refused:
        return False
    for name, status in site.statuses.items():
        if status == 0x0000:
            row = site.stored(site.cases[name])
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
            result.listener_rss_before_kib = _memory_kib(pipeline.procs["listener"].pid)["VmRSS"]
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
        "not_dicom",
        "missing_sop_instance_uid",
        "missing_study_uid",
        "invalid_series_uid",
        "no_pixel_data",
        "truncated_pixel_data",
        "rows_larger_than_pixel_data",
        "rows_smaller_than_pixel_data",
        "odd_length_padded",
        "wrong_sop_class",
        "jpeg_good",
        "jpeg_garbage_scan",
        "jpeg_cut_in_half",
        "jpeg_rows_columns_mismatch",
        "monochrome2_16_bit",
        "cine_150_rgb",
        "name_utf8",
        "name_latin1",
        "name_japanese",
        "description_64kb_implicit",
        "description_64kb_un",
        "short_text_as_un",
        "malformed_dates",
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


def test_a_study_refused_entirely_gets_a_result_saying_so(site: Site) -> None:
    # Each case is a study of its own. One refused with a valid Study Instance UID in its
    # header gets a result without a finding; one whose header names no study cannot.
    def reason(name: str) -> object:
        with site.pipeline.engine.connect() as conn:
            return conn.execute(
                sa.text("SELECT reason FROM study_results_latest WHERE study_instance_uid = :u"),
                {"u": _uids(name)["study"]},
            ).scalar()

    for name in ("no_pixel_data", "truncated_pixel_data", "wrong_sop_class"):
        wait_for(lambda n=name: reason(n) == NO_USABLE_IMAGES, 60, f"a result for {name}")
    assert reason("missing_study_uid") is None


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


def _data_set_bytes(path: Path) -> bytes:
    """A DICOM file's bytes after its file meta group."""
    raw = path.read_bytes()
    return raw[132 + 12 + int.from_bytes(raw[140:144], "little") :]


def test_the_spool_holds_the_data_set_as_sent(site: Site) -> None:
    # Cases pynetdicom sent as they are (storescu re-encodes what it sends).
    for name in ("jpeg_good", "description_64kb_un", "monochrome2_16_bit"):
        case = site.cases[name]
        spooled = site.pipeline.scalar(
            f"SELECT spool_path FROM instances WHERE sop_instance_uid = '{case.sop_instance_uid}'"
        )
        assert _data_set_bytes(Path(str(spooled))) == _data_set_bytes(case.path), name


def test_the_listener_holds_a_large_instance_once(site: Site) -> None:
    # The 138 MB cine: pynetdicom's receive buffer is the only copy (it was four).
    size_kib = site.cases["cine_150_rgb"].path.stat().st_size // 1024
    peak = _memory_kib(site.pipeline.procs["listener"].pid)["VmHWM"]
    grown = peak - site.listener_rss_before_kib
    assert grown < 1.6 * size_kib, (
        f"listener peak {peak / 1024:.0f} MiB, {grown / size_kib:.2f} x the instance above "
        f"its {site.listener_rss_before_kib / 1024:.0f} MiB before"
    )


def test_every_process_survives_and_still_answers(site: Site) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    pipeline = site.pipeline
    for name, proc in pipeline.procs.items():
        assert proc.poll() is None, f"{name} exited with {proc.returncode}\n{pipeline.logs()}"
    ae = AE(ae_title="EDGESCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", pipeline.port, ae_title="THYROCAD")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_echo().Status) == 0x0000
    finally:
        assoc.release()
    folder = pipeline.data_dir / "after"
    folder.mkdir(exist_ok=True)
    ds = _base("after_everything")
    path = _save(ds, folder, "after_everything")
    assert send_with_pynetdicom([path], pipeline.port) == [0x0000]
    after = Case("after_everything", path, str(ds.SOPInstanceUID), "predicted")
    wait_for(
        lambda: (site.stored(after) or {}).get("state") == "predicted",
        120,
        lambda: f"a good instance predicted after all the cases\n{pipeline.logs()}",
    )
    # Bad input is an answer, not a programming error: no process logged a traceback.
    for name in ("listener", "inference"):
        log = (pipeline.data_dir / f"{name}.log").read_text(errors="replace")
        assert "Traceback" not in log, f"{name}:\n{log[-3000:]}"


def test_full_spool_answers_out_of_resources_with_a_reason(site: Site) -> None:
    # Last in this module: it restarts the listener with a spool that is always "full".
    pipeline = site.pipeline
    pipeline.kill("listener")
    pipeline.env["THYROCAD_SPOOL_MIN_FREE_MB"] = str(2**40)
    pipeline.start("listener")
    folder = pipeline.data_dir / "full"
    folder.mkdir(exist_ok=True)
    ds = _base("spool_full")
    path = _save(ds, folder, "spool_full")
    assert send_with_pynetdicom([path], pipeline.port) == [0xA700]
    case = _refused(
        "spool_full", path, str(ds.SOPInstanceUID), 0xA700, "spool has less than", "spool_full"
    )
    wait_for(lambda: bool(site.rejections(case)), 30, "the stored rejection")
    (row,) = site.rejections(case)
    assert row["dimse_status"] == 0xA700
    assert re.search(case.reason, row["reason"]), row["reason"]
    assert reason_class(row["reason"], 0xA700) == "spool_full"
