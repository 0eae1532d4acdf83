"""End to end on real PostgreSQL, Redis, Celery workers and DICOM peers.

listener → spool → registration → Celery (Redis) → batched inference →
aggregation → SQL views; plus the failure modes: a worker killed mid-batch and
Redis stopped while studies arrive. Nothing acknowledged may be lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from tests.dicom_data import ultrasound_test_files
from tests.integration.conftest import cli
from tests.integration.site import US_IMAGE_STORAGE, Pipeline, send_raw
from tests.procs import free_port, redis_server, wait_for
from thyrocad.pacs.sender import send_files
from thyrocad.synthetic import write_synthetic_set

pytestmark = pytest.mark.integration


@pytest.fixture
def pipeline(tmp_path: Path, pg_url: str, tiny_model: tuple[Path, str]) -> Iterator[Pipeline]:
    registry, version = tiny_model
    with redis_server(tmp_path) as (redis_port, stop_redis, start_redis):
        port = free_port()
        env = {
            "THYROCAD_DATA_DIR": str(tmp_path / "data"),
            "DATABASE_URL": pg_url,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "THYROCAD_PORT": str(port),
            "THYROCAD_STUDY_IDLE_SECONDS": "1",
            "THYROCAD_CLAIM_LEASE_SECONDS": "6",
            "THYROCAD_REQUEUE_INTERVAL_SECONDS": "2",
            "THYROCAD_REQUEUE_STALE_SECONDS": "3",
            "THYROCAD_RECONCILE_INTERVAL_SECONDS": "5",
            "THYROCAD_BATCH_MAX": "8",
        }
        cli("db", "upgrade", env=env)
        cli("models", "promote", version, "--registry", str(registry), env=env)
        p = Pipeline(env, port, tmp_path, sa.create_engine(pg_url))
        p.redis = (stop_redis, start_redis)  # type: ignore[attr-defined]
        try:
            yield p
        finally:
            for name in list(p.procs):
                p.kill(name)
            p.engine.dispose()


def synthetic(tmp_path: Path, patients: int, seed: int) -> list[Path]:
    written = write_synthetic_set(
        tmp_path / f"studies-{seed}", patients, seed=seed, size=64, id_prefix=f"S{seed}"
    )
    return [path for p in written for path in p.paths]


def test_studies_flow_to_results_and_views(pipeline: Pipeline, tmp_path: Path) -> None:
    pipeline.start()
    files = synthetic(tmp_path, 3, seed=11)
    report = send_files(files, pipeline.peer(), "MODALITY1")
    assert report.ok, report.failed
    # dcmtk's storescu as a second, independent SCU.
    more = synthetic(tmp_path, 2, seed=12)
    storescu = shutil.which("storescu", path="/usr/bin")
    assert storescu, "dcmtk is required (deploy/setup.sh installs it)"
    done = subprocess.run(
        [
            storescu,
            "-aec",
            "THYROCAD",
            "-aet",
            "DCMTK",
            "127.0.0.1",
            str(pipeline.port),
            *map(str, more),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    total = len(files) + len(more)
    wait_for(
        lambda: pipeline.states().get("predicted", 0) == total,
        120,
        lambda: f"{total} predicted instances ({pipeline.states()})\n{pipeline.logs()}",
    )
    wait_for(
        lambda: pipeline.scalar("SELECT count(*) FROM study_results_latest") == 5,
        60,
        "5 study results",
    )
    assert pipeline.scalar("SELECT count(*) FROM patient_results_latest") == 5
    assert pipeline.scalar("SELECT count(*) FROM image_results") == total
    # every prediction names the model version that made it
    assert pipeline.scalar("SELECT count(*) FROM predictions WHERE model_version IS NULL") == 0
    status = json.loads(cli("status", "--json", env=pipeline.env).stdout)
    assert status["instances"]["predicted"] == total
    assert status["active_model"]
    # The audit trail: each association, and what each stored.
    ended = "SELECT count(*) FROM audit_events WHERE kind = 'instances_received'"
    wait_for(lambda: pipeline.scalar(ended) == 2, 30, "both associations' audit events")
    audit = json.loads(cli("audit", "--json", env=pipeline.env).stdout)
    opened = {e["actor"] for e in audit if e["kind"] == "association"}
    counts = [e for e in audit if e["kind"] == "instances_received"]
    stored = {e["actor"]: e["details"]["stored"] for e in counts}
    assert opened == {"MODALITY1", "DCMTK"}
    assert stored == {"MODALITY1": len(files), "DCMTK": len(more)}
    assert {"model_promoted", "results_read"} <= {e["kind"] for e in audit}


def test_killed_worker_loses_nothing_and_predicts_once(pipeline: Pipeline, tmp_path: Path) -> None:
    pipeline.start("listener", "inference", "control", "beat")
    files = synthetic(tmp_path, 12, seed=21)
    assert send_files(files, pipeline.peer(), "MODALITY1").ok
    wait_for(lambda: pipeline.states().get("predicted", 0) >= 1, 120, "a first prediction")
    pipeline.kill("inference", signal.SIGKILL)
    predicted_at_kill = pipeline.states().get("predicted", 0)
    if predicted_at_kill == len(files):
        pytest.fail("the worker finished before it could be killed: send more instances")
    pipeline.start("inference")
    wait_for(
        lambda: pipeline.states().get("predicted", 0) == len(files),
        180,
        lambda: f"all predicted after the restart ({pipeline.states()})\n{pipeline.logs()}",
    )
    duplicates = pipeline.scalar(
        "SELECT count(*) FROM (SELECT instance_id, frame_index, model_version FROM predictions "
        "GROUP BY 1, 2, 3 HAVING count(*) > 1) d"
    )
    assert duplicates == 0


def test_redis_outage_loses_nothing(pipeline: Pipeline, tmp_path: Path) -> None:
    stop_redis, start_redis = pipeline.redis  # type: ignore[attr-defined]
    pipeline.start()
    first = synthetic(tmp_path, 2, seed=31)
    assert send_files(first, pipeline.peer(), "MODALITY1").ok
    stop_redis()
    during = synthetic(tmp_path, 2, seed=32)
    report = send_files(during, pipeline.peer(), "MODALITY1")
    assert report.ok, "the listener must keep acknowledging while the broker is down"
    wait_for(
        lambda: pipeline.scalar("SELECT count(*) FROM instances") == len(first) + len(during),
        60,
        "registration of every acknowledged instance",
    )
    start_redis()
    total = len(first) + len(during)
    wait_for(
        lambda: pipeline.states().get("predicted", 0) == total,
        180,
        lambda: (
            f"all {total} predicted after Redis returned ({pipeline.states()})\n{pipeline.logs()}"
        ),
    )


def test_bad_input_is_refused_with_reason_and_service_survives(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    pipeline.start("listener")
    good = synthetic(tmp_path, 1, seed=41)
    # Garbage after a valid file meta header, sent as raw bytes (never decoded by the SCU).
    garbage = tmp_path / "garbage.dcm"
    pydicom.dcmread(good[0]).save_as(garbage, enforce_file_format=True)
    raw = garbage.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    garbage.write_bytes(raw[:meta_end] + os.urandom(2000))
    nopix = tmp_path / "nopix.dcm"
    ds2 = pydicom.dcmread(good[1])
    del ds2.PixelData
    ds2.save_as(nopix, enforce_file_format=True)
    # A CT image inside an ultrasound presentation context.
    wrong = tmp_path / "ct.dcm"
    ds3 = pydicom.dcmread(good[2])
    ds3.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds3.file_meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    ds3.save_as(wrong)
    statuses = send_raw([garbage, nopix, wrong], pipeline.peer(), "MODALITY1")
    assert statuses == [0xC000, 0xA900, 0x0122]
    report = send_files(good, pipeline.peer(), "MODALITY1")
    assert report.ok, "the listener keeps accepting good instances after bad ones"
    wait_for(
        lambda: pipeline.scalar("SELECT count(*) FROM rejections") == 3, 30, "3 stored rejections"
    )
    reasons = str(pipeline.scalar("SELECT string_agg(reason, ' | ') FROM rejections"))
    assert "not a DICOM dataset" in reasons
    assert "no pixel data" in reasons
    assert "not an ultrasound" in reasons
    # An unknown calling AE title is refused at association when an allow-list is set.
    pipeline.kill("listener")
    pipeline.env["THYROCAD_ALLOWED_AETS"] = "MODALITY1"
    pipeline.start("listener")
    from thyrocad.pacs.errors import SendError

    with pytest.raises(SendError, match="rejected"):
        send_files(good[:1], pipeline.peer(), "STRANGER")
    assert send_files(good[:1], pipeline.peer(), "MODALITY1").ok


SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_real_files_end_predicted_or_rejected_with_reason(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    from thyrocad.ddti import read_crops, wrap_as_dicom

    files = list(ultrasound_test_files())
    assert len(files) >= 16, (
        "pydicom-data's ultrasound files are required (pip install pydicom-data)"
    )
    if not (SHARED_DATA / "ddti").is_dir():
        pytest.skip(f"the shared DDTI data is absent at {SHARED_DATA / 'ddti'} (present in CI)")
    crops = [c for c in read_crops(SHARED_DATA / "ddti") if c.case in {"1", "2", "3", "4"}]
    files += wrap_as_dicom(crops, tmp_path / "ddti")
    pipeline.start()
    report = send_files(files, pipeline.peer(), "MODALITY1")
    for path, reason in report.failed:
        assert reason, f"{path.name} refused without a reason"
    # Accepted instances are registered in batches, after their C-STORE answered: count
    # what was sent (one per SOP Instance UID: a file re-sent with other content replaces
    # it), not what the database holds yet.
    received = len(
        {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in report.sent}
    )

    def settled() -> bool:
        states = pipeline.states()
        return sum(states.get(s, 0) for s in ("predicted", "rejected", "failed")) == received

    wait_for(
        lambda: pipeline.scalar("SELECT count(*) FROM instances") == received, 60, "registration"
    )
    wait_for(
        settled, 240, lambda: f"every instance settled ({pipeline.states()})\n{pipeline.logs()}"
    )
    unexplained = pipeline.scalar(
        "SELECT count(*) FROM instances WHERE state <> 'predicted' AND coalesce(reason, '') = ''"
    )
    assert unexplained == 0
    assert pipeline.states().get("predicted", 0) >= len(crops)


def test_resent_instances_are_counted_or_replaced(pipeline: Pipeline, tmp_path: Path) -> None:
    pipeline.start()
    files = synthetic(tmp_path, 1, seed=71)
    assert send_files(files, pipeline.peer(), "MODALITY1").ok
    wait_for(lambda: pipeline.states().get("predicted", 0) == len(files), 120, "first predictions")
    # The same bytes again: counted, not processed again.
    assert send_files(files, pipeline.peer(), "MODALITY1").ok
    # Same SOP Instance UID, different pixels: replaced and predicted again.
    changed = tmp_path / "changed.dcm"
    ds = pydicom.dcmread(files[0])
    ds.PixelData = bytes(255 - b for b in ds.PixelData)
    ds.save_as(changed, enforce_file_format=True)
    assert send_files([changed], pipeline.peer(), "MODALITY1").ok
    wait_for(
        lambda: pipeline.scalar("SELECT sum(received_count) FROM instances") == 2 * len(files) + 1,
        120,
        "every receipt counted",
    )
    assert pipeline.scalar("SELECT count(*) FROM instances") == len(files)
    wait_for(lambda: pipeline.states().get("predicted", 0) == len(files), 240, "re-prediction")
    # One prediction per instance and version: the replaced one overwritten, not doubled.
    assert pipeline.scalar("SELECT count(*) FROM predictions") == len(files)
    uid = str(ds.SOPInstanceUID)
    spooled = pipeline.scalar(f"SELECT spool_path FROM instances WHERE sop_instance_uid = '{uid}'")
    assert pydicom.dcmread(str(spooled)).PixelData == ds.PixelData
