"""pacs.dicom_files: synthetic scanner screens and wrapped images that read back as valid
Ultrasound Image Storage and crop back, through pacs.pixels, to exactly their tissue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import UID, ExplicitVRLittleEndian, UltrasoundImageStorage

from thyrocad.pacs.dicom_files import (
    SYNTHETIC_MANUFACTURER,
    PatientInfo,
    StudyInfo,
    uid_from,
    ultrasound_dataset,
    wrap_image,
    write_dataset,
)
from thyrocad.pacs.pixels import (
    content_box,
    images_from_bytes,
    images_from_dataset,
    images_from_file,
    resize,
    ultrasound_region,
)

DDTI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ddti" / "cropped"

PATIENT = PatientInfo(
    patient_id="SYN0007", patient_name="Popescu^Ana", birth_date="19750312", sex="F"
)


def _study(seed: str = "s1") -> StudyInfo:
    return StudyInfo(
        study_instance_uid=uid_from(f"study/{seed}"),
        study_date="20240102",
        study_time="101500",
        accession_number="ACC0007",
    )


def _tissue(shape: tuple[int, ...] = (180, 240), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.rayleigh(40, shape), 1, 250).astype(np.uint8)


def _synthetic(tissue: np.ndarray, seed: str = "s1", **kwargs) -> pydicom.Dataset:  # type: ignore[no-untyped-def]
    return ultrasound_dataset(
        tissue,
        patient=PATIENT,
        study=_study(seed),
        series_instance_uid=uid_from(f"series/{seed}"),
        sop_instance_uid=uid_from(f"sop/{seed}"),
        instance_number=3,
        annotations=["GAIN 52", "DR 60"],
        view="RIGHT LOBE TRANS",
        laterality="R",
        **kwargs,
    )


def test_uid_from_is_deterministic_and_valid() -> None:
    first, again, other = uid_from("patient-1/study"), uid_from("patient-1/study"), uid_from("x")
    assert first == again != other
    assert first.startswith("2.25.")
    assert UID(first).is_valid and len(first) <= 64


def test_written_dataset_reads_back_with_its_attributes(tmp_path: Path) -> None:
    tissue = _tissue()
    path = write_dataset(_synthetic(tissue), tmp_path / "deep" / "er" / "image.dcm")
    assert path == tmp_path / "deep" / "er" / "image.dcm"
    assert path.read_bytes()[128:132] == b"DICM"
    assert [p.name for p in path.parent.iterdir()] == ["image.dcm"], "no temporary left"

    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == UltrasoundImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == uid_from("sop/s1")
    assert ds.SOPClassUID == UltrasoundImageStorage
    assert ds.Modality == "US" and ds.BodyPartExamined == "THYROID"
    assert ds.PatientID == "SYN0007" and str(ds.PatientName) == "Popescu^Ana"
    assert ds.PatientBirthDate == "19750312" and ds.PatientSex == "F"
    assert ds.StudyInstanceUID == uid_from("study/s1")
    assert ds.SeriesInstanceUID == uid_from("series/s1")
    assert ds.StudyDate == "20240102" and ds.StudyTime == "101500"
    assert ds.AccessionNumber == "ACC0007" and ds.StudyDescription == "US THYROID"
    assert ds.InstanceNumber == 3 and ds.SeriesNumber == 1
    assert ds.ImageLaterality == "R"
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
    # The synthetic markers.
    assert ds.Manufacturer == SYNTHETIC_MANUFACTURER
    assert "SYNTHETIC IMAGE \N{EM DASH} not clinical data" in ds.ImageComments
    assert ds.BurnedInAnnotation == "YES"
    region = ds.SequenceOfUltrasoundRegions[0]
    assert len(ds.SequenceOfUltrasoundRegions) == 1
    assert region.RegionSpatialFormat == 1 and region.RegionDataType == 1
    assert region.PhysicalUnitsXDirection == region.PhysicalUnitsYDirection == 3
    assert region.PhysicalDeltaX == region.PhysicalDeltaY == pytest.approx(0.005)


def test_region_is_exactly_the_tissue_and_text_is_outside(tmp_path: Path) -> None:
    tissue = _tissue((200, 200))
    ds = pydicom.dcmread(write_dataset(_synthetic(tissue), tmp_path / "a.dcm"))
    left, top, right, bottom = ultrasound_region(ds)  # type: ignore[misc]
    assert (right - left, bottom - top) == (200, 200)
    screen = ds.pixel_array
    np.testing.assert_array_equal(screen[top:bottom, left:right], tissue)
    outside = screen.copy()
    outside[top:bottom, left:right] = 0
    assert (outside > 128).sum() > 200, "burned-in text and scale are on the screen"
    assert (outside[:top] > 128).sum() > 100, "the header band carries the patient text"
    # Through the one preprocessing path, at the tissue's own size: the tissue, exactly.
    out = images_from_file(tmp_path / "a.dcm", 200)
    assert len(out) == 1 and out[0].frame_index == 0
    np.testing.assert_array_equal(out[0].pixels, tissue)


def test_non_square_tissue_matches_a_direct_resize(tmp_path: Path) -> None:
    tissue = _tissue((150, 260))
    path = write_dataset(_synthetic(tissue), tmp_path / "b.dcm")
    np.testing.assert_array_equal(images_from_file(path, 96)[0].pixels, resize(tissue, 96))


def test_rgb_tissue_gives_an_rgb_dataset(tmp_path: Path) -> None:
    grey = _tissue((120, 160))
    rgb = np.stack([grey, grey, grey], axis=-1)
    rgb[40:60, 50:90] = (200, 30, 30)  # a colour Doppler blob
    ds = pydicom.dcmread(write_dataset(_synthetic(rgb), tmp_path / "c.dcm"))
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    out = images_from_dataset(ds, 160)[0].pixels
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(out, resize(expected, 160))


def test_same_seed_writes_the_same_bytes(tmp_path: Path) -> None:
    first = write_dataset(_synthetic(_tissue()), tmp_path / "1.dcm").read_bytes()
    second = write_dataset(_synthetic(_tissue()), tmp_path / "2.dcm").read_bytes()
    other = write_dataset(_synthetic(_tissue(), seed="s2"), tmp_path / "3.dcm").read_bytes()
    assert first == second
    assert first != other


def test_clinical_looking_dataset_has_no_synthetic_markers() -> None:
    ds = _synthetic(_tissue(), synthetic=False)
    assert ds.Manufacturer == ""
    assert "SYNTHETIC" not in ds.get("ImageComments", "")
    assert ds.ImageType[0] == "ORIGINAL"


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        _synthetic(_tissue().astype(np.float32))
    with pytest.raises(ValueError, match="rows, columns"):
        _synthetic(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(ValueError, match="laterality"):
        ultrasound_dataset(
            _tissue(),
            patient=PATIENT,
            study=_study(),
            series_instance_uid="1.2.3",
            sop_instance_uid="1.2.3.4",
            instance_number=1,
            laterality="right",
        )


def _wrapped(pixels: np.ndarray, synthetic: bool = False) -> pydicom.Dataset:
    return wrap_image(
        pixels,
        patient=PATIENT,
        study=_study(),
        series_instance_uid=uid_from("series/w"),
        sop_instance_uid=uid_from("sop/w"),
        instance_number=1,
        synthetic=synthetic,
        source_note="DDTI cropped/1_1.png",
    )


def test_wrapped_clean_image_is_whole_and_unchanged(tmp_path: Path) -> None:
    pixels = _tissue((300, 300))
    path = write_dataset(_wrapped(pixels), tmp_path / "w.dcm")
    ds = pydicom.dcmread(path)
    assert ultrasound_region(ds) == (0, 0, 300, 300)
    np.testing.assert_array_equal(ds.pixel_array, pixels)
    assert ds.DerivationDescription == "DDTI cropped/1_1.png"
    assert "BurnedInAnnotation" not in ds, "unknown for a foreign image: not claimed"
    assert ds.Manufacturer == "" and "SYNTHETIC" not in ds.ImageComments
    np.testing.assert_array_equal(images_from_bytes(path.read_bytes(), 300)[0].pixels, pixels)
    assert "SYNTHETIC IMAGE" in _wrapped(pixels, synthetic=True).ImageComments


def test_wrapped_image_crops_like_the_same_image_as_a_file(tmp_path: Path) -> None:
    # A crop with the scanner's text on its right edge: as a PNG it is content-cropped, so
    # the wrapped dataset must carry that box as its region and give the same pixels.
    pixels = _tissue((200, 200))
    pixels[:, 176:] = 0
    pixels[20:30, 180:196] = 255
    pixels[60:70, 182:194] = 255
    Image.fromarray(pixels).save(tmp_path / "crop.png")
    ds = _wrapped(pixels)
    assert ultrasound_region(ds) == content_box(pixels) != (0, 0, 200, 200)
    np.testing.assert_array_equal(
        images_from_dataset(ds, 64)[0].pixels, images_from_file(tmp_path / "crop.png", 64)[0].pixels
    )


@pytest.mark.skipif(not DDTI.is_dir(), reason="../shared/data/ddti is absent (CI has it)")
@pytest.mark.parametrize("name", ["1_1.png", "338_2(1).png"])
def test_real_crop_wrapped_equals_the_png_path(name: str, tmp_path: Path) -> None:
    path = DDTI / name
    if not path.exists():
        pytest.skip(f"{name} not in this copy of DDTI")
    pixels = np.asarray(Image.open(path).convert("L"))
    written = write_dataset(_wrapped(pixels), tmp_path / "ddti.dcm")
    np.testing.assert_array_equal(
        images_from_file(written, 224)[0].pixels, images_from_file(path, 224)[0].pixels
    )
