"""What one machine writes is read on others (``tests/integration/test_multihost.py``
runs thyrocad on five network namespaces).

Paths: the listener records where it spooled each instance and a promotion records
where the model artifact is; inference workers elsewhere open those paths as recorded,
from other working folders, with the spool and the registry mounted at the path the
settings name. Clocks: on shared storage the file server stamps the spool's files.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from thyrocad import serve
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


def test_the_reconciler_reads_its_start_on_the_spools_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This host's clock an hour ahead of the file server's: a file spooled after one
    pass (its registration lost) is still read by the next."""
    spool = listener_spool(load_settings(data_dir=tmp_path))
    seen: list[float | None] = []
    stop = threading.Event()
    late: list[Path] = []

    def one_pass(spool_, sessions, publish, modified_since=None):  # type: ignore[no-untyped-def]
        seen.append(modified_since)
        if len(seen) == 1:
            late.append(spool_.write("1.2.826.0.1.3680043.8.498.2", b"DICM").path)
        else:
            stop.set()
        return 0

    monkeypatch.setattr(serve, "reconcile_spool", one_pass)
    real_time = time.time
    with monkeypatch.context() as ahead:
        ahead.setattr(time, "time", lambda: real_time() + 3600.0)
        serve.reconcile_forever(spool, None, lambda ids: None, 0.0, stop)  # type: ignore[arg-type]
    assert seen[0] is None  # the first pass reads every file
    since = seen[1]
    assert since is not None and os.stat(late[0]).st_mtime >= since
    assert [p.name for p in spool.entries()] == [late[0].name]  # the clock file is no entry
