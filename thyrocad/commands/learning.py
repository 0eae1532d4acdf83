"""Continuous-learning commands: labels, refits, rescoring, rolling a model back.

::

    thyrocad label --study UID --diagnosis NAME [--by WHO] [--note TEXT]
    thyrocad label --patient ID --diagnosis NAME [--by WHO] [--note TEXT]
    thyrocad label import FILE.csv [--by WHO]
    thyrocad label history [--study UID | --patient ID] [--json]
    thyrocad retrain [--force] [--enqueue] [--json]
    thyrocad training-runs [--limit N] [--json]
    thyrocad rescore --since DATE [--study UID] [--no-wait] [--timeout S]
    thyrocad models rollback

``thyrocad label`` with options adds one label (``thyrocad label add`` is the same).
Diagnoses are the configured classes (``THYROCAD_CLASSES``). A changed label is a
new row: the latest wins, the history is kept.
"""

from __future__ import annotations

import csv
import datetime as dt
import getpass
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from thyrocad.commands.common import (
    console,
    ensure_schema,
    err,
    fail,
    progress,
    read_sessions,
    say_database,
    sessions,
    settings,
)
from thyrocad.commands.models import models_app
from thyrocad.settings import Settings

app = typer.Typer()
label_app = typer.Typer(
    help=(
        "Ground-truth labels. 'thyrocad label --study UID --diagnosis NAME' adds one; "
        "'label import FILE.csv' adds many; 'label history' shows them."
    )
)

StudyOption = Annotated[str | None, typer.Option("--study", help="Study Instance UID.")]
PatientOption = Annotated[str | None, typer.Option("--patient", help="Patient ID.")]
DiagnosisOption = Annotated[
    str | None, typer.Option("--diagnosis", help="One of THYROCAD_CLASSES, e.g. autoimmune.")
]
ByOption = Annotated[str | None, typer.Option("--by", help="Who labels (default: the login name).")]
NoteOption = Annotated[str | None, typer.Option("--note", help="Free text, kept with the label.")]

CSV_COLUMNS = {
    "study": ("study_uid", "study_instance_uid", "study"),
    "patient": ("patient_id", "patient_key", "patient"),
    "diagnosis": ("diagnosis",),
    "by": ("labelled_by", "by"),
    "note": ("note",),
}


# --------------------------------------------------------------------------- labels


def _who(by: str | None) -> str:
    if by:
        return by
    try:
        return getpass.getuser()
    except Exception:  # no login name (containers): say so rather than guess
        return "unknown"


def _add_one(
    session: Any,
    s: Settings,
    *,
    study: str | None,
    patient: str | None,
    diagnosis: str,
    by: str,
    note: str | None,
    source: str,
) -> int:
    """Add one label; RepositoryError with a message fit for the person who typed it."""
    from thyrocad.db import repository
    from thyrocad.db.errors import RepositoryError

    try:
        return repository.add_label(
            session,
            study_uid=study,
            patient_key=patient,
            diagnosis=diagnosis,
            labelled_by=by,
            source=source,
            note=note,
            allowed_diagnoses=tuple(s.classes),
        )
    except RepositoryError as exc:
        if patient is not None and "unknown patient" in str(exc):
            # The person typed the ID: repeat it to them (it is never logged).
            raise RepositoryError(
                f"unknown patient {patient!r}: no patient is registered under that ID"
            ) from exc
        raise


def _add(
    study: str | None,
    patient: str | None,
    diagnosis: str | None,
    by: str | None,
    note: str | None,
) -> None:
    from thyrocad.db import repository
    from thyrocad.db.errors import RepositoryError

    s = settings()
    if (study is None) == (patient is None):
        raise fail("give exactly one of --study UID and --patient ID")
    if not diagnosis:
        raise fail(f"give --diagnosis, one of: {', '.join(s.classes)}")
    who = _who(by)
    try:
        with sessions(s).begin() as session:
            before = repository.label_history(session, study_uid=study, patient_key=patient)
            target_level = "study" if study else "patient"
            previous = [r for r in before if r.level == target_level]
            label_id = _add_one(
                session,
                s,
                study=study,
                patient=patient,
                diagnosis=diagnosis,
                by=who,
                note=note,
                source="cli",
            )
    except RepositoryError as exc:
        raise fail(str(exc)) from exc
    target = f"study {study}" if study else f"patient {patient}"
    console.print(f"label #{label_id}: {target} is [bold]{diagnosis}[/] (by {who})")
    if previous and previous[-1].diagnosis != diagnosis:
        old = previous[-1]
        console.print(
            f"replaces {old.diagnosis!r} (by {old.labelled_by}, {old.created_at:%Y-%m-%d %H:%M}); "
            "the history is kept"
        )


@label_app.callback(invoke_without_command=True)
def label(
    ctx: typer.Context,
    study: StudyOption = None,
    patient: PatientOption = None,
    diagnosis: DiagnosisOption = None,
    by: ByOption = None,
    note: NoteOption = None,
) -> None:
    """Label a study or a patient with the true diagnosis (or use a subcommand)."""
    if ctx.invoked_subcommand is not None:
        if any(v is not None for v in (study, patient, diagnosis, by, note)):
            raise fail(f"put the options after 'label {ctx.invoked_subcommand}'")
        return
    if all(v is None for v in (study, patient, diagnosis)):
        console.print(ctx.get_help())
        raise typer.Exit(2)
    _add(study, patient, diagnosis, by, note)


@label_app.command("add")
def label_add(
    study: StudyOption = None,
    patient: PatientOption = None,
    diagnosis: DiagnosisOption = None,
    by: ByOption = None,
    note: NoteOption = None,
) -> None:
    """Label a study or a patient (the same as 'thyrocad label' with options)."""
    _add(study, patient, diagnosis, by, note)


def _column(fieldnames: list[str], names: tuple[str, ...]) -> str | None:
    lowered = {name.strip().lower(): name for name in fieldnames}
    return next((lowered[n] for n in names if n in lowered), None)


@label_app.command("import")
def label_import(
    file: Annotated[Path, typer.Argument(help="CSV with a header row, as described above.")],
    by: ByOption = None,
) -> None:
    """Add labels from a CSV file, all or none.

    Header: diagnosis, and study_uid or patient_id (one of them per row); optional
    labelled_by (default --by, then the login name) and note. Every row is checked
    first; one bad row imports nothing and every problem is listed with its line.
    """
    from thyrocad.db.errors import RepositoryError

    s = settings()
    try:
        with file.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise fail(f"cannot read {file}: {exc}") from exc
    cols = {key: _column(fields, names) for key, names in CSV_COLUMNS.items()}
    if cols["diagnosis"] is None or (cols["study"] is None and cols["patient"] is None):
        raise fail(
            f"{file}: the header needs 'diagnosis' and 'study_uid' or 'patient_id' "
            f"(found: {', '.join(fields) or 'nothing'})"
        )

    def cell(row: dict[str, str], key: str) -> str | None:
        name = cols[key]
        value = (row.get(name) or "").strip() if name else ""
        return value or None

    default_by = _who(by)
    problems: list[str] = []
    added = 0
    session_factory = sessions(s)
    with session_factory() as session:
        for line, row in enumerate(rows, start=2):
            try:
                _add_one(
                    session,
                    s,
                    study=cell(row, "study"),
                    patient=cell(row, "patient"),
                    diagnosis=cell(row, "diagnosis") or "",
                    by=cell(row, "by") or default_by,
                    note=cell(row, "note"),
                    source=f"csv:{file.name}",
                )
                added += 1
            except RepositoryError as exc:
                problems.append(f"line {line}: {exc}")
        if problems:
            session.rollback()
        else:
            session.commit()
    if problems:
        for problem in problems:
            err.print(f"[red]{problem}[/]")
        raise fail(f"{len(problems)} bad row(s) in {file}: nothing imported")
    console.print(f"imported {added} label(s) from {file}")


@label_app.command("history")
def label_history(
    study: StudyOption = None,
    patient: PatientOption = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every label (of one study or patient), oldest first; '*' marks the one in force."""
    from thyrocad.db import repository

    s = settings()
    with read_sessions(s)() as session:
        rows = repository.label_history(session, study_uid=study, patient_key=patient)
    say_database(s)
    latest: dict[tuple[str, str], int] = {}
    for r in rows:
        latest[(r.level, r.key)] = r.id
    if json_out:
        data = [{**_plain(r), "in_force": latest[(r.level, r.key)] == r.id} for r in rows]
        console.print_json(json.dumps(data, default=str))
        return
    table = Table("", "when (UTC)", "level", "study / patient", "diagnosis", "by", "source", "note")
    for r in rows:
        table.add_row(
            "*" if latest[(r.level, r.key)] == r.id else "",
            f"{r.created_at:%Y-%m-%d %H:%M}",
            r.level,
            r.key,
            r.diagnosis,
            r.labelled_by,
            r.source,
            r.note or "",
        )
    console.print(table)


def _plain(record: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(record)


# --------------------------------------------------------------------------- refit


@app.command()
def retrain(
    force: Annotated[
        bool, typer.Option(help="Refit even with fewer new labels than configured.")
    ] = False,
    enqueue: Annotated[
        bool, typer.Option(help="Send it to the training queue instead of running it here.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Refit the active model on labelled studies; promote the candidate if it is not worse.

    Runs here with a progress bar (or on a training worker with --enqueue). Exit
    code 0 when a run was promoted, kept as a candidate or skipped; 1 when it failed.
    """
    s = settings()
    if enqueue:
        from thyrocad.worker.app import create_app

        create_app(s)
        from thyrocad.worker.learning_tasks import retrain as retrain_task

        retrain_task.apply_async(kwargs={"force": force, "trigger": "cli"})
        console.print("refit sent to the 'training' queue; see 'thyrocad training-runs'")
        return

    from thyrocad.db.engine import make_engine
    from thyrocad.worker.retraining import refit

    ensure_schema(s)
    engine = make_engine(s.db_url)
    bar: Any = None
    task: Any = None

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        nonlocal bar, task
        if bar is None:
            bar = progress()
            bar.start()
            task = bar.add_task("training the candidate", total=None, info="")
        info = " ".join(f"{k}={v:.3f}" for k, v in logs.items())
        bar.update(task, completed=epoch, info=f"epoch {epoch} {info}")

    try:
        outcome = refit(s, engine, force=force, trigger="cli", on_epoch=on_epoch)
    finally:
        if bar is not None:
            bar.stop()
        engine.dispose()
    if json_out:
        console.print_json(json.dumps(outcome.as_dict(), default=str))
    else:
        _print_outcome(outcome)
    if outcome.outcome == "failed":
        raise typer.Exit(1)


def _print_outcome(outcome: Any) -> None:
    colour = {"promoted": "green", "candidate": "yellow", "failed": "red"}.get(
        outcome.outcome, "blue"
    )
    console.print(f"[bold {colour}]{outcome.outcome}[/]: {outcome.reason}")
    if outcome.run_id is not None:
        console.print(f"training run #{outcome.run_id}, based on {outcome.active_version}")
    if outcome.candidate_version:
        console.print(f"candidate version: {outcome.candidate_version}")
    if outcome.metrics.get("candidate"):
        table = Table("patient-level hold-out", "candidate", "active")
        for name in ("auc", "sensitivity", "specificity", "accuracy"):
            cells = [
                f"{(outcome.metrics.get(role) or {}).get(name, float('nan')):.3f}"
                for role in ("candidate", "active")
            ]
            table.add_row(name, *cells)
        console.print(table)


@app.command("training-runs")
def training_runs(
    limit: int = 20, json_out: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Recorded refits, newest first: outcome, reason, duration, hold-out AUCs."""
    from thyrocad.worker.learning_store import training_runs as runs

    s = settings()
    with read_sessions(s)() as session:
        rows = runs(session, limit)
    say_database(s)
    if json_out:
        console.print_json(json.dumps([_plain(r) for r in rows], default=str))
        return
    table = Table(
        "run", "started (UTC)", "outcome", "seconds", "candidate", "AUC cand/act", "reason"
    )
    for r in rows:
        aucs = "-"
        if r.metrics and r.metrics.get("candidate") and r.metrics.get("active"):
            cand = r.metrics["candidate"]["patient"]["auc"]["value"]
            act = r.metrics["active"]["patient"]["auc"]["value"]
            aucs = f"{cand:.3f} / {act:.3f}"
        table.add_row(
            str(r.id),
            f"{r.started_at:%Y-%m-%d %H:%M:%S}",
            r.outcome,
            f"{r.duration_s:.0f}" if r.duration_s is not None else "",
            r.candidate_version or "",
            aucs,
            r.reason or "",
        )
    console.print(table)


# --------------------------------------------------------------------------- rescore


@app.command()
def rescore(
    since: Annotated[
        dt.datetime | None,
        typer.Option(
            formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"],
            help="Studies received on or after this local date/time.",
        ),
    ] = None,
    study: StudyOption = None,
    wait: Annotated[
        bool, typer.Option(help="Follow the progress until every study has its new result.")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Give up waiting after this many seconds.")] = 3600,
) -> None:
    """Predict stored studies again under the active model: new result revisions, old kept.

    The instances go back to the inference workers (which must be running); the
    finaliser then writes a new revision per study and patient.
    """
    from kombu.exceptions import OperationalError as BrokerError

    from thyrocad.worker.app import create_app
    from thyrocad.worker.rescoring import NothingToRescore, request_rescore
    from thyrocad.worker.rescoring import progress as rescore_progress

    s = settings()
    if since is None and study is None:
        raise fail("give --since DATE (and/or --study UID)")
    since_utc = since.astimezone(dt.UTC) if since is not None else None
    create_app(s)
    from thyrocad.worker.tasks import infer

    unpublished: list[int] = []

    def publish(ids: list[int]) -> None:
        try:
            infer.apply_async(args=[ids])
        except BrokerError:
            unpublished.extend(ids)

    factory = sessions(s)
    try:
        plan = request_rescore(
            factory, publish, since=since_utc, study_uid=study, batch=s.batch_max
        )
    except NothingToRescore as exc:
        raise fail(str(exc)) from exc
    console.print(
        f"rescoring {len(plan.study_ids)} studies under {plan.model_version}: "
        f"{len(plan.instance_ids)} instances sent to inference"
    )
    if unpublished:
        err.print(
            f"[yellow]broker unreachable: {len(unpublished)} instances stay queued; "
            "the reconciler sends them when it is back[/]"
        )
    if not wait:
        return
    deadline = time.monotonic() + timeout
    with progress() as bar:
        images = bar.add_task("predicting", total=max(1, len(plan.instance_ids)), info="")
        studies = bar.add_task("new revisions", total=len(plan.study_ids), info="")
        while True:
            state = rescore_progress(factory, plan)
            already = state.instances_total - len(plan.instance_ids)
            bar.update(images, completed=max(0, state.instances_done - already), info="")
            bar.update(studies, completed=state.studies_done, info="")
            if state.studies_done >= state.studies_total:
                break
            if time.monotonic() > deadline:
                raise fail(
                    f"{state.studies_total - state.studies_done} studies still without a new "
                    "result: are the inference and aggregation workers running?"
                )
            time.sleep(0.5)
    console.print(f"{len(plan.study_ids)} studies now have a result by {plan.model_version}")


# --------------------------------------------------------------------------- rollback


@models_app.command("rollback")
def models_rollback() -> None:
    """Make the previously active version active again; the current one becomes 'rejected'.

    Workers switch without a restart. Results already computed keep their version;
    'thyrocad rescore' recomputes them under the restored model.
    """
    from thyrocad.db import repository

    s = settings()
    now = dt.datetime.now(dt.UTC)
    with sessions(s).begin() as session:
        current = repository.active_model(session)
        if current is None:
            raise fail("no active model version to roll back from")
        earlier = [
            v
            for v in repository.list_model_versions(session)
            if v.status == "retired" and v.promoted_at is not None and v.version != current.version
        ]
        if not earlier:
            raise fail("no previously active model version to roll back to")
        previous = max(earlier, key=lambda v: v.promoted_at or now)
        repository.set_active_model(session, previous.version, now, rollback=True)
        repository.set_model_status(
            session,
            current.version,
            "rejected",
            f"rolled back to {previous.version} at {now:%Y-%m-%d %H:%M} UTC",
        )
    _registry_follows(Path(previous.artifact_path).parent.parent, previous.version)
    console.print(f"active model: {previous.version} (was {current.version})")


def _registry_follows(root: Path, version: str) -> None:
    """Point the registry's own 'active' at ``version`` too (the database is what serves)."""
    from thyrocad.models.errors import RegistryError
    from thyrocad.models.registry import Registry

    registry = Registry(root)
    try:
        if registry.rollback().version != version:
            registry.promote(version)
    except RegistryError:
        try:
            registry.promote(version)
        except RegistryError as exc:
            err.print(f"[yellow]registry at {root} not updated: {exc}[/]")
