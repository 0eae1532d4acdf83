"""pacs.pixels: decoding every encoding ultrasound machines send, grey conversion, frame
policies, region and content cropping, and clear reasons for what cannot be decoded."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    UltrasoundImageStorage,
)

from tests.dicom_data import ultrasound_test_files
from thyrocad.pacs import pixels
from thyrocad.pacs.errors import PixelError
from thyrocad.pacs.pixels import (
    FrameImage,
    FramePolicy,
    content_box,
    images_from_bytes,
    images_from_dataset,
    images_from_file,
    resize,
    to_grey,
    ultrasound_region,
)

DDTI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ddti" / "cropped"

# The 16 ultrasound files pydicom-data ships (shared/data/README.md); pydicom's own test
# files add five more, which the scan below finds as well.
PYDICOM_DATA_US = {
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "OBXXXX1A.dcm",
    "OBXXXX1A_2frame.dcm",
    "OBXXXX1A_expb.dcm",
    "OBXXXX1A_expb_2frame.dcm",
    "OBXXXX1A_rle.dcm",
    "OBXXXX1A_rle_2frame.dcm",
    "US1_J2KI.dcm",
    "US1_J2KR.dcm",
    "US1_UNCI.dcm",
    "US1_UNCR.dcm",
    "color-pl.dcm",
    "color-px.dcm",
    "color3d_jpeg_baseline.dcm",
    "gdcm-US-ALOKA-16.dcm",
    "gdcm-US-ALOKA-16_big.dcm",
}

# A reason must say what is wrong, not just "error".
SPECIFIC_REASON = re.compile(
    r"unsupported transfer syntax .+ \(no decoder installed|no pixel decoder exists"
    r"|truncated pixel data: expected \d+ bytes, got \d+"
    r"|cannot decode frame \d+ of \d+ \(.+\): \w+"
    r"|no pixel data|unsupported photometric interpretation|PALETTE COLOR without"
)


def _grey_dataset(
    grey: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    region: tuple[int, int, int, int] | None = None,
    bits: int = 8,
) -> Dataset:
    """A minimal uncompressed ultrasound dataset; ``region`` is DICOM-style inclusive."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.Modality = "US"
    ds.Rows, ds.Columns = grey.shape[:2]
    ds.SamplesPerPixel = 3 if grey.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    if grey.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(grey).tobytes()
    ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    if region is not None:
        item = Dataset()
        item.RegionSpatialFormat = 1
        item.RegionDataType = 1
        (
            item.RegionLocationMinX0,
            item.RegionLocationMinY0,
            item.RegionLocationMaxX1,
            item.RegionLocationMaxY1,
        ) = region
        ds.SequenceOfUltrasoundRegions = [item]
    return ds


def _speckle(shape: tuple[int, ...], mean: float = 60.0, seed: int = 0) -> np.ndarray:
    """Rayleigh speckle like B-mode tissue, capped below 250 so burned-in text (255) is
    told apart from tissue."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.rayleigh(mean / 1.2533, shape), 1, 249).astype(np.uint8)


def _screen(tissue: np.ndarray, top: int = 40, left: int = 60) -> np.ndarray:
    """A black scanner screen with the tissue inside and white text in its bands."""
    rows, columns = tissue.shape
    screen = Image.new("L", (left + columns + 20, top + rows + 30), 0)
    draw = ImageDraw.Draw(screen)
    draw.fontmode = "1"  # no antialiasing: every text pixel is 255
    draw.text((4, 4), "DOE, JANE  ID 12345", fill=255)
    draw.text((4, 18), "2024-01-02 THYROID", fill=255)
    draw.text((4, top + 10), "GAIN 52", fill=255)
    draw.text((left, top + rows + 8), "TIS<0.4 MI=0.8", fill=255)
    screen.paste(Image.fromarray(tissue), (left, top))
    return np.asarray(screen).copy()


# --------------------------------------------------------------------------- frame policy


def test_frame_policy_parse_and_indices() -> None:
    assert FramePolicy.parse("middle") == FramePolicy()
    assert FramePolicy.parse(" Every:10:5 ") == FramePolicy(mode="every", step=10, max_frames=5)
    assert str(FramePolicy.parse("every:3:4")) == "every:3:4"
    assert FramePolicy().indices(120) == [60]
    assert FramePolicy().indices(1) == [0]
    assert FramePolicy.parse("every:10:5").indices(120) == [0, 10, 20, 30, 40]
    assert FramePolicy.parse("every:50:16").indices(120) == [0, 50, 100]
    assert FramePolicy.parse("every:1:16").indices(1) == [0]


@pytest.mark.parametrize(
    "text", ["first", "every", "every:3", "every:0:5", "every:2:0", "every:a:b"]
)
def test_frame_policy_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="every:N:K"):
        FramePolicy.parse(text)


def test_frame_policy_validates_fields() -> None:
    with pytest.raises(ValueError):
        FramePolicy(mode="every", step=0)
    with pytest.raises(ValueError):
        FramePolicy(mode="first")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- real files


def test_scan_finds_the_pydicom_data_ultrasound_files() -> None:
    if get_testdata_file("US1_UNCR.dcm") is None:
        pytest.skip("pydicom-data is not installed (pip install pydicom-data)")
    names = {p.name for p in ultrasound_test_files()}
    assert names >= PYDICOM_DATA_US


@pytest.mark.parametrize("path", ultrasound_test_files(), ids=lambda p: p.name)
def test_real_ultrasound_file_decodes_or_says_why(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some files have known header quirks
        header = pydicom.dcmread(path, stop_before_pixels=True)
        try:
            images = images_from_file(path, 64)
        except PixelError as exc:
            assert SPECIFIC_REASON.search(exc.reason), exc.reason
            # Only a missing plugin is an acceptable reason here: the files are valid.
            assert not get_decoder(header.file_meta.TransferSyntaxUID).is_available, exc.reason
            return
    n_frames = int(header.get("NumberOfFrames", 1) or 1)
    assert len(images) == 1
    assert images[0].frame_index == (n_frames // 2 if n_frames > 1 else 0)
    for image in images:
        assert isinstance(image, FrameImage)
        assert image.pixels.dtype == np.uint8
        assert image.pixels.shape == (64, 64)
        assert image.pixels.std() > 5, "a real ultrasound image is not flat"


def _real(name: str) -> Path:
    found = get_testdata_file(name)
    if found is None:
        pytest.skip(f"{name} needs pydicom-data (pip install pydicom-data)")
    return Path(found)


def test_cine_frame_policies_decode_only_selected_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = pydicom.dcmread(_real("color3d_jpeg_baseline.dcm"))
    assert int(ds.NumberOfFrames) == 120
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    decoded: list[int | None] = []
    original = type(decoder).as_array

    def counting(self, src, *args, **kwargs):  # type: ignore[no-untyped-def]
        decoded.append(kwargs.get("index"))
        return original(self, src, *args, **kwargs)

    monkeypatch.setattr(type(decoder), "as_array", counting)
    middle = images_from_dataset(ds, 32)
    assert [im.frame_index for im in middle] == [60]
    assert decoded == [60]

    decoded.clear()
    every = images_from_dataset(ds, 32, FramePolicy.parse("every:10:5"))
    assert [im.frame_index for im in every] == [0, 10, 20, 30, 40]
    assert decoded == [0, 10, 20, 30, 40]
    assert all(im.pixels.shape == (32, 32) for im in every)
    assert not np.array_equal(every[0].pixels, every[4].pixels), "cine frames differ"


def test_two_frame_native_and_rle_give_the_same_middle_frame() -> None:
    results = [
        images_from_file(_real(name), 48)
        for name in ("OBXXXX1A_2frame.dcm", "OBXXXX1A_rle_2frame.dcm", "OBXXXX1A_expb_2frame.dcm")
    ]
    assert [r[0].frame_index for r in results] == [1, 1, 1]
    np.testing.assert_array_equal(results[0][0].pixels, results[1][0].pixels)
    np.testing.assert_array_equal(results[0][0].pixels, results[2][0].pixels)


def test_real_region_choice_and_clamping() -> None:
    # OBXXXX1A: a 2D region that ends at MaxX1 = 800 = Columns, and a smaller non-2D one.
    ds = pydicom.dcmread(_real("OBXXXX1A.dcm"), stop_before_pixels=True)
    assert ultrasound_region(ds) == (120, 60, 800, 519)
    # ALOKA: two side-by-side 2D regions and a small one of another format: the first of
    # the equal largest 2D regions wins.
    ds = pydicom.dcmread(_real("gdcm-US-ALOKA-16.dcm"), stop_before_pixels=True)
    assert ultrasound_region(ds) == (32, 24, 336, 416)


def test_real_content_crop_drops_header_and_footer_text() -> None:
    # US1_UNCR has no regions; its 5 lines of header text end at row ~100 and the tissue
    # runs from ~108 to ~335, above "LYMPH NODE" and the bottom scale text.
    ds = pydicom.dcmread(_real("US1_UNCR.dcm"))
    left, top, right, bottom = content_box(to_grey(ds, ds.pixel_array))
    assert 100 <= top <= 115
    assert 325 <= bottom <= 345
    assert left <= 20 and right >= 620


def test_jpeg_extended_12_bit_is_windowed_to_8_bit() -> None:
    # Not ultrasound, but pydicom's JPEG Extended (process 2 & 4) sample.
    images = images_from_file(_real("JPGExtended.dcm"), 32)
    assert images[0].pixels.dtype == np.uint8
    assert images[0].pixels.max() > 100


def test_nonconformant_jpeg_gives_the_decoders_reason() -> None:
    # JPEG-lossy.dcm is a known non-conformant stream that only GDCM reads.
    with pytest.raises(PixelError) as caught:
        images_from_file(_real("JPEG-lossy.dcm"), 32)
    reason = caught.value.reason
    assert reason.startswith("cannot decode frame 0 of 1 (JPEG Extended (Process 2 and 4)): ")
    assert "misplaced marker" in reason or "12-bit" in reason


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm"])
def test_jpeg_ybr_grey_matches_the_uncompressed_rgb(name: str) -> None:
    # YBR_FULL and YBR_FULL_422 JPEG baseline against the same picture stored as RGB: the
    # Y channel we keep must be the luma of the RGB.
    reference = images_from_file(_real("SC_rgb.dcm"), 100)[0].pixels.astype(int)
    ybr = images_from_file(_real(name), 100)[0].pixels.astype(int)
    assert np.abs(reference - ybr).mean() < 2.0


# --------------------------------------------------------------------------- cropping


def test_region_crop_keeps_text_out_and_tissue_exact() -> None:
    tissue = _speckle((90, 120))
    screen = _screen(tissue, top=40, left=60)
    assert (screen == 255).sum() > 100, "the screen has burned-in text"
    ds = _grey_dataset(screen, region=(60, 40, 60 + 120 - 1, 40 + 90 - 1))
    assert ultrasound_region(ds) == (60, 40, 180, 130)
    out = images_from_dataset(ds, 120)[0].pixels
    np.testing.assert_array_equal(out, resize(tissue, 120))
    assert out.max() < 250, "no text pixel reaches the output"


def test_region_prefers_largest_2d_tissue_region() -> None:
    ds = _grey_dataset(np.zeros((100, 200), np.uint8), region=(10, 10, 59, 59))
    other = Dataset()
    other.RegionSpatialFormat = 4  # waveform: bigger, but not tissue
    other.RegionLocationMinX0, other.RegionLocationMinY0 = 0, 60
    other.RegionLocationMaxX1, other.RegionLocationMaxY1 = 199, 99
    broken = Dataset()  # no coordinates at all
    bigger = Dataset()
    bigger.RegionSpatialFormat = 1
    bigger.RegionLocationMinX0, bigger.RegionLocationMinY0 = 70, 0
    bigger.RegionLocationMaxX1, bigger.RegionLocationMaxY1 = 190, 55
    ds.SequenceOfUltrasoundRegions = [ds.SequenceOfUltrasoundRegions[0], other, broken, bigger]
    assert ultrasound_region(ds) == (70, 0, 191, 56)
    ds.SequenceOfUltrasoundRegions = [other]
    assert ultrasound_region(ds) == (0, 60, 200, 100)
    del ds.SequenceOfUltrasoundRegions
    assert ultrasound_region(ds) is None


def test_content_crop_without_region_drops_text() -> None:
    tissue = _speckle((150, 200), mean=50)
    screen = _screen(tissue, top=48, left=80)
    left, top, right, bottom = content_box(screen)
    # Within a few pixels of the tissue (the search runs on a reduced copy) ...
    assert abs(left - 80) <= 4 and abs(top - 48) <= 4
    assert abs(right - 280) <= 4 and abs(bottom - 198) <= 4
    # ... and the text is gone from what reaches the model.
    out = images_from_dataset(_grey_dataset(screen), 64)[0].pixels
    assert out.max() < 250


def test_content_crop_keeps_an_all_tissue_image_whole() -> None:
    # A nodule crop: speckle with a dark (anechoic) nodule touching the bottom edge and a
    # hypoechoic band: nothing to crop.
    tissue = _speckle((300, 300), mean=45)
    yy, xx = np.mgrid[:300, :300]
    tissue[((yy - 250) / 70) ** 2 + ((xx - 150) / 90) ** 2 < 1] = 3
    tissue[:, :40] = _speckle((300, 40), mean=18, seed=1)
    assert content_box(tissue) == (0, 0, 300, 300)
    assert content_box(_speckle((300, 300), mean=20)) == (0, 0, 300, 300)


def test_content_crop_of_a_black_image_is_the_whole_image() -> None:
    assert content_box(np.zeros((50, 70), np.uint8)) == (0, 0, 70, 50)
    assert content_box(np.zeros((5, 5), np.uint8)) == (0, 0, 5, 5)


def test_plain_images_all_tissue_png_is_not_cropped(tmp_path: Path) -> None:
    tissue = _speckle((300, 300), mean=40)
    Image.fromarray(tissue).save(tmp_path / "crop.png")
    Image.fromarray(np.stack([tissue] * 3, axis=-1)).save(tmp_path / "crop.bmp")
    Image.fromarray(tissue).save(tmp_path / "crop.jpg", quality=95)
    for name in ("crop.png", "crop.bmp"):
        images = images_from_file(tmp_path / name, 300)
        assert [im.frame_index for im in images] == [0]
        np.testing.assert_array_equal(images[0].pixels, tissue)
    jpeg = images_from_file(tmp_path / "crop.jpg", 300)[0].pixels
    assert np.abs(jpeg.astype(int) - tissue).mean() < 8


def test_plain_image_screen_is_cropped(tmp_path: Path) -> None:
    Image.fromarray(_screen(_speckle((150, 200)), top=48, left=80)).save(tmp_path / "s.png")
    out = images_from_file(tmp_path / "s.png", 64)[0].pixels
    assert out.shape == (64, 64) and out.max() < 250


def test_plain_16_bit_png_is_scaled(tmp_path: Path) -> None:
    values = (_speckle((64, 64)).astype(np.uint16) * 200 + 1000).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    out = images_from_file(tmp_path / "deep.png", 64)[0].pixels
    expected = (values.astype(float) - values.min()) / (values.max() - values.min()) * 255
    assert np.abs(out.astype(int) - np.round(expected)).max() <= 1


# Crops of DDTI that carry the scanner's burned-in text on an edge (checked by eye): the
# content crop rightly removes it. Every other crop must stay whole.
DDTI_WITH_TEXT = {
    "104_1(2).png": (0, 0, 270, 300),
    "338_2(1).png": (0, 0, 300, 196),
    "70_1(2).png": (0, 0, 288, 300),  # also a large anechoic nodule, which stays
}


@pytest.mark.skipif(not DDTI.is_dir(), reason="../shared/data/ddti is absent (CI has it)")
def test_real_thyroid_crops_are_not_over_cropped() -> None:
    files = sorted(DDTI.glob("*.png"))
    sample = {*files[::16], *(DDTI / n for n in DDTI_WITH_TEXT)}
    for path in sorted(sample):
        grey = np.asarray(Image.open(path).convert("L"))
        box = content_box(grey)
        expected = DDTI_WITH_TEXT.get(path.name, (0, 0, grey.shape[1], grey.shape[0]))
        assert box == expected, path.name


# --------------------------------------------------------------------------- grey conversion


def test_monochrome1_is_inverted() -> None:
    grey = _speckle((40, 50))
    ds = _grey_dataset(grey, photometric="MONOCHROME1", region=(0, 0, 49, 39))
    np.testing.assert_array_equal(to_grey(ds, grey), 255 - grey)
    out = images_from_dataset(ds, 50)[0].pixels
    np.testing.assert_array_equal(out, resize(255 - grey, 50))


def test_sixteen_bit_window_then_min_max() -> None:
    values = np.array([[800, 900, 1000, 1100, 1200]], dtype=np.uint16)
    ds = _grey_dataset(values, bits=16)
    np.testing.assert_array_equal(to_grey(ds, values), [[0, 64, 128, 191, 255]])
    ds.WindowCenter, ds.WindowWidth = 1000, 201
    np.testing.assert_array_equal(to_grey(ds, values), [[0, 1, 128, 255, 255]])
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1000  # modality LUT first: 600 ... 1400
    np.testing.assert_array_equal(to_grey(ds, values), [[0, 0, 128, 255, 255]])


def test_rgb_becomes_bt601_luma() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 200, 200]]], dtype=np.uint8)
    ds = _grey_dataset(rgb, photometric="RGB")
    np.testing.assert_array_equal(to_grey(ds, rgb), [[76, 150, 29, 200]])


def test_ybr_full_uses_luma_channel() -> None:
    y = _speckle((20, 30))
    ybr = np.stack([y, np.full_like(y, 128), np.full_like(y, 128)], axis=-1)
    ds = _grey_dataset(ybr, photometric="YBR_FULL", region=(0, 0, 29, 19))
    np.testing.assert_array_equal(images_from_dataset(ds, 30)[0].pixels, resize(y, 30))
    # The same when a decoder has already turned it into RGB.
    np.testing.assert_array_equal(to_grey(ds, np.stack([y] * 3, -1), photometric="RGB"), y)


def _palette_dataset(indices: np.ndarray, red: list[int], green: list[int], blue: list[int]):
    ds = _grey_dataset(indices, photometric="PALETTE COLOR", region=(0, 0, 9, 9))
    for colour, table in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [len(table), 0, 16])
        data = np.asarray(table, dtype="<u2").tobytes()
        setattr(ds, f"{colour}PaletteColorLookupTableData", data)
        ds[f"{colour}PaletteColorLookupTableData"].VR = "OW"
    return ds


def test_palette_colour_goes_through_the_lut() -> None:
    indices = np.arange(100, dtype=np.uint8).reshape(10, 10)
    inverted = [(255 - i) * 257 for i in range(256)]
    ds = _palette_dataset(indices, inverted, inverted, inverted)
    np.testing.assert_array_equal(to_grey(ds, indices), 255 - indices)
    np.testing.assert_array_equal(images_from_dataset(ds, 10)[0].pixels, 255 - indices)
    # Pure red: luma 0.299 * 255.
    red = _palette_dataset(indices, [65535] * 256, [0] * 256, [0] * 256)
    assert set(np.unique(to_grey(red, indices))) == {76}


def test_palette_without_lut_is_a_clear_error() -> None:
    indices = np.zeros((10, 10), np.uint8)
    ds = _grey_dataset(indices, photometric="PALETTE COLOR", region=(0, 0, 9, 9))
    with pytest.raises(PixelError, match="PALETTE COLOR without a usable palette"):
        images_from_dataset(ds, 10)


# --------------------------------------------------------------------------- encodings


def _encoded(ds: Dataset, syntax: str) -> bytes:
    buffer = io.BytesIO()
    if syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax)
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "syntax",
    [RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian],
    ids=["rle", "jpeg-ls", "jpeg2000", "deflated"],
)
@pytest.mark.parametrize("colour", [False, True], ids=["grey", "rgb"])
def test_lossless_encodings_decode_identically(syntax: str, colour: bool) -> None:
    grey = _screen(_speckle((40, 60)), top=20, left=30)
    if colour:
        rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1)
        ds = _grey_dataset(rgb, photometric="RGB")
    else:
        ds = _grey_dataset(grey)
    expected = images_from_dataset(ds, 32)[0].pixels
    try:
        data = _encoded(ds, syntax)
    except RuntimeError as exc:  # an encoder plugin missing on this machine
        pytest.skip(f"cannot encode {syntax}: {exc}")
    np.testing.assert_array_equal(images_from_bytes(data, 32)[0].pixels, expected)


def test_bare_dataset_without_file_meta_is_read() -> None:
    grey = _speckle((30, 40))
    ds = _grey_dataset(grey, region=(0, 0, 39, 29))
    buffer = io.BytesIO()
    ds.file_meta = FileMetaDataset()
    pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)  # no preamble, no meta
    raw = buffer.getvalue()
    assert raw[128:132] != b"DICM"
    np.testing.assert_array_equal(images_from_bytes(raw, 40)[0].pixels, resize(grey, 40))


# --------------------------------------------------------------------------- errors


def test_truncated_pixel_data() -> None:
    ds = _grey_dataset(_speckle((60, 100)))
    ds.PixelData = ds.PixelData[:3000]
    with pytest.raises(PixelError) as caught:
        images_from_dataset(ds, 32)
    assert caught.value.reason == "truncated pixel data: expected 6000 bytes, got 3000"


@pytest.mark.parametrize(("extra", "ok"), [(0, True), (1, False), (2, False), (3000, False)])
def test_pixel_data_longer_than_the_header_says(extra: int, ok: bool) -> None:
    ds = _grey_dataset(_speckle((60, 100)))
    ds.PixelData = ds.PixelData + bytes(extra)
    if ok:
        images_from_dataset(ds, 32)
        return
    with pytest.raises(PixelError) as caught:
        images_from_dataset(ds, 32)
    assert caught.value.reason == (
        "pixel data longer than Rows/Columns, samples, bits and frames say: "
        f"expected 6000 bytes, got {6000 + extra}"
    )


def test_the_padding_byte_of_an_odd_length_is_fine() -> None:
    ds = _grey_dataset(_speckle((15, 21)))
    ds.PixelData = ds.PixelData + b"\x00"
    assert images_from_dataset(ds, 32)[0].pixels.shape == (32, 32)


def test_no_pixel_data() -> None:
    ds = _grey_dataset(_speckle((10, 10)))
    del ds.PixelData
    with pytest.raises(PixelError, match="^no pixel data"):
        images_from_dataset(ds, 32)


@pytest.mark.parametrize("garbage", [b"", b"not dicom at all " * 40, bytes(range(256)) * 10])
def test_garbage_bytes(garbage: bytes, tmp_path: Path) -> None:
    with pytest.raises(PixelError, match="not a .*DICOM dataset"):
        images_from_bytes(garbage, 32)
    (tmp_path / "junk.dcm").write_bytes(garbage)
    with pytest.raises(PixelError, match="neither DICOM nor an image"):
        images_from_file(tmp_path / "junk.dcm", 32)


def test_missing_file() -> None:
    with pytest.raises(PixelError, match="cannot read"):
        images_from_file(Path("/nonexistent/x.dcm"), 32)


def test_unknown_transfer_syntax() -> None:
    ds = _grey_dataset(_speckle((10, 10)))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4"
    with pytest.raises(PixelError) as caught:
        images_from_dataset(ds, 32)
    assert caught.value.reason.startswith("unsupported transfer syntax 1.2.3.4")
    assert "no pixel decoder exists" in caught.value.reason


def test_transfer_syntax_without_installed_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    class Missing:
        is_available = False
        missing_dependencies = ["pylibjpeg-openjpeg - requires pylibjpeg-openjpeg>=2.0"]

    monkeypatch.setattr(pixels, "get_decoder", lambda uid: Missing())
    ds = _grey_dataset(_speckle((10, 10)))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    with pytest.raises(PixelError) as caught:
        images_from_dataset(ds, 32)
    assert caught.value.reason == (
        f"unsupported transfer syntax {JPEG2000Lossless} (JPEG 2000 Image Compression "
        "(Lossless Only)): no decoder installed (needs pylibjpeg-openjpeg - requires "
        "pylibjpeg-openjpeg>=2.0)"
    )


def test_corrupt_compressed_frame() -> None:
    ds = _grey_dataset(_screen(_speckle((40, 60)), top=20, left=30))
    ds.compress(RLELossless)
    # Keep the encapsulation valid, break the RLE header inside the fragment.
    fragment_start = 16  # BOT item (8 bytes, empty) + the fragment item header (8 bytes)
    data = bytearray(ds.PixelData)
    data[fragment_start : fragment_start + 64] = b"\xff" * 64
    ds.PixelData = bytes(data)
    with pytest.raises(PixelError) as caught:
        images_from_dataset(ds, 32)
    assert re.match(r"cannot decode frame 0 of 1 \(RLE Lossless\): \w+", caught.value.reason)


# --------------------------------------------------------------------------- broken JPEG


def _jpeg_dataset(stream: bytes, rows: int = 96, columns: int = 128, syntax: str = "") -> Dataset:
    ds = _grey_dataset(np.zeros((rows, columns), np.uint8))
    ds.file_meta.TransferSyntaxUID = syntax or JPEGBaseline8Bit
    ds.PixelData = encapsulate([stream])
    return ds


def _baseline_jpeg(rows: int = 96, columns: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_speckle((rows, columns))).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _undecodable(ds: Dataset) -> str:
    from thyrocad.metrics import reason_class

    with pytest.raises(PixelError) as caught:
        images_from_dataset(ds, 32)
    reason = caught.value.reason
    assert SPECIFIC_REASON.search(reason), reason
    assert reason_class(reason) == "undecodable", reason
    return reason


def test_a_good_baseline_jpeg_decodes() -> None:
    assert images_from_dataset(_jpeg_dataset(_baseline_jpeg()), 32)[0].pixels.std() > 5


def test_jpeg_with_valid_markers_and_a_garbage_scan_is_undecodable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Pillow (libjpeg-turbo) decodes this into an image after a warning nobody sees;
    # libjpeg reports it corrupt, and that is the answer.
    good = _baseline_jpeg()
    sos = good.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(good[sos + 2 : sos + 4], "big")
    garbage = np.random.default_rng(7).bytes(len(good) - start - 2).replace(b"\xff", b"\x00")
    with caplog.at_level("DEBUG"):
        reason = _undecodable(_jpeg_dataset(good[:start] + garbage + b"\xff\xd9"))
    assert reason.startswith("cannot decode frame 0 of 1 (JPEG Baseline (Process 1)): ")
    assert "libjpeg error code" in reason
    # pydicom's per-plugin tracebacks are not logged: the reason says it all.
    assert not [r for r in caplog.records if r.exc_info], caplog.text


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_jpeg_cut_short_is_undecodable(cut: float) -> None:
    # libjpeg fills a stream without its end with grey and says nothing.
    good = _baseline_jpeg()
    reason = _undecodable(_jpeg_dataset(good[: int(len(good) * cut)]))
    assert "ends without its end-of-image marker: it was cut short" in reason


def test_jpeg_padding_after_the_end_marker_is_fine() -> None:
    good = _baseline_jpeg()
    for padding in (b"\x00", b"\xff", b"\x00\x00"):
        images_from_dataset(_jpeg_dataset(good + padding), 32)


def test_jpeg_of_another_size_than_the_header_is_undecodable() -> None:
    reason = _undecodable(_jpeg_dataset(_baseline_jpeg(96, 128), rows=192, columns=256))
    assert "holds a 128 x 96 image but the header says 256 x 192" in reason


def test_random_bytes_in_a_jpeg_fragment_are_undecodable() -> None:
    reason = _undecodable(_jpeg_dataset(np.random.default_rng(8).bytes(4000)))
    assert "is not JPEG data" in reason


def test_jpeg_2000_cut_short_is_undecodable() -> None:
    ds = pydicom.dcmread(_real("US1_J2KR.dcm"))
    stream = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([stream[: len(stream) // 2]])
    reason = _undecodable(ds)
    assert reason.startswith("cannot decode frame 0 of 1 (JPEG 2000 Image Compression")
    assert "cut short" in reason


def test_only_the_selected_frame_of_a_cine_is_checked() -> None:
    good = _baseline_jpeg()
    ds = _jpeg_dataset(good)
    ds.NumberOfFrames = 3
    ds.PixelData = encapsulate([good[:100], good, good[:100]])
    assert images_from_dataset(ds, 32)[0].frame_index == 1  # the middle one is whole
    with pytest.raises(PixelError, match="cannot decode frame 0 of 3"):
        images_from_dataset(ds, 32, FramePolicy.parse("every:1:3"))
