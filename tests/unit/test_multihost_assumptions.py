"""Paths written to the database are read on other machines, from other working folders.

The listener records where it spooled each instance and a promotion records where the
model artifact is; inference workers elsewhere open those paths as recorded, with the
spool and the registry mounted at the path the settings name
(``tests/integration/test_multihost.py`` runs that on five network namespaces).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace

import pytest

from thyrocad.serve import listener_spool
from thyrocad.settings import load_settings
from thyrocad.worker.versions import version_record


@pytest.fixture
def linked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding ``data``, a link to a folder elsewhere on this disk."""
    (tmp_path / "disk").mkdir()
    work = tmp_path / "service"
    work.mkdir()
    (work / "data").symlink_to(tmp_path / "disk")
    monkeypatch.chdir(work)
    return work


def test_the_listener_records_absolute_spool_paths_with_links_kept(linked: Path) -> None:
    # THYROCAD_DATA_DIR relative, as the default ./thyrocad-data is.
    spool = listener_spool(load_settings(data_dir=Path("data/thyrocad")))
    entry = spool.write("1.2.826.0.1.3680043.8.498.1", b"DICM")
    assert entry.path.is_absolute()
    assert str(entry.path).startswith(str(linked / "data" / "thyrocad" / "spool") + "/")
    assert entry.path.read_bytes() == b"DICM"


def test_a_version_records_its_artifact_where_the_registry_is_mounted(linked: Path) -> None:
    (linked / "data" / "models" / "v1").mkdir(parents=True)
    saved = SimpleNamespace(
        version="v1",
        architecture="vgg19",
        classes=("autoimmune", "normal"),
        input_size=32,
        path=Path("data/models/v1"),
        metadata={},
    )
    record = version_record(saved, dt.datetime(2026, 1, 5, tzinfo=dt.UTC))
    # Not the link's target: other machines mount the registry at data/models.
    assert record.artifact_path == str(linked / "data" / "models" / "v1")
