"""The pictures of the study page: the image the model saw, and its evidence over it.

A thumbnail is the model input made again from the spooled file by the pipeline's own
preprocessing (``pacs.pixels``: decode, crop to the ultrasound region, grey, resize),
so it shows exactly what was classified, never the burned-in text around it. The
evidence image is that thumbnail with the prediction's class-activation map scaled up
(bilinear) and drawn over it in colour.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from thyrocad.pacs.errors import PixelError
from thyrocad.pacs.pixels import FramePolicy, images_from_file

#: Side of the thumbnail when the prediction's model version is not registered.
DEFAULT_SIZE = 224
#: How strongly the map tints the image where it peaks (0: not at all, 1: only the map).
OVERLAY_ALPHA = 0.45

# "jet"-like anchors (blue, cyan, green, yellow, red): readable over grey ultrasound.
_ANCHORS = np.array(
    [
        [0.0, 0, 0, 143],
        [0.125, 0, 0, 255],
        [0.375, 0, 255, 255],
        [0.625, 255, 255, 0],
        [0.875, 255, 0, 0],
        [1.0, 128, 0, 0],
    ],
    dtype=np.float64,
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), _ANCHORS[:, 0], _ANCHORS[:, i]) for i in (1, 2, 3)],
    axis=1,
).astype(np.uint8)


class ImageUnavailable(Exception):
    """The pixels of a prediction cannot be shown (the file left the spool, or no longer
    decodes); the message says which, without patient data."""


def model_input(spool_path: str, size: int, frame_index: int) -> np.ndarray:
    """The grey ``size`` x ``size`` image the model saw for one frame of a spooled file."""
    path = Path(spool_path)
    if not path.is_file():
        raise ImageUnavailable("the image file is no longer in the spool")
    # Decode the frame asked for (and frame 0) rather than the whole cine loop.
    policy = (
        FramePolicy(mode="every", step=frame_index, max_frames=2)
        if frame_index > 0
        else FramePolicy(mode="every", step=1, max_frames=1)
    )
    try:
        frames = images_from_file(path, size, policy)
    except PixelError as exc:
        raise ImageUnavailable(f"the image no longer decodes: {exc}") from exc
    for frame in frames:
        if frame.frame_index == frame_index:
            return np.asarray(frame.pixels)
    raise ImageUnavailable(f"the file has no frame {frame_index}")


def png(pixels: np.ndarray) -> bytes:
    """A PNG of a grey (H, W) or RGB (H, W, 3) uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def overlay(grey: np.ndarray, evidence_png: bytes, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``grey`` (H, W) with the evidence map (an 8-bit grey PNG at any grid, covering the
    whole image, 255 at its peak) scaled up bilinearly and drawn over it as colour.

    The tint follows the map: strong where the evidence is, none where it is 0, so the
    anatomy stays readable. Returns RGB uint8 (H, W, 3).
    """
    try:
        with Image.open(io.BytesIO(evidence_png)) as img:
            heat = img.convert("L").resize(
                (grey.shape[1], grey.shape[0]), Image.Resampling.BILINEAR
            )
    except (OSError, ValueError) as exc:
        raise ImageUnavailable(f"the evidence map is not a readable PNG ({exc})") from exc
    level = np.asarray(heat, dtype=np.uint8)
    colour = _LUT[level].astype(np.float32)
    weight = (alpha * level.astype(np.float32) / 255.0)[..., None]
    base = np.repeat(grey.astype(np.float32)[..., None], 3, axis=2)
    return np.clip(base * (1.0 - weight) + colour * weight, 0, 255).astype(np.uint8)


class PngCache:
    """A small in-process LRU of rendered PNGs, keyed by what they were made from (the
    instance's SHA-256 among it, so replaced bytes are rendered again)."""

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> bytes | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple[object, ...], value: bytes) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
