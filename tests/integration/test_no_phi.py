"""No patient name or id anywhere but the database's patient rows: a whole pipeline run
with a distinctive name and id, then every log line, every metric of every process and
every audit row searched for them (and for their parts)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.integration.conftest import cli
from tests.integration.site import PROCESSES, Pipeline
from tests.procs import free_port, port_open, redis_server, thyrocad, wait_for
from thyrocad.pacs.sender import send_files
from thyrocad.synthetic import write_synthetic_set

pytestmark = pytest.mark.integration

PATIENT_NAME = "Zyxwvut^Qponml"
ID_PREFIX = "PHI-ZQX-"
SEED = 991  # patient ids PHI-ZQX-9910000 and PHI-ZQX-9910001


def leaks(sources: dict[str, str], needles: list[str]) -> list[str]:
    """Each line of each source that holds a needle (case-insensitive), named."""
    pattern = re.compile("|".join(re.escape(n) for n in needles), re.IGNORECASE)
    return [
        f"{name}: {line.strip()[:300]}"
        for name, body in sources.items()
        for line in body.splitlines()
        if pattern.search(line)
    ]


def test_no_patient_name_or_id_in_logs_metrics_or_audit(
    tmp_path: Path, pg_url: str, tiny_model: tuple[Path, str]
) -> None:
    registry, version = tiny_model
    with redis_server(tmp_path) as (redis_port, _, _):
        port = free_port()
        env = {
            "THYROCAD_DATA_DIR": str(tmp_path / "data"),
            "DATABASE_URL": pg_url,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "THYROCAD_PORT": str(port),
            "THYROCAD_STUDY_IDLE_SECONDS": "1",
            "THYROCAD_BATCH_MAX": "8",
        }
        outputs = {
            "db upgrade": cli("db", "upgrade", env=env),
            "models promote": cli(
                "models", "promote", version, "--registry", str(registry), env=env
            ),
        }
        pipeline = Pipeline(env, port, tmp_path, sa.create_engine(pg_url))
        metrics_ports = {name: free_port() for name in PROCESSES}
        try:
            for name, args in PROCESSES.items():
                pipeline.procs[name] = thyrocad(
                    *args,
                    env={**env, "THYROCAD_METRICS_PORT": str(metrics_ports[name])},
                    log=tmp_path / f"{name}.log",
                )
            wait_for(lambda: port_open(port), 60, "the listener port")
            written = write_synthetic_set(
                tmp_path / "studies",
                2,
                seed=SEED,
                size=64,
                id_prefix=ID_PREFIX,
                patient_name=PATIENT_NAME,
            )
            patient_ids = [p.patient_id for p in written]
            files = [path for p in written for path in p.paths]
            assert send_files(files, pipeline.peer(), "MODALITY1").ok
            wait_for(
                lambda: pipeline.scalar("SELECT count(*) FROM study_results_latest") == 2,
                120,
                lambda: f"2 study results ({pipeline.states()})\n{pipeline.logs()}",
            )
            # What a radiologist does, through thyrocad's own interfaces.
            asked = cli("results", "--patient", patient_ids[0], "--json", env=env)
            assert patient_ids[0] in asked.stdout  # the answer names the patient, as it must
            outputs["results"] = asked
            outputs["label"] = cli(
                "label", "add", "--patient", patient_ids[1], "--diagnosis", "normal",
                "--by", "dr-test", env=env,
            )  # fmt: skip
            outputs["status"] = cli("status", "--json", env=env)
            wait_for(
                lambda: (
                    pipeline.scalar(
                        "SELECT count(*) FROM audit_events WHERE kind = 'instances_received'"
                    )
                    == 1
                ),
                30,
                "the association's instance counts in the audit trail",
            )
            metrics = {
                f"/metrics of {name}": urllib.request.urlopen(
                    f"http://127.0.0.1:{metrics_ports[name]}/metrics", timeout=10
                )
                .read()
                .decode()
                for name in PROCESSES
            }
        finally:
            for name in list(pipeline.procs):
                pipeline.kill(name)
        with pipeline.engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT * FROM audit_events")).mappings()
            audit = [dict(r) for r in rows]
            named = connection.execute(
                sa.text("SELECT count(*) FROM patients WHERE patient_name = :name"),
                {"name": PATIENT_NAME},
            ).scalar_one()
        pipeline.engine.dispose()
    # Not vacuous: the name and ids did go through, and the run was audited.
    assert named == 2
    kinds = {row["kind"] for row in audit}
    assert {"association", "instances_received", "results_read", "label_written"} <= kinds
    (counts,) = [row for row in audit if row["kind"] == "instances_received"]
    assert counts["details"]["stored"] == len(files) and counts["actor"] == "MODALITY1"
    assert all(len(text) > 100 for text in metrics.values()), metrics

    logs = {str(p.relative_to(tmp_path)): p.read_text(errors="replace") for p in _logs(tmp_path)}
    assert {"listener.log", "inference.log", "control.log", "beat.log"} <= set(logs)
    for what, done in outputs.items():
        logs[f"stderr of thyrocad {what}"] = done.stderr
        # The answers to a user who named the patient themselves may name them back.
        if what not in ("results", "label"):
            logs[f"stdout of thyrocad {what}"] = done.stdout
    audit_rows = {f"audit row {row['id']}": json.dumps(row, default=str) for row in audit}
    needles = [PATIENT_NAME, *PATIENT_NAME.split("^"), *patient_ids, ID_PREFIX, "ZQX"]
    found = leaks({**logs, **metrics, **audit_rows}, needles)
    assert not found, "patient data found:\n" + "\n".join(found)


def _logs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.log") if p.is_file())
