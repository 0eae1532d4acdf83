"""Archive commands: backfill studies from a PACS (query/retrieve), re-send Structured Reports."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.progress import Progress, TaskID
from rich.table import Table

from thyrocad.commands.common import (
    TLS_HELP,
    console,
    err,
    fail,
    peer_tls,
    progress,
    sessions,
    settings,
)

app = typer.Typer()

_DATE_FORMATS = ["%Y-%m-%d", "%Y%m%d"]


@app.command()
def backfill(
    source: Annotated[str, typer.Option("--from", help="The archive to query, as AET@HOST:PORT.")],
    since: Annotated[
        datetime, typer.Option(formats=_DATE_FORMATS, help="First study date (YYYY-MM-DD).")
    ],
    until: Annotated[
        datetime | None,
        typer.Option(formats=_DATE_FORMATS, help="Last study date, inclusive (default: today)."),
    ] = None,
    modality: Annotated[
        str | None,
        typer.Option(help="Only studies with this modality, e.g. US; only its series are fetched."),
    ] = None,
    study_description: Annotated[
        str | None,
        typer.Option(help="Study description pattern, DICOM wildcards * and ? (case-insensitive)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be fetched; change nothing.")
    ] = False,
    get: Annotated[
        bool,
        typer.Option(
            "--get",
            help="C-GET over our own association (for archives that cannot connect to us) "
            "instead of C-MOVE to our listener.",
        ),
    ] = False,
    rate: Annotated[
        float | None,
        typer.Option(help="Retrieve requests per second, 0 = no limit [THYROCAD_BACKFILL_RATE]."),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1, max=16, help="Studies fetched at once [THYROCAD_BACKFILL_CONCURRENCY]."
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds the archive may stay silent [THYROCAD_RETRIEVE_TIMEOUT_SECONDS]."
        ),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="Wait until fetched studies are classified (else only until they arrived).",
        ),
    ] = True,
    tls: Annotated[bool, typer.Option("--tls", help=TLS_HELP)] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Fetch studies from an archive into thyrocad and follow them until classified.

    Resumable: run the same command again after an interruption; studies already
    complete are skipped, studies already here are not fetched again. Exit status:
    0 all complete, 1 some studies failed, 2 some not arrived or classified in time,
    130 interrupted.
    """
    from thyrocad.pacs.archive import ArchiveClient, ArchiveError, StudyFilter
    from thyrocad.pacs.backfill import Backfill, BackfillOptions
    from thyrocad.pacs.sender import Peer

    s = settings()
    try:
        peer = Peer.parse(source, tls=peer_tls(s, tls))
    except ValueError as exc:
        raise fail(str(exc)) from exc
    if until is not None and until < since:
        raise fail("--until is before --since")
    flt = StudyFilter(
        since=since.date(),
        until=until.date() if until else None,
        modality=modality,
        description=study_description,
    )
    session_factory = sessions(s)
    client = ArchiveClient(
        peer,
        s.ae_title,
        timeout=timeout if timeout is not None else s.retrieve_timeout_seconds,
        max_pdu=s.max_pdu_size,
    )
    options = BackfillOptions(
        destination_aet=s.ae_title,
        rate=rate if rate is not None else s.backfill_rate,
        concurrency=concurrency or s.backfill_concurrency,
        use_get=get,
        wait_classified=wait,
        wait_seconds=s.backfill_wait_seconds,
        dry_run=dry_run,
    )
    spool, intake = _get_intake(s, session_factory) if get and not dry_run else (None, None)
    try:
        with progress() as bar:
            view = _ProgressView(bar, client.name, bars=not dry_run)
            job = Backfill(
                client,
                session_factory,
                options,
                spool=spool,
                intake=intake,
                on_progress=view.update,
            )
            try:
                report = job.run(flt)
            except KeyboardInterrupt:
                job.stop()
                err.print(
                    "[yellow]interrupted:[/] what was asked for is recorded; run the same "
                    "command again to resume"
                )
                raise typer.Exit(130) from None
    except ArchiveError as exc:
        raise fail(str(exc)) from exc
    finally:
        if intake is not None:
            intake.stop()
    _print_backfill(report, json_out, dry_run, wait)
    if dry_run:
        return
    if report.counts.failed:
        raise typer.Exit(1)
    arrived = ("classified",) if wait else ("classified", "received")
    if any(line.state not in arrived for line in report.studies):
        raise typer.Exit(2)


def _get_intake(s: Any, session_factory: Any) -> tuple[Any, Any]:
    """The listener's spool and intake, in this process, for what C-GET brings."""
    from thyrocad.pacs.intake import Intake
    from thyrocad.serve import listener_spool, publisher
    from thyrocad.worker.app import create_app

    spool = listener_spool(s)
    intake = Intake(session_factory, publisher(create_app(s)))
    intake.start()
    return spool, intake


class _ProgressView:
    """Bars for studies requested, received and classified, out of those found."""

    def __init__(self, bar: Progress, archive: str, bars: bool = True) -> None:
        self.bar = bar
        self.bars = bars
        self.finding: TaskID | None = bar.add_task(f"C-FIND {archive}", total=None, info="")
        self.tasks: dict[str, TaskID] = {}

    def update(self, counts: Any) -> None:
        if self.finding is not None:
            self.bar.update(
                self.finding,
                total=1,
                completed=1,
                info=f"{counts.found} studies found",
            )
            self.finding = None
            for name in ("requested", "received", "classified") if self.bars else ():
                self.tasks[name] = self.bar.add_task(name, total=counts.found, info="")
        if not self.tasks:
            return
        done_before = counts.skipped + counts.present
        self.bar.update(
            self.tasks["requested"],
            completed=counts.requested + done_before,
            info=f"{counts.skipped} complete before, {counts.present} here before"
            if done_before
            else "",
        )
        self.bar.update(self.tasks["received"], completed=counts.received)
        self.bar.update(
            self.tasks["classified"],
            completed=counts.classified,
            info=f"[red]{counts.failed} failed[/]" if counts.failed else "",
        )


def _line_dict(line: Any) -> dict[str, Any]:
    return {
        "study_instance_uid": line.study_instance_uid,
        "study_date": line.study_date.isoformat() if line.study_date else None,
        "modalities": list(line.modalities),
        "expected": line.expected,
        "registered": line.registered,
        "action": line.action,
        "state": line.state,
        "classified": line.classified,
        "reason": line.reason,
    }


def _print_backfill(report: Any, json_out: bool, dry_run: bool, wait: bool) -> None:
    c = report.counts
    if json_out:
        data = {
            "source": report.source,
            "dry_run": dry_run,
            "counts": asdict(c),
            "interrupted": report.interrupted,
            "timed_out": report.timed_out,
            "studies": [_line_dict(line) for line in report.studies],
        }
        console.print_json(json.dumps(data))
        return
    if dry_run:
        table = Table("study date", "modalities", "instances", "status", title="dry run")
        table.add_column("study UID", overflow="fold")
        for line in report.studies:
            status = {"skipped": "complete", "present": "here, being classified"}.get(
                line.action, f"to fetch ({line.state})" if line.state != "found" else "to fetch"
            )
            table.add_row(
                str(line.study_date or "-"),
                "/".join(line.modalities),
                "?" if line.expected is None else str(line.expected),
                status,
                line.study_instance_uid,
            )
        console.print(table)
        to_fetch = sum(line.action == "pending" for line in report.studies)
        console.print(f"{c.found} studies found, {to_fetch} to fetch, {c.skipped} complete")
        return
    arrived = ("classified",) if wait else ("classified", "received")
    unfinished = [line for line in report.studies if line.state not in arrived]
    if unfinished:
        table = Table("study date", "state", "instances", title="not complete")
        table.add_column("study UID", overflow="fold")
        table.add_column("reason", overflow="fold")
        for line in unfinished:
            table.add_row(
                str(line.study_date or "-"),
                line.state,
                f"{line.registered}/{'?' if line.expected is None else line.expected}",
                line.study_instance_uid,
                line.reason or "",
            )
        err.print(table)
    console.print(
        f"{c.found} found · {c.skipped} already complete · {c.present} already here · "
        f"{c.requested} requested · {c.received} received · {c.classified} classified · "
        f"{c.failed} failed"
    )


# --------------------------------------------------------------------------- reports


def report_dicts(dispatches: list[Any]) -> list[dict[str, Any]]:
    """Dispatch records as JSON-ready dicts."""
    return [
        {**asdict(d), "sent_at": d.sent_at.isoformat() if d.sent_at else None} for d in dispatches
    ]


def report_status(reports: list[dict[str, Any]]) -> str:
    """One table cell: the latest dispatch of a study result, or empty."""
    if not reports:
        return ""
    last = reports[-1]
    when = (last["sent_at"] or "")[:19].replace("T", " ")
    if last["status"] == "sent":
        return f"sent {when}"
    return f"{last['status']}: {last['reason'] or ''}".strip().rstrip(":")


@app.command("send-reports")
def send_reports(
    study: Annotated[
        str | None, typer.Option(help="Only this Study Instance UID (default: every study).")
    ] = None,
) -> None:
    """Queue the Structured Report of each latest study result not sent yet (failed ones again)."""
    from thyrocad.db import repository
    from thyrocad.worker.app import create_app
    from thyrocad.worker.report_queue import mark_and_queue

    s = settings()
    if not s.sr_destination:
        raise fail("THYROCAD_SR_DESTINATION is not set")
    session_factory = sessions(s)
    with session_factory() as session:
        rows = repository.results(session, study_uid=study)
    celery = create_app(s)
    queued = mark_and_queue(
        session_factory,
        s.sr_destination,
        rows,
        lambda result_id, dest: celery.send_task("thyrocad.send_report", args=[result_id, dest]),
    )
    console.print(f"queued {queued} reports for {s.sr_destination}")
