"""Pixel decoding and ultrasound preprocessing: the one path from DICOM (or a plain image) to
the grey square a model sees, shared by training and inference.

The steps, for every selected frame:

1. decode only that frame (pydicom's decoders, with Pillow / pylibjpeg / pyjpegls plugins);
2. crop to the ultrasound region from the Sequence of Ultrasound Regions (0018,6011), or,
   where there is none, to the image content, so burned-in text and patient details
   never reach the model;
3. convert to 8-bit grey (MONOCHROME1/2, RGB, YBR_*, PALETTE COLOR, 16-bit);
4. resize to ``size`` x ``size`` with Pillow's bilinear filter.

Boxes are ``(left, top, right, bottom)`` in pixels, right and bottom exclusive (Pillow's and
NumPy slicing's convention). Nothing here imports TensorFlow, and nothing of the project
except :mod:`pacs.errors`.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels import apply_color_lut, as_pixel_options, get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from thyrocad.pacs.errors import PixelError

logger = logging.getLogger(__name__)

# Stored with a model version so that a change of this code can be told apart from a change
# of the model; bump it whenever the output of images_from_* changes.
PREPROCESSING_ID = "thyrocad-pixels-1"

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# Content crop: the grey image is first reduced to at most this many pixels on its long side;
# the crop is found on that small copy, which keeps it at about a millisecond.
_CONTENT_SIDE = 256
# Grey level above which a pixel is "not dark". Scanner backgrounds are 0-5 (a little more
# around JPEG-compressed text); most speckle of even hypoechoic tissue is brighter.
_CONTENT_LEVEL = 12
# Point tables: pixel brighter than the level -> 255; local non-dark fraction >= 1/2 -> 255.
_NOT_DARK = [255 if v > _CONTENT_LEVEL else 0 for v in range(256)]
_MOSTLY = [255 if v >= 128 else 0 for v in range(256)]
# Opening size on the small copy (about 2 % of the long side): thinner than this, like a
# line of burned-in text or a scale's tick marks, is not tissue.
_CONTENT_OPENING = 5
# A crop smaller than this in either direction is not believable: keep the whole image.
_MIN_CROP = 8

# JPEG (ISO 10918) and JPEG-LS streams: SOI ... EOI, with the image size in a SOF segment.
_JPEG_SYNTAXES = (
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)
# JPEG 2000 code streams end with EOC, which has the code of JPEG's EOI.
_J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)
_END_OF_IMAGE = b"\xff\xd9"
# A JPEG 2000 code stream starts with SOC; a JP2 file with its signature box.
_J2K_STARTS = (b"\xff\x4f", b"\x00\x00\x00\x0cjP  ")
# SOF0-3, 5-7, 9-11, 13-15 (DHT, JPG and DAC share the range) and JPEG-LS's SOF55.
_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
# For ISO 10918 JPEG, pylibjpeg (libjpeg) is strict where Pillow (libjpeg-turbo) only warns
# and decodes garbage into an image: libjpeg's verdict that the data is corrupt is final.
# Its other errors (a feature it lacks) still leave the other plugins to try.
_STRICT_PLUGIN = "pylibjpeg"
_STRICT_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)
_LIBJPEG_ERROR = re.compile(r"libjpeg error code '(-\d+)'")
# Stream ran out of data, code block ran out of data, undelayed 0xFF, not a JPEG stream,
# unique marker twice, misplaced marker segment.
_LIBJPEG_DATA_ERRORS = frozenset({-1025, -1026, -1033, -1036, -1037, -1038})


class _DropPluginTracebacks(logging.Filter):
    """pydicom logs every failed decoding plugin with its traceback, then raises an error
    naming them all, which becomes the instance's reason: a corrupt image sent by a
    modality is not a programming error, so the tracebacks are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.funcName == "_decode_frame")


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_DropPluginTracebacks())


@dataclass(frozen=True)
class FramePolicy:
    """Which frames of a multi-frame (cine) instance become images.

    ``middle``: the middle frame only. ``every``: frames 0, step, 2*step, ... up to
    ``max_frames`` of them, each kept as its own image. Single-frame images ignore it.
    """

    mode: Literal["middle", "every"] = "middle"
    step: int = 1
    max_frames: int = 16

    def __post_init__(self) -> None:
        if self.mode not in ("middle", "every"):
            raise ValueError(f"frame policy mode must be 'middle' or 'every', not {self.mode!r}")
        if self.step < 1 or self.max_frames < 1:
            raise ValueError(
                f"frame policy step and max_frames must be >= 1, got {self.step}, {self.max_frames}"
            )

    @classmethod
    def parse(cls, text: str) -> FramePolicy:
        """Parse ``"middle"`` or ``"every:N:K"`` (every N-th frame, at most K frames)."""
        cleaned = text.strip().lower()
        if cleaned == "middle":
            return cls()
        parts = cleaned.split(":")
        if len(parts) == 3 and parts[0] == "every":
            try:
                step, max_frames = int(parts[1]), int(parts[2])
            except ValueError:
                step = max_frames = 0
            if step >= 1 and max_frames >= 1:
                return cls(mode="every", step=step, max_frames=max_frames)
        raise ValueError(
            f"invalid frame policy {text!r}: expected 'middle' or 'every:N:K' with integers "
            "N >= 1 (take every N-th frame) and K >= 1 (at most K frames), e.g. 'every:10:5'"
        )

    def __str__(self) -> str:
        return "middle" if self.mode == "middle" else f"every:{self.step}:{self.max_frames}"

    def indices(self, n_frames: int) -> list[int]:
        """The 0-based frame indices to use out of ``n_frames`` (``[0]`` for one frame)."""
        if n_frames <= 1:
            return [0]
        if self.mode == "middle":
            return [n_frames // 2]
        return list(range(0, n_frames, self.step))[: self.max_frames]


@dataclass(frozen=True)
class FrameImage:
    """One model input: ``pixels`` is uint8 grey of shape (size, size), C-contiguous and
    read-only (copy before changing it); ``frame_index`` is the 0-based frame it came from
    (0 for single-frame images)."""

    frame_index: int
    pixels: np.ndarray


# --------------------------------------------------------------------------- entry points


def images_from_dataset(
    ds: Dataset, size: int, policy: FramePolicy = FramePolicy()
) -> list[FrameImage]:
    """Decode, crop, grey and resize the frames ``policy`` selects from a DICOM dataset.

    Returns one :class:`FrameImage` per selected frame, in frame order. Raises
    :class:`PixelError` with a specific reason for anything that cannot be decoded.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    decoder, n_frames = _check_decodable(ds)
    region = ultrasound_region(ds)
    # Keep YBR as decoded: its Y is already the grey we want, and skipping pydicom's
    # YBR -> RGB conversion saves about 8 ms per 640 x 480 frame. to_grey follows the
    # photometric interpretation the decoder reports, so RGB output is handled too.
    options = {**as_pixel_options(ds), "as_rgb": False}
    images: list[FrameImage] = []
    for index in policy.indices(n_frames):
        frame, photometric = _decode_frame(ds, decoder, index, n_frames, options)
        if region is not None:
            left, top, right, bottom = region
            grey = to_grey(ds, frame[top:bottom, left:right], photometric=photometric)
        else:
            grey = to_grey(ds, frame, photometric=photometric)
            left, top, right, bottom = content_box(grey)
            grey = grey[top:bottom, left:right]
        images.append(FrameImage(frame_index=index, pixels=resize(grey, size)))
    logger.debug(
        "decoded %d of %d frames",
        len(images),
        n_frames,
        extra={"crop": "region" if region is not None else "content", "frames": n_frames},
    )
    return images


def images_from_bytes(
    data: bytes, size: int, policy: FramePolicy = FramePolicy()
) -> list[FrameImage]:
    """Like :func:`images_from_dataset` for the bytes of a DICOM file (or a bare dataset
    without preamble and file meta, as a C-STORE carries it)."""
    return images_from_dataset(_read_dicom(io.BytesIO(data), len(data)), size, policy)


def images_from_file(
    path: Path, size: int, policy: FramePolicy = FramePolicy()
) -> list[FrameImage]:
    """Model inputs from a file: DICOM (told by its content, not its name) or a plain image
    Pillow reads (PNG, JPEG, BMP, ...). A plain image gives one image with frame_index 0;
    it is content-cropped like DICOM without regions, which keeps an image that is all
    tissue whole."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise PixelError(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    if head[128:132] == b"DICM":
        with path.open("rb") as f:
            return images_from_dataset(_read_dicom(f, path.stat().st_size), size, policy)
    try:
        with Image.open(path) as img:
            grey = _plain_image_grey(img)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as pil_exc:
        # Some DICOM files have no preamble; give pydicom the last word.
        try:
            with path.open("rb") as f:
                ds = _read_dicom(f, path.stat().st_size)
        except PixelError:
            raise PixelError(
                f"{path.name} is neither DICOM nor an image Pillow can read ({pil_exc})"
            ) from pil_exc
        return images_from_dataset(ds, size, policy)
    left, top, right, bottom = content_box(grey)
    return [FrameImage(frame_index=0, pixels=resize(grey[top:bottom, left:right], size))]


# --------------------------------------------------------------------------- public helpers


def to_grey(ds: Dataset, frame: np.ndarray, *, photometric: str | None = None) -> np.ndarray:
    """One decoded frame (or a crop of it) as uint8 grey, 2-D.

    ``photometric`` is the frame's photometric interpretation as decoded, when it differs
    from the dataset's (pydicom may hand back YBR_FULL/YBR_FULL_422 as RGB, and JPEG 2000's
    YBR_ICT/RCT always as RGB); by default the dataset's is used. Colour becomes ITU-R
    BT.601 luma (the Y of YBR), PALETTE COLOR goes through its lookup table, MONOCHROME1 is
    inverted, and more than 8 bits are windowed (VOI window when present, else the frame's
    min-max).
    """
    pi = str(photometric or ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if frame.size == 0:
        raise PixelError("empty frame (crop or image has no pixels)")
    if pi == "PALETTE COLOR":
        if frame.ndim != 2:
            raise PixelError(f"PALETTE COLOR frame must have one sample, got shape {frame.shape}")
        table = _palette_grey_table(ds)
        return table[np.clip(frame, 0, len(table) - 1)]
    if pi in ("MONOCHROME1", "MONOCHROME2"):
        if frame.ndim != 2:
            raise PixelError(f"{pi} frame must have one sample, got shape {frame.shape}")
        grey = _monochrome_to_uint8(ds, frame)
        return 255 - grey if pi == "MONOCHROME1" else grey
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise PixelError(f"{pi} frame must have three samples, got shape {frame.shape}")
    if pi == "RGB":
        rgb = _colour_to_uint8(ds, frame)
        # Pillow's RGB -> L is the BT.601 luma in C, several times faster than NumPy.
        return np.asarray(Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("L"))
    if pi.startswith("YBR"):
        # Only reached when the decoder left YBR as it was: Y already is the luma.
        luma = _colour_to_uint8(ds, frame)[:, :, 0]
        if pi.startswith("YBR_PARTIAL"):
            # Partial range: black is 16 and white 235.
            stretched = (luma.astype(np.int32) - 16) * 255 // 219
            return np.clip(stretched, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(luma)
    raise PixelError(f"unsupported photometric interpretation {pi!r}")


def ultrasound_region(ds: Dataset) -> tuple[int, int, int, int] | None:
    """The tissue box from the Sequence of Ultrasound Regions, or ``None`` if there is none.

    Picks the largest region whose RegionSpatialFormat is 1 (2D tissue), else the largest
    region of any kind; clamps it to the image (scanners write MaxX1 = Columns); returns
    ``(left, top, right, bottom)``, right and bottom exclusive. Regions that are broken or
    smaller than a few pixels are ignored.
    """
    regions = ds.get("SequenceOfUltrasoundRegions")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if not regions or rows <= 0 or columns <= 0:
        return None
    candidates: list[tuple[bool, int, tuple[int, int, int, int]]] = []
    for item in regions:
        try:
            x0 = int(item.RegionLocationMinX0)
            y0 = int(item.RegionLocationMinY0)
            x1 = int(item.RegionLocationMaxX1)
            y1 = int(item.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue
        # MaxX1/MaxY1 are inclusive in DICOM.
        box = (max(0, x0), max(0, y0), min(columns, x1 + 1), min(rows, y1 + 1))
        width, height = box[2] - box[0], box[3] - box[1]
        if width < _MIN_CROP or height < _MIN_CROP:
            continue
        is_tissue = item.get("RegionSpatialFormat") == 1
        candidates.append((is_tissue, width * height, box))
    if not candidates:
        return None
    tissue = [c for c in candidates if c[0]]
    # max() keeps the first of equal areas, i.e. the scanner's first region.
    return max(tissue or candidates, key=lambda c: c[1])[2]


def content_box(grey: np.ndarray) -> tuple[int, int, int, int]:
    """The box of the image content in a uint8 grey image: the largest block of tissue-like
    brightness, without the dark frame and the burned-in text around it.

    Works on a reduced, blurred copy: bright pixels are opened (eroded then dilated) so
    text lines and tick marks vanish, then rows and columns are cut where nothing is left,
    keeping the heaviest block (a recursive XY cut). An image that is all tissue has no
    empty row or column and comes back whole. Returns ``(left, top, right, bottom)``,
    right and bottom exclusive; the whole image when nothing is found.
    """
    height, width = grey.shape[:2]
    whole = (0, 0, width, height)
    if min(height, width) < 2 * _MIN_CROP:
        return whole
    factor = max(1, -(-max(height, width) // _CONTENT_SIDE))
    # Mark "not dark" at full resolution first: reducing before thresholding would smear a
    # thin bright text stroke into a grey block that looks like tissue.
    small = Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8), "L").point(_NOT_DARK)
    if factor > 1:
        small = small.reduce(factor)
    # Local fraction of non-dark pixels: speckled tissue is almost all non-dark (even
    # hypoechoic), text is bright strokes in a mostly black cell.
    small = small.filter(ImageFilter.BoxBlur(2)).point(_MOSTLY)
    # Opening: what is thinner than the filter, like a remaining text line or a scale's
    # tick marks, goes.
    mask = _open(np.asarray(small) > 0, _CONTENT_OPENING)
    if not mask.any():
        return whole
    top, bottom, left, right = 0, mask.shape[0], 0, mask.shape[1]
    # Alternate row and column cuts until the block stops shrinking (two rounds are typical).
    for _ in range(4):
        block = mask[top:bottom, left:right]
        r0, r1 = _heaviest_run(block.sum(axis=1))
        c0, c1 = _heaviest_run(block[r0:r1].sum(axis=0))
        if (r0, r1, c0, c1) == (0, block.shape[0], 0, block.shape[1]):
            break
        top, bottom, left, right = top + r0, top + r1, left + c0, left + c1
    box = (
        min(width, left * factor),
        min(height, top * factor),
        min(width, right * factor),
        min(height, bottom * factor),
    )
    if box[2] - box[0] < _MIN_CROP or box[3] - box[1] < _MIN_CROP:
        return whole
    return box


def resize(grey: np.ndarray, size: int) -> np.ndarray:
    """A uint8 grey image resized to (size, size) with Pillow's bilinear filter (antialiased
    when shrinking; ``reducing_gap`` first box-reduces large images by an integer factor,
    which is faster and no worse)."""
    img = Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8), "L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(img)


# --------------------------------------------------------------------------- decoding


def _read_dicom(f: Any, n_bytes: int) -> Dataset:
    """Read a dataset from a binary file object; PixelError when it is not DICOM."""
    try:
        ds = pydicom.dcmread(f, force=True)
    except Exception as exc:  # garbage bytes make the parser fail in many different ways
        raise PixelError(f"not a readable DICOM dataset ({n_bytes} bytes): {exc}") from exc
    # force=True turns almost any bytes into "a dataset"; one without a single image or
    # SOP attribute is garbage, not DICOM.
    if not any(k in ds for k in (*_PIXEL_KEYWORDS, "SOPClassUID", "Rows")):
        raise PixelError(f"not a DICOM dataset ({n_bytes} bytes): no DICOM elements found")
    return ds


def _check_decodable(ds: Dataset) -> tuple[Any, int]:
    """The pydicom decoder for ``ds`` and its number of frames, or a PixelError saying why
    there is none."""
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise PixelError("no pixel data: the dataset has no (7FE0,0010) Pixel Data element")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or columns <= 0:
        raise PixelError(f"invalid image size Rows={rows} Columns={columns}")
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise PixelError(f"invalid Number of Frames {ds.get('NumberOfFrames')!r}") from exc
    n_frames = max(1, n_frames)
    tsyntax = _transfer_syntax(ds)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise PixelError(
            f"unsupported transfer syntax {tsyntax} ({tsyntax.name}): no pixel decoder exists"
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise PixelError(
            f"unsupported transfer syntax {tsyntax} ({tsyntax.name}): "
            f"no decoder installed (needs {missing})"
        )
    if not tsyntax.is_compressed and "PixelData" in ds:
        expected = _native_length(ds, rows, columns, n_frames)
        actual = len(ds.PixelData)
        if actual < expected:
            raise PixelError(f"truncated pixel data: expected {expected} bytes, got {actual}")
        if actual > expected + (expected % 2):  # more than the padding of an odd length
            raise PixelError(
                "pixel data longer than Rows/Columns, samples, bits and frames say: "
                f"expected {expected} bytes, got {actual}"
            )
    return decoder, n_frames


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax; for a bare dataset read without file meta, the native
    syntax it was read with (encapsulated data cannot be told apart without one)."""
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if tsyntax:
        return UID(str(tsyntax))
    pixel_data = ds.get("PixelData")
    if isinstance(pixel_data, bytes) and pixel_data[:4] == b"\xfe\xff\x00\xe0":
        raise PixelError(
            "no transfer syntax: the dataset has no file meta and its pixel data is encapsulated"
        )
    implicit, little = ds.original_encoding
    if little is False:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _native_length(ds: Dataset, rows: int, columns: int, n_frames: int) -> int:
    """Bytes that uncompressed pixel data must hold."""
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if pi == "YBR_FULL_422":
        # Two of every three samples kept: Y Y Cb Cr per pair of pixels.
        samples = 2
    total_bits = rows * columns * samples * n_frames * bits
    return (total_bits + 7) // 8


def _decode_frame(
    ds: Dataset, decoder: Any, index: int, n_frames: int, options: dict[str, Any]
) -> tuple[np.ndarray, str]:
    """Decode one frame; returns the array and its photometric interpretation as decoded.

    A compressed frame whose stream is visibly broken (cut short, another image size than
    the header's) is refused before any decoder sees it, and for ISO 10918 JPEG a stream
    libjpeg reports corrupt is not handed on to a more lenient decoder.
    """
    tsyntax = _transfer_syntax(ds)
    prefix = f"cannot decode frame {index} of {n_frames} ({tsyntax.name})"
    problem = _stream_problem(ds, tsyntax, index, n_frames)
    if problem:
        raise PixelError(f"{prefix}: {problem}")
    try:
        frame, meta = _strict_as_array(ds, decoder, tsyntax, index, options)
    except Exception as exc:  # decoders raise anything from ValueError to their own types
        raise PixelError(f"{prefix}: {type(exc).__name__}: {exc}") from exc
    photometric = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation")))
    return frame, photometric


def _strict_as_array(
    ds: Dataset, decoder: Any, tsyntax: UID, index: int, options: dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    """``decoder.as_array`` for one frame; for ISO 10918 JPEG libjpeg first, and only a
    libjpeg failure that is not about the data lets the other plugins try."""
    if tsyntax in _STRICT_SYNTAXES and _STRICT_PLUGIN in decoder.available_plugins:
        try:
            result: tuple[np.ndarray, dict[str, Any]] = decoder.as_array(
                ds, index=index, validate=True, decoding_plugin=_STRICT_PLUGIN, **options
            )
            return result
        except Exception as exc:
            codes = {int(code) for code in _LIBJPEG_ERROR.findall(str(exc))}
            if codes & _LIBJPEG_DATA_ERRORS:
                raise
    result = decoder.as_array(ds, index=index, validate=True, **options)
    return result


def _stream_problem(ds: Dataset, tsyntax: UID, index: int, n_frames: int) -> str | None:
    """What is visibly wrong with a JPEG, JPEG-LS or JPEG 2000 frame's stream, or None.

    A stream must start with its start marker and end with its end-of-image marker (EOC
    in JPEG 2000), after at most padding bytes: decoders fill in what is missing of a
    stream cut short without a word. A JPEG frame's size (its SOF segment) must be the
    header's Rows and Columns.
    """
    if tsyntax not in _JPEG_SYNTAXES and tsyntax not in _J2K_SYNTAXES:
        return None
    try:
        stream = get_frame(ds.PixelData, index, number_of_frames=n_frames)
    except Exception:  # broken encapsulation: the decoder says it in its own words
        return None
    starts = _J2K_STARTS if tsyntax in _J2K_SYNTAXES else (b"\xff\xd8",)
    if not stream.startswith(starts):
        kind = "JPEG 2000" if tsyntax in _J2K_SYNTAXES else "JPEG"
        return f"the compressed stream ({len(stream)} bytes) is not {kind} data: no start marker"
    if not stream.rstrip(b"\x00\xff").endswith(_END_OF_IMAGE):
        return (
            f"the compressed stream ({len(stream)} bytes) ends without its end-of-image "
            "marker: it was cut short"
        )
    if tsyntax in _JPEG_SYNTAXES:
        size = _jpeg_frame_size(stream)
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if size is not None and size != (rows, columns) and size[0] != 0:
            return (
                f"the JPEG stream holds a {size[1]} x {size[0]} image but the header says "
                f"{columns} x {rows} (Columns x Rows)"
            )
    return None


def _jpeg_frame_size(stream: bytes) -> tuple[int, int] | None:
    """(lines, samples per line) from a JPEG stream's SOF segment, or None without one."""
    if not stream.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 4 <= len(stream):
        if stream[i] != 0xFF:
            return None
        marker = stream[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(stream[i + 2 : i + 4], "big")
        if marker in _SOF_MARKERS:
            if i + 9 > len(stream):
                return None
            lines = int.from_bytes(stream[i + 5 : i + 7], "big")
            return lines, int.from_bytes(stream[i + 7 : i + 9], "big")
        if marker == 0xDA:  # start of scan: no SOF before it
            return None
        i += 2 + length
    return None


# --------------------------------------------------------------------------- to 8-bit grey


def _monochrome_to_uint8(ds: Dataset, frame: np.ndarray) -> np.ndarray:
    """Grey samples to uint8: 8-bit unsigned as stored (ultrasound stores display values),
    otherwise modality rescale then VOI window if present, else min-max."""
    if frame.dtype == np.uint8:
        return frame
    values = frame.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0:
        values = values * slope + intercept
    center, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
        if function == "SIGMOID":
            scaled = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        elif function == "LINEAR_EXACT":
            scaled = (values - center) / width + 0.5
        else:
            # PS3.3 C.11.2.1.2.1
            scaled = (values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _colour_to_uint8(ds: Dataset, frame: np.ndarray) -> np.ndarray:
    """Colour samples to uint8 by their bit depth (not by the frame's range: colour is
    meant to be displayed as stored)."""
    if frame.dtype == np.uint8:
        return frame
    bits = int(ds.get("BitsStored", 8) or 8)
    if bits <= 8:
        return np.clip(frame, 0, 255).astype(np.uint8)
    shifted = np.right_shift(np.clip(frame, 0, None).astype(np.uint32), bits - 8)
    return np.clip(shifted, 0, 255).astype(np.uint8)


def _first_number(value: Any) -> float | None:
    """The first value of a possibly multi-valued DS/IS element."""
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# Palette grey tables, keyed by the palette's own bytes: a series shares one palette, and
# expanding a 16-bit segmented palette costs tens of milliseconds.
_PALETTE_CACHE: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
_PALETTE_CACHE_SIZE = 16
_PALETTE_LOCK = threading.Lock()
_PALETTE_KEYWORDS = tuple(
    f"{prefix}{colour}PaletteColorLookupTable{suffix}"
    for colour in ("Red", "Green", "Blue")
    for prefix, suffix in (("", "Descriptor"), ("", "Data"), ("Segmented", "Data"))
)


def _palette_grey_table(ds: Dataset) -> np.ndarray:
    """A uint8 table from stored value to grey (the luma of the palette colour)."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    key = (bits, *(_element_key(ds, keyword) for keyword in _PALETTE_KEYWORDS))
    with _PALETTE_LOCK:
        table = _PALETTE_CACHE.get(key)
        if table is not None:
            _PALETTE_CACHE.move_to_end(key)
            return table
    domain = np.arange(2 ** min(bits, 16), dtype=np.uint16 if bits > 8 else np.uint8)
    try:
        rgb = apply_color_lut(domain, ds)
    except Exception as exc:  # pydicom reports a missing or malformed palette many ways
        raise PixelError(
            f"PALETTE COLOR without a usable palette lookup table: {type(exc).__name__}: {exc}"
        ) from exc
    # The descriptor's third value says 8 or 16 bits per entry; some writers say 16 and
    # store 8-bit values, so trust the values. A shift, not /257: writers scale 8-bit
    # colours to 16 bits as v * 257 or v * 256, and v >> 8 gives back v for both.
    if rgb.max() > 255:
        rgb = np.right_shift(rgb.astype(np.uint32), 8)
    rgb = rgb.astype(np.float32)
    luma = rgb[:, 0] * 0.299 + rgb[:, 1] * 0.587 + rgb[:, 2] * 0.114
    table = np.clip(luma + 0.5, 0, 255).astype(np.uint8)
    with _PALETTE_LOCK:
        _PALETTE_CACHE[key] = table
        while len(_PALETTE_CACHE) > _PALETTE_CACHE_SIZE:
            _PALETTE_CACHE.popitem(last=False)
    return table


def _element_key(ds: Dataset, keyword: str) -> Any:
    value = ds.get(keyword)
    if value is None:
        return None
    return bytes(value) if isinstance(value, bytes | bytearray) else tuple(value)


# --------------------------------------------------------------------------- content crop


def _open(mask: np.ndarray, k: int) -> np.ndarray:
    """Morphological opening of a boolean mask with a k x k square (erode, then dilate).

    Separable running sums in NumPy: Pillow's rank filters take milliseconds here."""
    eroded = _window_all(_window_all(mask, k, axis=0), k, axis=1)
    return _window_any(_window_any(eroded, k, axis=0), k, axis=1)


def _window_all(mask: np.ndarray, k: int, axis: int) -> np.ndarray:
    """True where all k pixels of the centred window along ``axis`` are True (outside the
    image counts as False, so content touching the edge erodes like elsewhere, and the
    dilation puts it back)."""
    return _window_count(mask, k, axis) == k


def _window_any(mask: np.ndarray, k: int, axis: int) -> np.ndarray:
    """True where any pixel of the centred k-window along ``axis`` is True."""
    return _window_count(mask, k, axis) > 0


def _window_count(mask: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Number of True pixels in the centred k-window along ``axis`` (k odd)."""
    half = k // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (half + 1, half)
    cumulative = np.cumsum(np.pad(mask, pad).astype(np.int32), axis=axis)
    n = mask.shape[axis]
    upper = np.take(cumulative, np.arange(k, k + n), axis=axis)
    lower = np.take(cumulative, np.arange(0, n), axis=axis)
    return upper - lower


def _heaviest_run(profile: np.ndarray) -> tuple[int, int]:
    """The ``[start, stop)`` run of non-zero entries with the largest sum."""
    nonzero = np.concatenate(([False], profile > 0, [False]))
    edges = np.flatnonzero(nonzero[1:] != nonzero[:-1])
    starts, stops = edges[0::2], edges[1::2]
    if len(starts) == 0:
        return 0, len(profile)
    cumulative = np.concatenate(([0], np.cumsum(profile)))
    weights = cumulative[stops] - cumulative[starts]
    best = int(np.argmax(weights))
    return int(starts[best]), int(stops[best])


# --------------------------------------------------------------------------- plain images


def _plain_image_grey(img: Image.Image) -> np.ndarray:
    """A Pillow image (first frame) as uint8 grey; 16-bit images are min-max scaled."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(img, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        return np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if img.mode not in ("L", "RGB"):
        # Palette, alpha, CMYK, 1-bit: through RGB so the luma is the usual one.
        img = img.convert("RGB")
    if img.mode == "RGB":
        img = img.convert("L")
    return np.asarray(img).copy()
