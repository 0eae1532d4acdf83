"""Header validation: what the listener accepts, and the status of what it refuses."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from thyrocad.pacs.errors import InvalidInstance
from thyrocad.pacs.meta import describe, read_dataset

US = "1.2.840.10008.5.1.4.1.1.6.1"


def make(**overrides: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = US
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "P1"
    ds.StudyDate = "20260105"
    ds.Modality = "US"
    ds.Rows, ds.Columns = 4, 5
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(20)
    for key, value in overrides.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def test_valid_header_becomes_plain_data() -> None:
    ds = make()
    meta = describe(ds)
    assert meta.sop_instance_uid == ds.SOPInstanceUID
    assert meta.patient_key == "P1"
    assert meta.study_date is not None and meta.study_date.isoformat() == "2026-01-05"
    assert (meta.rows, meta.columns, meta.number_of_frames) == (4, 5, 1)


@pytest.mark.parametrize(
    ("overrides", "reason", "status"),
    [
        ({"SOPInstanceUID": None}, "missing SOPInstanceUID", 0xA900),
        ({"StudyInstanceUID": None}, "missing StudyInstanceUID", 0xA900),
        ({"SeriesInstanceUID": "not a uid!"}, "invalid SeriesInstanceUID", 0xA900),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}, "not an ultrasound", 0x0122),
        ({"PixelData": None}, "no pixel data", 0xA900),
        ({"PixelData": bytes(7)}, "truncated pixel data: expected 20 bytes, got 7", 0xA900),
        ({"PixelData": bytes(22)}, "pixel data longer than Rows/Columns", 0xA900),
        (
            {"Rows": 2},
            "longer than Rows/Columns, samples, bits and frames say: expected 10",
            0xA900,
        ),
        ({"NumberOfFrames": 2}, "truncated pixel data: expected 40 bytes, got 20", 0xA900),
    ],
)
def test_refusals_carry_reason_and_status(overrides: dict, reason: str, status: int) -> None:
    with pytest.raises(InvalidInstance) as info:
        describe(make(**overrides))
    assert reason in info.value.reason
    assert info.value.status == status


def test_garbage_bytes_are_not_dicom() -> None:
    with pytest.raises(InvalidInstance) as info:
        describe(read_dataset(b"\x00\x01garbage" * 10))
    assert info.value.status == 0xC000
    assert "not a DICOM dataset" in info.value.reason


def test_every_accepted_sop_class_is_handled_by_the_storage_service() -> None:
    # pynetdicom 3.0 knows no retired storage class: a C-STORE in an accepted context for
    # one would find no service and abort the association.
    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import uid_to_service_class

    from thyrocad.pacs.meta import ULTRASOUND_SOP_CLASSES, register_storage_classes

    register_storage_classes()
    for uid in ULTRASOUND_SOP_CLASSES:
        assert uid_to_service_class(uid) is StorageServiceClass, uid
    assert register_storage_classes() == [], "a second call registers nothing"


@pytest.mark.parametrize(("rows", "columns", "length", "ok"), [(3, 5, 16, True), (3, 5, 18, False)])
def test_only_the_padding_byte_of_an_odd_length_may_follow_the_pixels(
    rows: int, columns: int, length: int, ok: bool
) -> None:
    ds = make(Rows=rows, Columns=columns, PixelData=bytes(length))
    if ok:
        assert describe(ds).rows == rows
    else:
        with pytest.raises(InvalidInstance, match="expected 15 bytes, got 18"):
            describe(ds)


def test_native_ybr_full_422_holds_two_samples_per_pixel() -> None:
    ds = make(SamplesPerPixel=3, PhotometricInterpretation="YBR_FULL_422", PixelData=bytes(40))
    assert describe(ds).columns == 5
    with pytest.raises(InvalidInstance, match="expected 40 bytes, got 60"):
        describe(
            make(SamplesPerPixel=3, PhotometricInterpretation="YBR_FULL_422", PixelData=bytes(60))
        )


# --------------------------------------------------------------------------- VR UN text


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.file_meta.MediaStorageSOPClassUID = US
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_text_received_as_un_is_decoded_as_its_dictionary_vr() -> None:
    # pydicom itself converts UN values shorter than 64 KB; longer ones stay bytes.
    long_text = "THYROID " * 9000
    ds = make(SpecificCharacterSet="ISO_IR 100")
    ds.add(DataElement(0x00081030, "UN", long_text.encode("latin-1")))
    ds.add(DataElement(0x0008103E, "UN", ("Schilddrüse " * 6000).encode("latin-1")))
    ds.add(DataElement(0x00100010, "UN", "Ørsted^Åse".encode("latin-1")))
    ds.add(DataElement(0x00080020, "UN", b"20240229"))
    meta = describe(read_dataset(_encoded(ds)))
    assert meta.study_description == long_text.strip()
    assert meta.series_description == ("Schilddrüse " * 6000).strip()
    assert meta.patient_name == "Ørsted^Åse"
    assert meta.study_date == dt.date(2024, 2, 29)


def test_multi_valued_text_is_joined_by_backslashes() -> None:
    meta = describe(read_dataset(_encoded(make(StudyDescription=["US", "THYROID"]))))
    assert meta.study_description == "US\\THYROID"


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
@pytest.mark.parametrize("value", ["2021-13-45", "19XX0101", "20210230", "", "2021"])
def test_malformed_dates_are_unknown(value: str) -> None:
    meta = describe(read_dataset(_encoded(make(StudyDate=value, PatientBirthDate=value))))
    assert (meta.study_date, meta.patient_birth_date) == (None, None)


# --------------------------------------------------------------------------- the handler


class _Intake:
    def __init__(self) -> None:
        self.rejections: list[tuple[str | None, str, int]] = []
        self.received: list[str] = []
        self.studies: list[Any] = []

    def accepted(self, meta: Any, entry: Any, calling_aet: str) -> None:
        self.received.append(meta.sop_instance_uid)

    def rejected(
        self,
        sop_instance_uid: str | None,
        calling: str,
        reason: str,
        status: int,
        study: Any = None,
    ) -> None:
        self.rejections.append((sop_instance_uid, reason, status))
        self.studies.append(study)


def _store(
    data: bytes | Exception, tmp_path: Path, requested: str = "1.2.3.4"
) -> tuple[int, _Intake]:
    from thyrocad.pacs.listener import handle_store
    from thyrocad.pacs.spool import Spool

    def encoded_dataset(include_meta: bool = True) -> bytes:
        if isinstance(data, Exception):
            raise data
        return data

    event = SimpleNamespace(
        request=SimpleNamespace(AffectedSOPInstanceUID=requested),
        context=SimpleNamespace(transfer_syntax=ExplicitVRLittleEndian),
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="MODALITY ")),
        encoded_dataset=encoded_dataset,
    )
    intake = _Intake()
    status = handle_store(event, Spool(tmp_path), intake)  # type: ignore[arg-type]
    return status, intake


def test_a_refusal_keeps_the_requests_sop_instance_uid(tmp_path: Path) -> None:
    status, intake = _store(b"\x00\x01garbage" * 10, tmp_path)
    assert status == 0xC000
    assert intake.rejections[0][0] == "1.2.3.4"
    ds = make()
    del ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = US
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    status, intake = _store(buffer.getvalue(), tmp_path)
    assert (status, intake.rejections) == (0xA900, [("1.2.3.4", "missing SOPInstanceUID", 0xA900)])


def test_the_data_sets_own_uid_wins_over_the_requests(tmp_path: Path) -> None:
    ds = make(PixelData=None)
    status, intake = _store(_encoded(ds), tmp_path, requested="9.9.9")
    assert (status, intake.rejections[0][0]) == (0xA900, ds.SOPInstanceUID)


def test_an_unforeseen_error_is_a_refusal_without_the_exceptions_text(tmp_path: Path) -> None:
    status, intake = _store(KeyError("DOE^JANE"), tmp_path)
    assert status == 0xC000
    ((uid, reason, _),) = intake.rejections
    assert uid == "1.2.3.4"
    assert reason.startswith("cannot process the data set: KeyError in test_meta.py:")
    assert "DOE" not in reason


# --------------------------------------------------------------------------- received parts


def test_a_header_is_read_from_parts_without_reading_the_pixel_data(tmp_path: Path) -> None:
    import tracemalloc

    from thyrocad.pacs.received import PartsReader
    from thyrocad.pacs.spool import Spool

    pixels = bytes(range(256)) * (3 * 2**20 // 256)  # 3 MiB, above the deferral threshold
    ds = make(Rows=1024, Columns=1024, SamplesPerPixel=3, PixelData=pixels)
    ds.PhotometricInterpretation = "RGB"
    data = _encoded(ds)
    with memoryview(data) as view:
        parts = [data[:500], view[500:]]
        tracemalloc.start()
        try:
            meta = describe(read_dataset(parts))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**20, f"{peak} bytes allocated to read a header"
        assert meta.rows == 1024
        reader = PartsReader(parts)
        assert reader.read() == data
        reader.seek(-10, io.SEEK_END)
        assert reader.read(100) == data[-10:]
        entry = Spool(tmp_path).write(meta.sop_instance_uid, parts)
    assert entry.path.read_bytes() == data
    assert entry.size_bytes == len(data)
    assert entry.sha256 == Spool(tmp_path / "b").write(meta.sop_instance_uid, data).sha256


def test_a_deferred_pixel_data_length_is_still_checked() -> None:
    ds = make(Rows=1024, Columns=1024, PixelData=bytes(2**20 + 4096))
    with pytest.raises(InvalidInstance, match="pixel data longer than"):
        describe(read_dataset(_encoded(ds)))
    ds = make(Rows=1024, Columns=1024, PixelData=bytes(2**20 - 4096))
    with pytest.raises(InvalidInstance, match="truncated pixel data"):
        describe(read_dataset(_encoded(ds)))


def test_the_handler_spools_what_pynetdicom_received_byte_for_byte(tmp_path: Path) -> None:
    # The parts are the same bytes Event.encoded_dataset() would join: file meta, then
    # pynetdicom's buffer (read through a view, not copied).
    from pynetdicom.dsutils import encode_file_meta

    from thyrocad.pacs.listener import handle_store
    from thyrocad.pacs.spool import Spool

    ds = make()
    body = _encoded(ds)
    stream = io.BytesIO(body[132 + 12 + int.from_bytes(body[140:144], "little") :])
    meta_ds = FileMetaDataset()
    meta_ds.MediaStorageSOPClassUID = US
    meta_ds.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta_ds.TransferSyntaxUID = ExplicitVRLittleEndian
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta_ds) + stream.getvalue()
    event = SimpleNamespace(
        request=SimpleNamespace(AffectedSOPInstanceUID=ds.SOPInstanceUID, DataSet=stream),
        context=SimpleNamespace(transfer_syntax=ExplicitVRLittleEndian),
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="MODALITY")),
        file_meta=meta_ds,
    )
    intake = _Intake()
    assert handle_store(event, Spool(tmp_path), intake) == 0x0000  # type: ignore[arg-type]
    assert intake.received == [ds.SOPInstanceUID]
    (path,) = Spool(tmp_path).entries()
    assert path.read_bytes() == expected
    stream.write(b"more")  # the view is released: pynetdicom's buffer is its own again
