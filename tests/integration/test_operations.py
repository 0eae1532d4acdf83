"""Operations end to end: a real Prometheus scraping the pipeline, readiness under outages,
and no patient data in logs or metrics.

The pipeline runs as real processes (listener, a solo inference worker, a
prefork control worker whose children count study results in multiprocess
mode, beat) against PostgreSQL and a private Redis; Debian's ``prometheus``
scrapes them every second and evaluates the shipped alert rules.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa

from tests.integration.conftest import cli
from tests.integration.site import send_raw
from tests.procs import ROOT, free_port, port_open, redis_server, stop, thyrocad, wait_for
from thyrocad.pacs.sender import Peer, send_files
from thyrocad.synthetic import write_synthetic_set

pytestmark = pytest.mark.integration

# Every synthetic PatientID starts with this and every PatientName is
# "SYNTHETIC^<PatientID>": neither may appear in a log line or a metric.
PHI_MARK = "PHIZQ"
CELERY_SHUTDOWN_NOTICE = re.compile(r"worker: (Warm|Cold) shutdown \(MainProcess\)")

PROCESSES: dict[str, tuple[str, ...]] = {
    "listener": ("serve",),
    "inference": ("worker", "--queues", "inference", "--pool", "solo", "--name", "inf"),
    "control": (
        "worker",
        "--queues",
        "aggregation,maintenance",
        "--pool",
        "prefork",
        "--concurrency",
        "2",
        "--name",
        "ctl",
    ),
    "beat": ("beat",),
}


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


class Stack:
    """thyrocad processes, each with its own metrics port and JSON log file."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env = env
        self.folder = folder
        self.dicom_port = int(env["THYROCAD_PORT"])
        self.ports: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, *names: str) -> None:
        for name in names:
            self.ports.setdefault(name, free_port())
            env = {**self.env, "THYROCAD_METRICS_PORT": str(self.ports[name])}
            self.procs[name] = thyrocad(*PROCESSES[name], env=env, log=self.log_path(name))
        if "listener" in names:
            wait_for(lambda: port_open(self.dicom_port), 60, "the listener port")

    def log_path(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def url(self, name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def ready(self, name: str) -> dict[str, Any]:
        status, body = http_get(self.url(name, "/readyz"))
        if status not in (200, 503):
            return {"ready": False, "checks": {}, "error": body}
        return dict(json.loads(body))

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in self.folder.glob("*.log")
        )

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop(proc)
        self.procs.clear()


def base_env(tmp_path: Path, database_url: str, redis_port: int) -> dict[str, str]:
    return {
        "THYROCAD_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "THYROCAD_PORT": str(free_port()),
        "THYROCAD_METRICS_HOST": "127.0.0.1",
        "THYROCAD_LOG_JSON": "1",
        "THYROCAD_STUDY_IDLE_SECONDS": "1",
        "THYROCAD_CLAIM_LEASE_SECONDS": "6",
        "THYROCAD_REQUEUE_INTERVAL_SECONDS": "2",
        "THYROCAD_REQUEUE_STALE_SECONDS": "3",
        "THYROCAD_RECONCILE_INTERVAL_SECONDS": "5",
        "THYROCAD_BATCH_MAX": "8",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }


# --------------------------------------------------------------------------- Prometheus


@contextmanager
def prometheus_server(folder: Path, jobs: dict[str, int]) -> Iterator[Callable[[str], list]]:
    """Debian's Prometheus on loopback scraping ``jobs`` (name → port) every second."""
    exe = shutil.which("prometheus", path="/usr/bin") or shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is required (deploy/setup.sh installs it)")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "deploy" / "alerts.yml")],
        "scrape_configs": [
            {
                "job_name": f"thyrocad-{name}",
                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
            }
            for name, metrics_port in jobs.items()
        ],
    }
    config_path = folder / "prometheus.yml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    log = open(folder / "prometheus.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_get(f"{base}/-/ready")[0] == 200, 30, "Prometheus to be ready")

        def query(expr: str) -> list:
            status, body = http_get(
                f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            )
            assert status == 200, body
            return list(json.loads(body)["data"]["result"])

        query.base = base  # type: ignore[attr-defined]
        yield query
    finally:
        stop(proc, 10)
        log.close()


def scalar(query: Callable[[str], list], expr: str) -> float | None:
    result = query(expr)
    return float(result[0]["value"][1]) if result else None


def synthetic_studies(folder: Path, patients: int, seed: int) -> list[Path]:
    written = write_synthetic_set(folder, patients, seed=seed, size=64, id_prefix=PHI_MARK)
    return [path for p in written for path in p.paths]


def test_prometheus_sees_the_pipeline_and_no_patient_data_leaks(
    tmp_path: Path, pg_url: str, tiny_model: tuple[Path, str]
) -> None:
    registry, version = tiny_model
    with redis_server(tmp_path) as (redis_port, _, _):
        stack = Stack(base_env(tmp_path, pg_url, redis_port), tmp_path)
        cli("db", "upgrade", env=stack.env)
        cli("models", "promote", version, "--registry", str(registry), env=stack.env)
        engine = sa.create_engine(pg_url)
        try:
            stack.start(*PROCESSES)
            with prometheus_server(tmp_path, stack.ports) as query:
                _exercise_and_check(stack, engine, query, tmp_path, version)
        finally:
            stack.stop_all()
            engine.dispose()
    _check_logs_are_json_without_phi(stack)


def _exercise_and_check(
    stack: Stack, engine: sa.Engine, query: Callable[[str], list], tmp_path: Path, version: str
) -> None:
    def db(sql: str) -> Any:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar()

    # The inference worker loads the active model at start and says so.
    wait_for(
        lambda: stack.ready("inference").get("ready") is True,
        120,
        lambda: f"inference /readyz ({stack.ready('inference')})\n{stack.logs()}",
    )
    files = synthetic_studies(tmp_path / "studies", 3, seed=61)
    assert send_files(files, Peer("127.0.0.1", stack.dicom_port, "THYROCAD"), "MODALITY1").ok
    nopix = tmp_path / "nopix.dcm"
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    del ds.PixelData
    ds.save_as(nopix, enforce_file_format=True)
    peer = Peer("127.0.0.1", stack.dicom_port, "THYROCAD")
    assert send_raw([nopix], peer, "MODALITY1") == [0xA900]
    total = len(files)
    wait_for(
        lambda: db("SELECT count(*) FROM instances WHERE state = 'predicted'") == total,
        120,
        lambda: f"{total} predictions\n{stack.logs()}",
    )
    wait_for(lambda: db("SELECT count(*) FROM study_results_latest") == 3, 60, "3 study results")
    wait_for(
        lambda: (
            scalar(query, "sum(thyrocad_study_results_total)") == 3
            and scalar(query, "sum(thyrocad_predictions_total)") == total
            # each target is scraped on its own clock: the listener's too
            and scalar(query, 'sum(thyrocad_instances_registered_total{outcome="new"})') == total
        ),
        30,
        lambda: f"Prometheus to scrape the final counts\n{stack.logs()}",
    )

    for job in PROCESSES:
        assert scalar(query, f'up{{job="thyrocad-{job}"}}') == 1, job
    # Listener
    accepted = 'sum(thyrocad_instances_received_total{outcome="accepted"})'
    assert scalar(query, accepted) == total
    assert scalar(query, 'sum(thyrocad_instances_rejected_total{reason="no_pixel_data"})') == 1
    assert scalar(query, 'sum(thyrocad_instances_registered_total{outcome="new"})') == total
    assert scalar(query, "sum(thyrocad_received_bytes_total)") > total * 64 * 64
    assert scalar(query, 'sum(thyrocad_associations_total{outcome="accepted"})') >= 2
    assert scalar(query, "thyrocad_spool_free_bytes") > 0
    assert scalar(query, "thyrocad_associations_open") is not None
    # Deployment-wide gauges, from the listener and beat alike
    for job in ("listener", "beat"):
        sel = f'job="thyrocad-{job}"'
        assert scalar(query, f'thyrocad_instances{{{sel},state="predicted"}}') == total
        assert scalar(query, f'thyrocad_active_model_info{{{sel},model_version="{version}"}}') == 1
        assert scalar(query, f'thyrocad_queue_messages{{{sel},queue="inference"}}') is not None
        assert scalar(query, f"thyrocad_database_up{{{sel}}}") == 1
    # Inference worker
    inf = 'job="thyrocad-inference"'
    by_label = query(f"sum by (label, model_version) (thyrocad_predictions_total{{{inf}}})")
    assert {r["metric"]["label"] for r in by_label} <= {"autoimmune", "normal"}
    assert {r["metric"]["model_version"] for r in by_label} == {version}
    assert scalar(query, f"thyrocad_inference_batch_size_sum{{{inf}}}") == total
    batches = scalar(query, f"thyrocad_inference_batch_size_count{{{inf}}}")
    assert batches is not None and total / 8 <= batches <= total
    assert scalar(query, f"thyrocad_inference_batch_duration_seconds_count{{{inf}}}") == batches
    assert scalar(query, f"thyrocad_receipt_to_prediction_seconds_count{{{inf}}}") == total
    mean = scalar(
        query,
        f"thyrocad_receipt_to_prediction_seconds_sum{{{inf}}}"
        f" / thyrocad_receipt_to_prediction_seconds_count{{{inf}}}",
    )
    assert mean is not None and 0 < mean < 120
    assert scalar(query, f'thyrocad_model_loaded{{{inf},model_version="{version}"}}') == 1
    # Control worker: prefork children counted, the parent serves the sum.
    ctl = 'job="thyrocad-control"'
    assert scalar(query, f"sum(thyrocad_study_results_total{{{ctl}}})") == 3
    assert scalar(query, f"thyrocad_study_result_latency_seconds_count{{{ctl}}}") == 3
    mean = scalar(
        query,
        f"thyrocad_study_result_latency_seconds_sum{{{ctl}}}"
        f" / thyrocad_study_result_latency_seconds_count{{{ctl}}}",
    )
    assert mean is not None and 0.5 <= mean < 120
    # The shipped alert rules load and evaluate without errors against real series.
    status, body = http_get(query.base + "/api/v1/rules")  # type: ignore[attr-defined]
    groups = json.loads(body)["data"]["groups"]
    assert len(groups) >= 3
    errors = [
        (r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] == "err"
    ]
    assert not errors, errors
    firing = {r["name"] for g in groups for r in g["rules"] if r.get("state") == "firing"}
    assert not firing & {"ThyrocadListenerDown", "ThyrocadNoActiveModel"}, firing
    # No patient identifier in any metric of any process.
    for name in PROCESSES:
        status, text = http_get(stack.url(name, "/metrics"))
        assert status == 200
        assert PHI_MARK not in text and "SYNTHETIC" not in text, name

    # An instance the listener accepts (its header is fine) but no worker can decode:
    # a palette-colour image without its palette, in a study of its own.
    ds = pydicom.dcmread(files[0])
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    nopalette = tmp_path / "nopalette.dcm"
    ds.save_as(nopalette, enforce_file_format=True)
    assert send_raw([nopalette], peer, "MODALITY1") == [0x0000]
    unreadable = f'thyrocad_instances_unreadable_total{{{inf},reason="undecodable"}}'
    wait_for(
        lambda: scalar(query, unreadable) == 1,
        60,
        lambda: f"{unreadable} == 1, got {scalar(query, unreadable)}\n{stack.logs()}",
    )
    assert db("SELECT count(*) FROM instances WHERE state = 'rejected'") == 1


def _check_logs_are_json_without_phi(stack: Stack) -> None:
    not_json = []
    for name in PROCESSES:
        text = stack.log_path(name).read_text(errors="replace")
        assert text.strip(), f"{name} wrote no log"
        assert PHI_MARK not in text and "SYNTHETIC" not in text, f"patient data in {name}.log"
        for line in text.splitlines():
            # Celery prints this one notice itself, from its signal handler.
            if not line.strip() or CELERY_SHUTDOWN_NOTICE.fullmatch(line):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                not_json.append(f"{name}: {line}")
                continue
            assert {"ts", "level", "logger", "event"} <= set(event), line
    assert not not_json, "lines that are not one JSON object:\n" + "\n".join(not_json[:40])


# --------------------------------------------------------------------------- readiness


@contextmanager
def private_postgres() -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """A throwaway PostgreSQL cluster on a free port: yields (url, stop_it, start_it)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    if not bins:
        pytest.fail("PostgreSQL server binaries are required (/usr/lib/postgresql/*/bin)")
    bindir = Path(bins[-1])
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # Not under pytest's tmp_path: its parents are private to root.
    folder = Path(tempfile.mkdtemp(prefix="thyrocad-pg-"))
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*as_postgres, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr

    def start_it() -> None:
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg_ctl = str(bindir / "pg_ctl")
        run(pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-o", options, "-w", "start")

    def stop_it() -> None:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")

    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    try:
        start_it()
        wait_for(lambda: port_open(port), 30, "the private PostgreSQL")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres", stop_it, start_it
    finally:
        subprocess.run(
            [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


def test_readyz_follows_database_and_broker(tmp_path: Path, tiny_model: tuple[Path, str]) -> None:
    registry, version = tiny_model
    names = ("listener", "control")
    with (
        private_postgres() as (db_url, stop_db, start_db),
        redis_server(tmp_path) as (redis_port, stop_redis, start_redis),
    ):
        stack = Stack(base_env(tmp_path, db_url, redis_port), tmp_path)
        stack.env["THYROCAD_LOG_JSON"] = "0"
        cli("db", "upgrade", env=stack.env)
        cli("models", "promote", version, "--registry", str(registry), env=stack.env)
        try:
            stack.start(*names)

            def expect(ready: bool, failing: str | None, what: str) -> None:
                def ok() -> bool:
                    states = [stack.ready(n) for n in names]
                    if any(s.get("ready") is not ready for s in states):
                        return False
                    return failing is None or all(
                        s["checks"][failing]["ok"] is False for s in states
                    )

                wait_for(
                    ok,
                    60,
                    lambda: f"{what}: {[stack.ready(n) for n in names]}\n{stack.logs()}",
                )

            expect(True, None, "ready at start")
            stop_redis()
            expect(False, "broker", "unready without the broker")
            start_redis()
            expect(True, None, "ready when the broker returns")
            stop_db()
            expect(False, "database", "unready without the database")
            status, text = http_get(stack.url("listener", "/metrics"))
            assert status == 200 and "thyrocad_database_up 0.0" in text
            assert stack.ready("listener")["checks"]["broker"]["ok"] is True
            start_db()
            expect(True, None, "ready when the database returns")
            for name in names:
                assert http_get(stack.url(name, "/healthz"))[0] == 200
        finally:
            stack.stop_all()
