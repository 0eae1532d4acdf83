"""Training images from files: decoded and preprocessed by ``pacs.pixels``, as for inference.

The ``train`` and ``evaluate`` commands and the refit read their images here, so
``models`` sees the same arrays that inference feeds the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thyrocad.models.data import ImageRecord, discover
from thyrocad.models.errors import DatasetError
from thyrocad.pacs.errors import PixelError
from thyrocad.pacs.pixels import FramePolicy, images_from_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedImages:
    images: np.ndarray  # (N, S, S) uint8
    labels: list[str]
    patient_ids: list[str]
    skipped: list[tuple[Path, str]]


def load_images(
    records: Sequence[ImageRecord],
    size: int,
    policy: FramePolicy | None = None,
    on_image: Callable[[], None] | None = None,
) -> LoadedImages:
    """Decode and preprocess every record; undecodable files are skipped with a reason."""
    policy = policy or FramePolicy()
    pixels, labels, patients, skipped = [], [], [], []
    for rec in records:
        try:
            frames = images_from_file(rec.path, size, policy)
        except PixelError as exc:
            skipped.append((rec.path, exc.reason))
            logger.warning("skipped %s: %s", rec.path.name, exc.reason)
        else:
            for frame in frames:
                pixels.append(frame.pixels)
                labels.append(rec.label)
                patients.append(rec.patient_id)
        if on_image:
            on_image()
    if not pixels:
        raise DatasetError("no image could be decoded")
    return LoadedImages(np.stack(pixels), labels, patients, skipped)


def load_dataset(
    source: Path,
    size: int,
    classes: Sequence[str] | None = None,
    on_image: Callable[[], None] | None = None,
) -> LoadedImages:
    """A folder or CSV manifest, decoded at ``size``."""
    return load_images(discover(source, classes), size, on_image=on_image)
