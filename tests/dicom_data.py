"""Real ultrasound test files that pydicom and pydicom-data put on disk.

Listed from their folders directly: pydicom's ``get_testdata_files()`` also
tries to download what is missing, which costs tens of seconds offline.
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import pydicom


def _roots() -> list[Path]:
    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store  # the pydicom-data package

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError as exc:
        raise RuntimeError("pydicom-data is required: pip install pydicom-data") from exc
    return roots


@cache
def ultrasound_test_files() -> tuple[Path, ...]:
    """Every Modality US file among pydicom's and pydicom-data's test files, sorted by name."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for root in _roots():
            for path in root.rglob("*"):
                if not path.is_file():
                    continue
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
                except Exception:  # noqa: BLE001 - not every test file is valid DICOM
                    continue
                if ds.get("Modality") == "US":
                    found.append(path)
    return tuple(sorted(found, key=lambda p: p.name))
