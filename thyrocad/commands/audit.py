"""The audit trail command: who did what, when (``thyrocad audit``)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from thyrocad.commands.common import console, fail, read_sessions, say_database, settings

app = typer.Typer()


def parse_since(value: str) -> dt.datetime:
    """A date (midnight UTC) or an ISO 8601 date and time (UTC unless it says otherwise)."""
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
        when = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise fail(
            f"--since {value!r}: give a date (2026-11-29) or a date and time (2026-11-29T08:30)"
        ) from exc
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _details_text(details: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in details.items()
    )


def _table(events: list[Any]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("at (UTC)", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("actor", overflow="fold")
    table.add_column("outcome", no_wrap=True)
    table.add_column("details", overflow="fold")
    for e in events:
        style = "" if e.outcome == "success" else "yellow"
        table.add_row(
            e.at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
            e.kind,
            e.actor,
            f"[{style}]{e.outcome}[/]" if style else e.outcome,
            _details_text(e.details),
        )
    return table


@app.command()
def audit(
    since: Annotated[
        str | None,
        typer.Option(help="Only events at or after this date (UTC) or ISO date and time."),
    ] = None,
    kind: Annotated[
        str | None, typer.Option(help="Only events of this kind (e.g. association, refit).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, the newest.")] = 100,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The audit trail, oldest first: associations, instances received, labels, model
    promotions and rollbacks, refits, backfills, SR sent, results read. No patient data."""
    from thyrocad.db import repository

    s = settings()
    start = parse_since(since) if since else None
    with read_sessions(s)() as session:
        events = repository.audit_events(session, since=start, kind=kind, limit=limit)
    say_database(s)
    if json_out:
        console.print_json(json.dumps([asdict(e) for e in events], default=str))
    elif not events:
        console.print("no audit events" + (" matching" if since or kind else ""))
    else:
        # Never cut an address or a reason: a narrow terminal wraps the line instead.
        Console(file=console.file, width=max(console.width, 160)).print(_table(events))
