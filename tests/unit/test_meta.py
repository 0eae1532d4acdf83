"""Header validation: what the listener accepts, and the status of what it refuses."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacs.errors import InvalidInstance
from pacs.meta import describe, read_dataset

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

    from pacs.meta import ULTRASOUND_SOP_CLASSES, register_storage_classes

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
