"""Pipeline commands: database, listener, workers, sending, results, status, demo."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from thyrocad.commands.common import (
    TLS_HELP,
    State,
    console,
    ensure_schema,
    err,
    fail,
    peer_tls,
    progress,
    read_sessions,
    say_database,
    settings,
)
from thyrocad.errors import UserError, database_name

logger = logging.getLogger(__name__)

app = typer.Typer()
db_app = typer.Typer(help="Database schema and roles.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the database migrations."""
    from thyrocad.db.engine import upgrade

    s = settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(s.db_url, revision)
    console.print(f"database {database_name(s)} at {revision}")


@db_app.command("reader-role")
def db_reader_role(
    role: str = "thyrocad_reader",
    password: Annotated[str | None, typer.Option(help="LOGIN password for the role.")] = None,
    web: Annotated[
        bool,
        typer.Option(
            "--web",
            help="Also SELECT on the tables the web page reads, for "
            "THYROCAD_WEB_READ_DATABASE_URL (still read-only).",
        ),
    ] = False,
) -> None:
    """Create a read-only PostgreSQL role that can query the result views only."""
    from thyrocad.db.engine import make_engine
    from thyrocad.db.roles import create_readonly_role
    from thyrocad.web.reading import READ_TABLES

    tables = READ_TABLES if web else ()
    try:
        engine = make_engine(settings().db_url)
        for statement in create_readonly_role(engine, role, password, tables):
            console.print(
                statement if "PASSWORD" not in statement else "CREATE ROLE … PASSWORD '***'"
            )
    except Exception as exc:
        raise fail(str(exc)) from exc


@app.command()
def serve(
    embedded: Annotated[
        bool, typer.Option(help="Also run workers and beat as local processes.")
    ] = False,
    listener_index: Annotated[
        int | None,
        typer.Option(hidden=True, help="One of THYROCAD_LISTENER_PROCESSES (set by serve)."),
    ] = None,
    supervisor_pid: Annotated[
        int | None, typer.Option(hidden=True, help="The serve process supervising this one.")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on; overrides THYROCAD_HOST.")
    ] = None,
    port: Annotated[int | None, typer.Option(help="DICOM port; overrides THYROCAD_PORT.")] = None,
) -> None:
    """Run the DICOM listener (with --embedded: the whole pipeline)."""
    import os
    import signal
    import threading

    from thyrocad.serve import check_ports_free

    if port is not None and not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a port: give 1 to 65535")
    s = settings()
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if overrides:  # the processes serve starts read them from the environment it passes
        s = State.settings = s.model_copy(update=overrides)
    if listener_index is None:
        check_ports_free(s, embedded=embedded)
        ensure_schema(s, service=True)
    if embedded:
        from thyrocad.embedded import Supervisor

        sup = Supervisor(s)
        sup.start()
        console.print(
            f"thyrocad embedded: {s.ae_title} on port {s.port}, data in {s.data_dir} (Ctrl-C stops)"
        )
        raise typer.Exit(sup.wait())
    if s.listener_processes > 1 and listener_index is None:
        from thyrocad.serve import run_listener_processes

        raise typer.Exit(run_listener_processes(s))
    from thyrocad import metrics
    from thyrocad.health import listener_collectors, start_health_server
    from thyrocad.serve import start_service

    observer = metrics.observe_intake if s.metrics_port else None
    service = start_service(s, observer, index=listener_index)
    # One of several listener processes: the supervising process serves the metrics.
    health = (
        start_health_server(s, "listener", listener_collectors(s, service.spool))
        if s.metrics_port and listener_index is None
        else None
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            # A listener process whose supervising serve died stops too, rather than
            # holding the port beside the processes of the next serve.
            if supervisor_pid is not None and os.getppid() != supervisor_pid:
                logger.warning("the supervising serve process is gone; stopping")
                break
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
        if health is not None:
            health.stop()


#: The Celery pools thyrocad's workers are made for (TensorFlow rules out green threads).
WORKER_POOLS = ("prefork", "solo", "threads")


@app.command()
def worker(
    queues: Annotated[
        str, typer.Option(help="Comma-separated: inference,aggregation,training,maintenance")
    ] = "inference,aggregation,training,maintenance",
    pool: Annotated[str, typer.Option(help="prefork, solo or threads")] = "prefork",
    concurrency: int = 1,
    name: str = "worker",
    banner: Annotated[bool, typer.Option(help="Print Celery's start-up banner.")] = True,
    device: Annotated[
        str | None,
        typer.Option(
            help="cpu, or gpu:N to run the model on GPU N (one per worker process); "
            "overrides THYROCAD_WORKER_DEVICE."
        ),
    ] = None,
) -> None:
    """Run a Celery worker (any number, on any machine)."""
    import os

    from thyrocad.worker.app import QUEUES, create_app
    from thyrocad.worker.device import Device, DeviceError, pin_environment, probe

    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(chosen) - set(QUEUES)) or ([] if chosen else ["(none)"])
    if unknown:
        raise UserError(
            f"unknown queue {', '.join(unknown)}: --queues takes a comma-separated list of "
            f"{', '.join(QUEUES)}"
        )
    if pool not in WORKER_POOLS:
        raise UserError(f"unknown pool {pool!r}: --pool is one of {', '.join(WORKER_POOLS)}")
    if concurrency < 1:
        raise UserError("--concurrency is at least 1")
    queues = ",".join(chosen)
    s = settings()
    try:
        target = Device.parse(device if device is not None else s.worker_device)
    except DeviceError as exc:
        raise UserError(str(exc)) from None
    if target.name != s.worker_device:  # pool children and context read it from here
        s = State.settings = s.model_copy(update={"worker_device": target.name})
        os.environ["THYROCAD_WORKER_DEVICE"] = target.name
    ensure_schema(s, service=True)
    needs_model = {"inference", "training"} & set(chosen)
    # Before any Keras backend is imported (they read CUDA_VISIBLE_DEVICES once).
    try:
        pin_environment(target)
        asked = f"--device {target.name}" if device is not None else ""
        report = probe(target, s, asked=asked) if needs_model else None
    except DeviceError as exc:
        raise UserError(str(exc)) from None
    # TensorFlow writes to the raw stderr when imported: import it now, as log records.
    # (Not in a prefork parent: TensorFlow is not safe to carry across fork.)
    if s.log_json and needs_model and pool != "prefork":
        import logging

        from thyrocad.logs import native_output_logged

        with native_output_logged(logging.getLogger("tensorflow")):
            import keras  # noqa: F401
    from thyrocad.health import start_worker_health

    # Before the app: a prefork pool needs multiprocess metrics set up first.
    start_worker_health(s, queues.split(","), pool, report)
    celery = create_app(s)
    celery.worker_main(
        [
            # JSON logs stay one JSON object per line: no banner.
            *(["--quiet"] if s.log_json or not banner else []),
            "worker",
            "--queues",
            queues,
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{name}@%h",
            "--loglevel",
            s.log_level,
            "--without-gossip",
            "--without-mingle",
        ]
    )


@app.command()
def beat(
    banner: Annotated[bool, typer.Option(help="Print Celery's start-up banner.")] = True,
) -> None:
    """Run the scheduler (exactly one per deployment)."""
    from thyrocad.worker.app import create_app

    s = settings()
    ensure_schema(s, service=True)
    from thyrocad.health import start_beat_health

    celery = create_app(s)
    s.data_dir.mkdir(parents=True, exist_ok=True)
    start_beat_health(s)
    celery.start(
        [
            *(["--quiet"] if s.log_json or not banner else []),
            "beat",
            "--schedule",
            str(s.data_dir / "beat-schedule"),
            "--loglevel",
            s.log_level,
        ]
    )


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (recursed).")],
    to: Annotated[str, typer.Option(help="HOST:PORT of the receiver.")],
    aet: Annotated[str, typer.Option(help="Called AE title.")] = "THYROCAD",
    calling: Annotated[str, typer.Option(help="Our AE title.")] = "THYROCAD-SCU",
    tls: Annotated[bool, typer.Option("--tls", help=TLS_HELP)] = False,
) -> None:
    """Send DICOM files with C-STORE, with a progress bar."""
    from thyrocad.pacs.errors import SendError
    from thyrocad.pacs.sender import Peer, iter_dicom_files, send_files

    try:
        peer = Peer.parse(to, aet, tls=peer_tls(settings(), tls))
        files = list(iter_dicom_files(paths))
    except (ValueError, SendError) as exc:
        raise fail(str(exc)) from exc
    if not 1 <= peer.port <= 65535:
        raise UserError(f"--to {to}: {peer.port} is not a port, give HOST:PORT with 1 to 65535")
    with progress() as bar:
        task = bar.add_task(f"C-STORE → {peer.name}", total=len(files), info="")
        try:
            report = send_files(files, peer, calling, on_progress=lambda p, st: bar.advance(task))
        except SendError as exc:
            raise fail(str(exc)) from exc
    for path, reason in report.failed:
        err.print(f"[red]failed[/] {path}: {reason}")
    console.print(f"sent {len(report.sent)}, failed {len(report.failed)}")
    if report.failed:
        raise typer.Exit(1)


@app.command()
def results(
    patient: Annotated[str | None, typer.Option(help="Patient ID.")] = None,
    study: Annotated[str | None, typer.Option(help="Study Instance UID.")] = None,
    wide: Annotated[
        bool, typer.Option("--wide", help="One row per result: every class, model, revision, SR.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Latest patient results, each followed by its studies (date, accession, Study UID)."""
    from thyrocad.commands.archive import report_dicts
    from thyrocad.db import repository

    s = settings()
    with read_sessions(s).begin() as session:
        rows = repository.results(session, patient_key=patient, study_uid=study)
        sent = repository.sr_dispatches(session, [r.id for r in rows if r.level == "study"])
        details = _study_details(session, [r.key for r in rows if r.level == "study"])
        # Which kind of query and how many rows: never the patient or study asked for.
        by = "patient" if patient else "study" if study else "all"
        audit_read(session, "results", {"by": by, "rows": len(rows)})
    say_database(s)
    data = [_result_dict(r) for r in rows]
    for r in data:
        r["reports"] = report_dicts(sent.get(r["id"], [])) if r["level"] == "study" else []
        r["study_date"], r["accession_number"] = details.get(r["key"], (None, None))
    if json_out:
        console.print_json(json.dumps(data, default=str))
    elif not data:
        console.print("no results yet" + (" for that patient or study" if patient or study else ""))
    else:
        # Never cut a UID: a narrow terminal wraps the line, it does not lose characters.
        wider = Console(file=console.file, width=max(console.width, 1000 if wide else 100))
        wider.print(_results_table(data, s.classes) if wide else _reader_table(data))


def audit_read(session: Any, query: str, details: dict[str, Any]) -> None:
    """Audit a read of results through this CLI, by this OS user (no patient data)."""
    from thyrocad.db import repository
    from thyrocad.db.repository.audit import RESULTS_READ

    repository.record_audit_event(
        session, RESULTS_READ, actor=repository.default_actor(), details={"query": query, **details}
    )


def _study_details(session: Any, study_uids: list[str]) -> dict[str, tuple[Any, Any]]:
    """Study date and accession number by Study Instance UID, from the result view."""
    from sqlalchemy import bindparam, text

    if not study_uids:
        return {}
    query = text(
        "SELECT study_instance_uid, study_date, accession_number FROM study_results_latest "
        "WHERE study_instance_uid IN :uids"
    ).bindparams(bindparam("uids", expanding=True))
    found = session.execute(query, {"uids": study_uids})
    return {uid: (when, accession) for uid, when, accession in found}


def _shown_probability(r: dict[str, Any]) -> str:
    """The probability of the diagnosis shown (not of the positive class), or '-'."""
    value = (r["probabilities"] or {}).get(r["label"])
    return "-" if value is None else f"{value:.3f}"


def _study_line(r: dict[str, Any]) -> str:
    when = str(r["study_date"]) if r["study_date"] else "no date"
    accession = f"acc {r['accession_number']}" if r["accession_number"] else "no accession"
    return f"  study {when}, {accession}\n  {r['key']}"


def _reader_table(data: list[dict[str, Any]]) -> Table:
    from rich import box

    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        caption="P: probability of the diagnosis shown; --wide for every class, --json for all",
        caption_justify="left",
    )
    table.add_column("patient / study", no_wrap=True)
    table.add_column("diagnosis", overflow="fold")
    table.add_column("P", justify="right", no_wrap=True)
    table.add_column("images", justify="right", no_wrap=True)
    for r in data:
        key = f"patient {r['key']}" if r["level"] == "patient" else _study_line(r)
        table.add_row(key, r["label"], _shown_probability(r), str(r["image_count"]))
    return table


def _results_table(data: list[dict[str, Any]], classes: list[str]) -> Table:
    from thyrocad.commands.archive import report_status

    table = Table(
        "level",
        "patient / study",
        "study date",
        "accession",
        "diagnosis",
        *(f"P({c})" for c in classes),
        "images",
        "revision",
        "model",
        "SR to PACS",
    )
    for r in data:
        probabilities = r["probabilities"] or {}
        table.add_row(
            r["level"],
            r["key"],
            str(r["study_date"] or ""),
            r["accession_number"] or "",
            r["label"],
            *(f"{probabilities[c]:.3f}" if c in probabilities else "-" for c in classes),
            str(r["image_count"]),
            str(r["revision"]),
            r["model_version"],
            report_status(r["reports"]),
        )
    return table


def _result_dict(r: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(r)


@app.command()
def status(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Instances by state, queue depth, active model."""
    from thyrocad.db import repository
    from thyrocad.worker.app import create_app, queue_depths

    s = settings()
    with read_sessions(s).begin() as session:
        counts = repository.instance_counts(session)
        rejected = repository.rejection_counts(session)
        active = repository.active_model(session)
        audit_read(session, "status", {"rows": len(counts) + len(rejected)})
    say_database(s)
    try:
        depths = queue_depths(create_app(s))
    except Exception as exc:
        depths = {"error": str(exc)}  # type: ignore[dict-item]
    data = {
        "instances": counts,
        "rejections": rejected,
        "queues": depths,
        "active_model": active.version if active else None,
        "database": database_name(s),
    }
    if json_out:
        console.print_json(json.dumps(data))
        return
    table = Table("what", "count")
    for state, n in sorted(counts.items()):
        table.add_row(f"instances {state}", str(n))
    for reason, n in sorted(rejected.items()):
        table.add_row(f"refused: {reason}", str(n))
    for q, n in depths.items():
        table.add_row(f"queue {q}", str(n))
    console.print(table)
    console.print(f"active model: {data['active_model'] or 'none'}")


@app.command()
def demo(
    patients: Annotated[
        int, typer.Option(help="Synthetic patients pushed through the pipeline.")
    ] = 8,
    train_patients: int = 40,
    input_size: Annotated[int, typer.Option(help="Model input size for the quick model.")] = 128,
    epochs: int = 30,
    timeout: float = 600.0,
    weights: Annotated[
        str,
        typer.Option(
            help="Base weights of the quick model: auto (ImageNet if installed here, else "
            "none, with no download), imagenet (downloads if needed), none, or a file."
        ),
    ] = "auto",
    no_wait: Annotated[
        bool,
        typer.Option(
            "--no-wait",
            help="Exit once the results and the web page's address are printed (the "
            "default when stdout is not a terminal), instead of serving until Ctrl-C.",
        ),
    ] = False,
) -> None:
    """Synthetic studies → quick model → embedded pipeline → C-STORE → per-patient table
    → the web page's address with a demo login."""
    import sys

    from thyrocad.commands.models import train_and_register
    from thyrocad.demo import DemoRow, run_demo

    def show(rows: list[DemoRow]) -> None:
        table = Table(
            "patient",
            "true",
            "predicted",
            "P(autoimmune)",
            "images",
            title="demo results (synthetic data)",
        )
        for row in rows:
            table.add_row(
                row.patient_id, row.truth, row.predicted, f"{row.probability:.3f}", str(row.images)
            )
        console.print(table)
        correct = sum(r.truth == r.predicted for r in rows)
        console.print(f"{correct}/{len(rows)} patients classified correctly")

    def out(line: str) -> None:
        # One line each, never wrapped: the address and the command are copied from here.
        console.print(line, soft_wrap=True, markup=False, highlight=False)

    try:
        run_demo(
            settings(),
            patients=patients,
            train_patients=train_patients,
            input_size=input_size,
            epochs=epochs,
            timeout=timeout,
            say=err.print,
            train=train_and_register,
            weights=weights,
            show=show,
            out=out,
            wait=sys.stdout.isatty() and not no_wait,
        )
    except (TimeoutError, RuntimeError) as exc:
        raise fail(str(exc)) from exc
