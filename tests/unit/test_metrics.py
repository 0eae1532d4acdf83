"""Metrics, health endpoints and the shipped deployment files (no services needed)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from thyrocad import metrics
from thyrocad.db.records import PredictionRecord
from thyrocad.health import HealthServer, Readiness
from thyrocad.pacs.errors import InvalidInstance
from thyrocad.pacs.meta import describe, read_dataset
from thyrocad.settings import Settings, load_settings
from thyrocad.worker.observer import worker_observer

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
UID_RE = re.compile(r"\d+(?:\.\d+){2,}")


# --------------------------------------------------------------------------- reasons


def _dataset(**changes: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = US_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PAT-0001"
    ds.PatientName = "DOE^JANE"
    ds.Rows, ds.Columns = 4, 4
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(16)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _reason(ds: Dataset) -> InvalidInstance:
    with pytest.raises(InvalidInstance) as info:
        describe(ds)
    return info.value


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"SOPInstanceUID": None}, "missing_uid"),
        ({"StudyInstanceUID": None}, "missing_uid"),
        ({"SeriesInstanceUID": "1.2.abc"}, "invalid_uid"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}, "sop_class"),
        ({"PixelData": None}, "no_pixel_data"),
        ({"Rows": None}, "missing_dimensions"),
        ({"PixelData": bytes(5)}, "truncated"),
    ],
)
def test_reasons_raised_by_the_listener_map_to_their_class(
    changes: dict[str, Any], expected: str
) -> None:
    exc = _reason(_dataset(**changes))
    assert metrics.reason_class(exc.reason, exc.status) == expected


def test_not_dicom_and_spool_reasons() -> None:
    with pytest.raises(InvalidInstance) as info:
        read_dataset(os.urandom(300))
    assert metrics.reason_class(info.value.reason, info.value.status) == "not_dicom"
    assert metrics.reason_class("spool has less than 512 MiB free at /data/spool") == "spool_full"
    assert (
        metrics.reason_class("cannot write to the spool: No space left on device") == "spool_full"
    )
    assert metrics.reason_class("cannot write to the spool: Permission denied") == "spool_error"
    assert (
        metrics.reason_class("unsafe SOP Instance UID for a file name: '../1.2.3'") == "invalid_uid"
    )
    assert metrics.reason_class("something nobody expected", 0xA700) == "spool_error"
    assert metrics.reason_class("something nobody expected", 0xC000) == "other"


@pytest.mark.parametrize(
    "reason",
    [
        "invalid SOPInstanceUID: '1.2.826.0.1.3680043.8.498.1'",
        "SOP class 1.2.840.10008.5.1.4.1.1.2 is not an ultrasound or secondary capture image",
        "unexpected: 1.2.826.0.1.3680043.2.1125.1 for patient DOE^JANE PAT-0001",
        "",
    ],
)
def test_a_reason_never_passes_its_text_into_the_label(reason: str) -> None:
    label = metrics.reason_class(reason)
    assert label in metrics.REJECT_REASONS
    assert not UID_RE.search(label)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("autoimmune", "autoimmune"),
        ("vgg19-20260105-101500-a1b2c3", "vgg19-20260105-101500-a1b2c3"),
        ("1.2.826.0.1.3680043.8.498.1", "other"),
        ("v-1.2.840.10008", "other"),
        ("DOE^JANE", "other"),
        ("x" * 65, "other"),
        ("with space", "other"),
    ],
)
def test_safe_label(value: str, expected: str) -> None:
    assert metrics.safe_label(value) == expected


def test_safe_label_with_an_allowed_set() -> None:
    assert metrics.safe_label("duplicate", metrics.REGISTER_OUTCOMES) == "duplicate"
    assert metrics.safe_label("1.2.3.4", metrics.REGISTER_OUTCOMES) == "other"


# --------------------------------------------------------------------------- observers


@pytest.fixture
def sqlite_ctx(tmp_path: Path) -> Any:
    from thyrocad.db.engine import make_engine, upgrade

    url = f"sqlite:///{tmp_path / 'm.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    yield SimpleNamespace(engine=engine)
    engine.dispose()


def _label_values(text: str) -> list[str]:
    values = []
    for line in text.splitlines():
        if line.startswith("thyrocad_") and "{" in line:
            values += re.findall(r'="([^"]*)"', line[line.index("{") : line.rindex("}")])
    return values


def test_no_uid_or_patient_data_reaches_a_label(sqlite_ctx: Any) -> None:
    uid = "1.2.826.0.1.3680043.8.498.77"
    metrics.observe_intake("accepted", {"bytes": 1234})
    metrics.observe_intake(
        "rejected", {"reason": f"invalid SOPInstanceUID: '{uid}' DOE^JANE", "status": 0xA900}
    )
    metrics.observe_intake("registered", {"outcome": uid})
    metrics.observe_intake("association", {"outcome": "PAT-0001"})
    observe = worker_observer(sqlite_ctx)
    record = PredictionRecord(
        instance_id=424242,
        model_version=uid,
        label="DOE^JANE",
        probability=0.7,
        probabilities={"autoimmune": 0.7, "normal": 0.3},
    )
    observe("batch", {"size": 1, "seconds": 0.01, "records": [record]})
    result = SimpleNamespace(
        id=99, key=uid, label=uid, created_at=dt.datetime.now(dt.UTC), patient_key="PAT-0001"
    )
    observe("study_result", {"study": result})
    metrics.observe_task_failure(f"thyrocad.infer[{uid}]")
    metrics.observe_training(uid, 12.0)
    text = generate_latest(REGISTRY).decode()
    values = _label_values(text)
    assert values, "expected labelled thyrocad series"
    for value in values:
        assert not UID_RE.search(value), value
        assert "DOE" not in value and "PAT-0001" not in value, value
    assert uid not in text and "DOE^JANE" not in text and "PAT-0001" not in text


def test_counters_follow_events(sqlite_ctx: Any) -> None:
    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = value("thyrocad_instances_rejected_total", reason="no_pixel_data")
    metrics.observe_intake("rejected", {"reason": "no pixel data", "status": 0xA900})
    assert value("thyrocad_instances_rejected_total", reason="no_pixel_data") == before + 1
    before = value("thyrocad_predictions_total", label="normal", model_version="m-1")
    batches = value("thyrocad_inference_batch_size_count")
    observe = worker_observer(sqlite_ctx)
    records = [
        PredictionRecord(i, "m-1", "normal", 0.2, {"autoimmune": 0.2, "normal": 0.8})
        for i in range(3)
    ]
    observe("batch", {"size": 3, "seconds": 0.05, "records": records})
    assert value("thyrocad_predictions_total", label="normal", model_version="m-1") == before + 3
    truncated = value("thyrocad_instances_unreadable_total", reason="truncated")
    undecodable = value("thyrocad_instances_unreadable_total", reason="undecodable")
    reasons = ["truncated pixel data: expected 10 bytes, got 4", "unsupported transfer syntax"]
    observe("unreadable", {"reasons": reasons})
    assert value("thyrocad_instances_unreadable_total", reason="truncated") == truncated + 1
    assert value("thyrocad_instances_unreadable_total", reason="undecodable") == undecodable + 1
    assert value("thyrocad_inference_batch_size_count") == batches + 1
    assert value("thyrocad_model_loaded", model_version="m-1") == 1
    metrics.model_loaded("m-2")
    assert value("thyrocad_model_loaded", model_version="m-1") == 0
    assert value("thyrocad_model_loaded", model_version="m-2") == 1
    runs = value("thyrocad_training_runs_total", outcome="failed")
    metrics.observe_training("failed", 30.0)
    assert value("thyrocad_training_runs_total", outcome="failed") == runs + 1


def test_an_observer_error_never_reaches_the_task(sqlite_ctx: Any) -> None:
    observe = worker_observer(sqlite_ctx)
    observe("batch", {"size": 1, "seconds": 0.1, "records": [object()]})  # logged, not raised
    observe("unknown-event", {})


def test_multiprocess_mode_sums_pool_processes(tmp_path: Path) -> None:
    """Prefork: counters of every child add up; a dead child's live gauge disappears."""
    script = textwrap.dedent(
        f"""
        import json, multiprocessing, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from thyrocad import metrics
        folder = metrics.prepare_multiprocess(Path({str(tmp_path)!r}))
        metrics.metrics()  # made in the parent, as the worker command does

        def child(version, die):
            for _ in range(3):
                metrics.observe_task_retry("thyrocad.infer")
            metrics.model_loaded(version)
            if die:
                metrics.mark_process_dead()

        ctx = multiprocessing.get_context("fork")
        for version, die in (("m-a", False), ("m-b", True)):
            p = ctx.Process(target=child, args=(version, die))
            p.start(); p.join()
        registry = metrics.scrape_registry()
        out = {{}}
        for family in registry.collect():
            for s in family.samples:
                out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
        print(json.dumps({{"samples": out, "folder": str(folder)}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    samples = result["samples"]
    assert samples['thyrocad_task_retries_total{"task": "thyrocad.infer"}'] == 6
    # The first child exited without bookkeeping: swept because its pid is gone.
    assert not any(k.startswith("thyrocad_model_loaded") for k in samples)
    assert not Path(result["folder"]).exists(), "the folder is removed at exit"


# --------------------------------------------------------------------------- health


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(data_dir=tmp_path / "data", metrics_port=0, **overrides)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_server_endpoints(tmp_path: Path) -> None:
    from thyrocad.db.engine import upgrade
    from thyrocad.worker.app import broker_options

    s = _settings(tmp_path)
    s.spool_dir.mkdir(parents=True)
    upgrade(s.db_url)
    broker_options(s)  # makes the filesystem broker's folders
    readiness = Readiness(s, "listener")
    server = HealthServer("127.0.0.1", 0, metrics.scrape_registry(), readiness).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert _get(f"{base}/healthz")[0] == 200
        status, body = _get(f"{base}/readyz")
        assert status == 503
        checks = json.loads(body)["checks"]
        assert checks["database"]["ok"] and checks["broker"]["ok"] and checks["spool"]["ok"]
        assert checks["model"] == {"ok": False, "detail": "no active model version"}
        status, body = _get(f"{base}/metrics")
        assert status == 200 and "thyrocad_instances_received_total" in body
        assert _get(f"{base}/nothing")[0] == 404
    finally:
        server.stop()


def test_readiness_spool_and_database_failures(tmp_path: Path) -> None:
    s = _settings(tmp_path, spool_min_free_mb=2**40)
    s.spool_dir.mkdir(parents=True)
    check = Readiness(s, "listener").spool(writable=True)
    assert not check.ok and "below THYROCAD_SPOOL_MIN_FREE_MB" in check.detail
    bad = _settings(tmp_path, database_url="postgresql+psycopg2://u@127.0.0.1:1/none")
    assert not Readiness(bad, "beat").database().ok
    assert [c.name for c in Readiness(bad, "beat").run()] == ["database", "broker"]
    with pytest.raises(ValueError):
        Readiness(s, "gateway")


def test_readyz_names_no_database_or_broker_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = _settings(
        tmp_path,
        database_url="postgresql+psycopg2://thyro:s3cret@127.0.0.1:1/results",
        celery_broker_url="redis://:s3cret@127.0.0.1:1/0",
    )
    server = HealthServer("127.0.0.1", 0, metrics.scrape_registry(), Readiness(s, "worker"))
    server.start()
    try:
        with caplog.at_level("WARNING", logger="thyrocad.health"):
            for _ in range(2):  # the reason is logged once, not at every probe
                status, body = _get(f"http://127.0.0.1:{server.port}/readyz")
    finally:
        server.stop()
    checks = json.loads(body)["checks"]
    assert status == 503
    assert checks["database"] == {"ok": False, "detail": "unreachable"}
    assert checks["broker"] == {"ok": False, "detail": "unreachable"}
    assert checks["model"] == {"ok": False, "detail": "database unreachable"}
    assert "127.0.0.1" not in body and "s3cret" not in body
    logged = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(logged) == 2 and all("s3cret" not in str(vars(r)) for r in logged)


def test_inference_readiness_needs_the_model_loaded(tmp_path: Path) -> None:
    from thyrocad.db import repository
    from thyrocad.db.engine import make_engine, make_session_factory, upgrade
    from thyrocad.db.records import ModelVersionRecord

    s = _settings(tmp_path)
    upgrade(s.db_url)
    artifact = tmp_path / "models" / "m-7" / "model.keras"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"k")
    with make_session_factory(make_engine(s.db_url)).begin() as session:
        repository.upsert_model_version(
            session, ModelVersionRecord("m-7", "vgg19", ("autoimmune", "normal"), 32, str(artifact))
        )
        repository.set_active_model(session, "m-7")
    loaded: set[str] = set()
    readiness = Readiness(s, "inference", lambda: loaded)
    assert readiness.model(loaded=True).detail == "m-7 is not loaded yet"
    loaded.add("m-7")
    assert readiness.model(loaded=True).ok
    assert Readiness(s, "worker").model(loaded=False).ok


# --------------------------------------------------------------------------- deploy/


def _promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is required (deploy/setup.sh installs prometheus)")
    return exe


def test_promtool_accepts_the_prometheus_config_and_rules() -> None:
    for args in (("check", "config"), ("check", "rules")):
        target = DEPLOY / ("prometheus.yml" if args[1] == "config" else "alerts.yml")
        done = subprocess.run(
            [_promtool(), *args, str(target)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


def _expressions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in _expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in _expressions(v)]
    return []


def test_every_dashboard_and_alert_metric_is_exported() -> None:
    exported = metrics.exported_names()
    dashboard = json.loads((DEPLOY / "grafana/dashboards/thyrocad.json").read_text())
    expressions = _expressions(dashboard)
    assert len(expressions) >= 20
    alerts = _expressions(_load_yaml(DEPLOY / "alerts.yml"))
    assert len(alerts) >= 10
    names = {n for e in [*expressions, *alerts] for n in re.findall(r"\bthyrocad_[a-z0-9_]+", e)}
    assert names, "no thyrocad metric referenced"
    assert names <= exported, f"not exported: {sorted(names - exported)}"
    # The dashboard covers what operators asked for.
    for needed in (
        "thyrocad_instances_received_total",
        "thyrocad_queue_messages",
        "thyrocad_inference_batch_duration_seconds_bucket",
        "thyrocad_inference_batch_size_bucket",
        "thyrocad_predictions_total",
        "thyrocad_study_result_latency_seconds_bucket",
        "thyrocad_task_failures_total",
        "thyrocad_active_model_info",
    ):
        assert needed in names, needed


def _load_yaml(path: Path) -> Any:
    import yaml  # a dev dependency

    return yaml.safe_load(path.read_text())


def test_compose_file_describes_the_whole_deployment() -> None:
    compose = _load_yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    thyrocad = {"migrate", "listener", "inference", "control", "training", "beat"}
    assert thyrocad | {"postgres", "redis", "prometheus", "grafana"} <= set(services)
    assert {"spool", "registry", "pgdata", "redisdata"} <= set(compose["volumes"])
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for name in thyrocad - {"migrate"}:
        service = services[name]
        assert service["healthcheck"]["test"], name
        assert "spool:/data/spool" in service["volumes"], name
        assert "registry:/data/models" in service["volumes"], name
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert service["environment"]["THYROCAD_METRICS_PORT"] == "9100"
    for name in ("postgres", "redis", "prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"], name
    assert "--queues" in services["inference"]["command"]
    # Prometheus scrapes every long-running thyrocad service.
    prometheus = _load_yaml(DEPLOY / "prometheus.yml")
    scraped = {
        name
        for job in prometheus["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    assert thyrocad - {"migrate"} <= scraped


def test_compose_refuses_to_start_without_passwords() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    for variable in ("POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        uses = re.findall(r"\$\{" + variable + r"([^}]*)\}", text)
        assert uses, variable
        # ${VAR:?message}: compose stops with the message when VAR is unset or empty.
        assert all(use.startswith(":?") for use in uses), (variable, uses)
    compose = _load_yaml(DEPLOY / "docker-compose.yml")
    assert compose["x-thyrocad"]["env_file"] == [{"path": ".env", "required": True}]


def test_dockerfile_runs_as_non_root_with_a_gpu_variant() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:${PYTHON_VERSION}-slim" in text and "ARG PYTHON_VERSION=3.11" in text
    assert re.search(r"^USER thyrocad$", text, re.M)
    assert "tensorflow[and-cuda]" in text and "ARG VARIANT=cpu" in text
    assert "pip install ." in text
